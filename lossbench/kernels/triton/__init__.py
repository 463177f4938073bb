"""Triton loss kernels: cross-entropy, KL divergence and chunked linear + cross-entropy.

Without a GPU they run under the Triton interpreter (TRITON_INTERPRET=1), which is slow but
executes the same kernel code. `triton.jit` decides between compiling and interpreting from the
environment at the moment it wraps a function, and triton.language wraps its own library (tl.sum,
tl.max, ...) when it is first imported. So this package imports triton only at the first launch
(the kernel modules get their `tl` global then, see _jit), and refuses to run when triton was
already imported in the other mode.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _mode_mismatch() -> bool:
    """triton.language already imported in the other mode than TRITON_INTERPRET asks for."""
    lang = sys.modules.get("triton.language")
    if lang is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(lang.sum, InterpretedFunction) != _interpreting()


def available(device) -> bool:
    """Whether these kernels can run on `device`: CUDA with triton, or CPU under the interpreter."""
    if not _HAS_TRITON or _mode_mismatch():
        return False
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available()
    return kind == "cpu" and _interpreting()


def _check_device(t: torch.Tensor) -> None:
    if available(t.device):
        return
    if _HAS_TRITON and _mode_mismatch():
        raise NotImplementedError("triton was imported before TRITON_INTERPRET was set (or unset): "
                                  "its library is in the other mode; set it before anything imports triton")
    raise NotImplementedError(f"triton kernels cannot run on {t.device.type}"
                              + (" without TRITON_INTERPRET=1" if t.device.type == "cpu" else ""))


@functools.cache
def _jit_cached(fn, interpret: bool):
    import triton  # `interpret` is only the cache key: triton.jit reads the environment itself
    import triton.language

    # Kernel modules leave their `tl` global unbound so that importing them imports no triton
    # (their annotations are strings, from __future__); bind it before the first wrap.
    for name, module in list(sys.modules.items()):
        if name.startswith(__name__ + ".") and getattr(module, "tl", 0) is None:
            module.tl = triton.language
    return triton.jit(fn)


def _jit(fn):
    """The jit-wrapped kernel for the current mode (compiled or interpreted)."""
    return _jit_cached(fn, _interpreting())


if _HAS_TRITON:  # imported after the helpers above, which the kernel modules use
    from .cross_entropy import cross_entropy  # noqa: E402
    from .kl_div import kl_div  # noqa: E402
    from .linear_cross_entropy import linear_cross_entropy  # noqa: E402
else:
    def _missing(*args, **kwargs):
        raise NotImplementedError("triton is not installed")

    cross_entropy = kl_div = linear_cross_entropy = _missing

__all__ = ["available", "cross_entropy", "kl_div", "linear_cross_entropy"]
