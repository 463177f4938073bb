"""Units run in a worker process, so one bad implementation costs its own rows, not the sweep.

The worker is spawned (safe with CUDA), loads the same plugins, and runs units one at a time,
sending each row back as it finishes; the parent writes it. One worker at a time: measurements
running side by side would disturb each other's timings. Outcomes the worker cannot report itself:
- the unit passes --timeout: the worker is killed, the unit's remaining modes get `timeout` rows,
  and the next unit starts a fresh worker;
- the worker dies (segfault, abort, the kernel's OOM killer): the remaining modes get `crash` rows
  naming the signal, and a fresh worker takes the next unit.
Exceptions inside the worker (including MemoryError and CUDA OOM) are rows, not deaths: see sweep.py.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import time
from typing import Any, Callable

from ..registry import get
from ..sweep import Emit, Unit, UnitRunner, impl_rows

STARTUP_TIMEOUT_S = 300.0  # importing torch (and CUDA initialisation) on a loaded machine


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when its parent dies, so a killed run leaves no orphan measuring on."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(conn, init: dict[str, Any]) -> None:
    _die_with_parent()
    import torch

    from .. import quiet_exit, registry

    quiet_exit.install()

    torch.set_num_threads(init["threads"])
    for plugin in init["plugins"]:
        registry.load_plugin(plugin)
    runner = UnitRunner(lambda device: init["provenance"][device], init["budget_s"])
    conn.send(("ready", None))
    while True:
        try:
            unit = conn.recv()
        except EOFError:  # the parent is gone
            return
        if unit is None:
            return
        runner.run(unit, lambda row: conn.send(("row", row)))
        conn.send(("done", None))


def describe_exit(code: int | None) -> str:
    if code is None:
        return "worker vanished"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (the kernel's OOM killer sends this)" if -code == signal.SIGKILL else ""
        return f"worker killed by {name}{hint}"
    return f"worker exited with status {code}"


class IsolatedRunner:
    """Runs units in a spawned worker with a per-unit timeout; same interface as UnitRunner.run."""

    def __init__(self, init: dict[str, Any], timeout_s: float,
                 prov_for: Callable[[str], dict[str, Any]]):
        self.init, self.timeout_s, self.prov_for = init, timeout_s, prov_for
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        # Not a daemon: daemonic processes may not start children, and inductor may compile in a
        # process pool. It still never outlives the run: PR_SET_PDEATHSIG, and close() below.
        self._proc = self._ctx.Process(target=_worker_main, args=(child, self.init), name="lossbench-worker")
        self._proc.start()
        child.close()
        self._conn = parent
        kind, _ = self._recv(time.monotonic() + STARTUP_TIMEOUT_S)
        if kind != "ready":
            raise RuntimeError(f"worker did not start: {kind}")

    def _recv(self, deadline: float) -> tuple[str, Any]:
        """Next message, or ("timeout", None) / ("crash", description)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout", None
            try:
                if self._conn.poll(min(remaining, 1.0)):
                    return self._conn.recv()
            except (EOFError, OSError):
                self._proc.join(5)
                return "crash", describe_exit(self._proc.exitcode)
            if not self._proc.is_alive():
                # Died without closing the pipe (possible with inherited handles): drain, then report.
                if self._conn.poll(0):
                    continue
                return "crash", describe_exit(self._proc.exitcode)

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(10)
            self._conn.close()
        self._proc = self._conn = None

    def run(self, unit: Unit, emit: Emit) -> None:
        written: set[str] = set()
        if self._proc is None:
            try:
                self._start()
            except RuntimeError as exc:
                self._kill()
                return self._fill(unit, written, "crash", str(exc), emit)
        self._conn.send(unit)
        deadline = time.monotonic() + self.timeout_s
        while True:
            kind, payload = self._recv(deadline)
            if kind == "row":
                written.add(payload["mode"])
                emit(payload)
            elif kind == "done":
                return
            else:
                self._kill()
                why = f"no result within --timeout {self.timeout_s:g} s" if kind == "timeout" else payload
                return self._fill(unit, written, kind, why, emit)

    def _fill(self, unit: Unit, written: set[str], status: str, why: str, emit: Emit) -> None:
        missing = [m for m in unit.modes if m not in written]
        for row in impl_rows(self.prov_for(unit.case.device), unit.case, get(unit.case.family, unit.impl),
                             missing, status=status, error=why):
            emit(row)

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(10)
            except (OSError, BrokenPipeError):
                pass
        self._kill()
