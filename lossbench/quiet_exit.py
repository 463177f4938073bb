"""Keep triton's exit-time noise out of our output.

triton's native bindings (nanobind) print "leaked instance/type/function" reports while the
interpreter tears its modules down; they are harmless (the process is ending) and only a C++ switch
in triton turns them off. They would land after pytest's summary and the CLI's tables. Tracebacks
of uncaught exceptions print before atexit handlers run, so this hides only teardown output.
Registered by lossbench's entry points only (CLI, worker, test session), never on import.
"""
from __future__ import annotations

import atexit
import os
import sys

_registered = False


def _redirect_stderr_if_triton_loaded() -> None:
    if "triton" in sys.modules:
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)


def install() -> None:
    global _registered
    if not _registered:
        atexit.register(_redirect_stderr_if_triton_loaded)
        _registered = True
