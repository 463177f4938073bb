"""Triton loss kernels: cross-entropy, KL divergence and chunked linear + cross-entropy.

Without a GPU they run under the Triton interpreter (TRITON_INTERPRET=1), which is slow but
executes the same kernel code. `triton.jit` decides between compiling and interpreting from the
environment at the moment it wraps a function, and triton.language wraps its own library (tl.sum,
tl.max, ...) when it is first imported. So this package imports triton only at the first launch
(the kernel modules get their `tl` global then, see _jit), and refuses to run when triton was
already imported in the other mode.

Each launcher takes its launch configuration (argument types, constexprs, num_warps) from one pure
function (ce_config, kl_config) and launches through launch(), which checks the arguments against
it. The kernel modules' variants() run those functions over their whole input domain; aot.py
compiles every variant ahead of time (no GPU needed) for its registers, spills and shared memory.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types
from dataclasses import dataclass

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


FP_FUSION = True  # passed explicitly by every launch and every AOT compile: they build the same code

# Triton's name for each tensor dtype the launchers pass (the "*fp32" of a pointer's signature).
_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                torch.int64: "i64", torch.int32: "i32"}


def triton_type(dtype: torch.dtype) -> str:
    return _TRITON_TYPE[dtype]


def int_type(value: int) -> str:
    """Triton's type for a Python int argument: it specialises by value (ints that fit are i32)."""
    return "i32" if -2**31 <= value < 2**31 else "i64"


@dataclass(frozen=True)
class TritonDtype:
    """A triton.language dtype by name ("float32"), for constexprs chosen before triton is imported."""
    name: str

    def resolve(self):
        import triton.language

        return getattr(triton.language, self.name)


@dataclass(frozen=True)
class LaunchConfig:
    """Everything a launch fixes at compile time: the type of every runtime argument (in the kernel's
    order), the constexprs and num_warps. A launcher gets it from one pure function and launches with
    it (launch()); the AOT compile (aot.py) compiles exactly it."""
    signature: dict  # argument name -> triton type ("*bf16", "i32", "fp32")
    constexprs: dict  # name -> value (TritonDtype for dtypes)
    num_warps: int

    def kernel_constexprs(self) -> dict:
        return {k: v.resolve() if isinstance(v, TritonDtype) else v for k, v in self.constexprs.items()}

    def options(self) -> dict:
        return {"num_warps": self.num_warps, "enable_fp_fusion": FP_FUSION}

    def key(self):
        return (tuple(self.signature.items()), tuple(self.constexprs.items()), self.num_warps)


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: `fn` (the plain Python kernel, wrapped by _jit) under `config`."""
    kernel: str  # short name: "ce", "kl"
    name: str  # human readable: dtype, flags, BLOCK, num_warps
    dtype: str  # the input dtype's name ("bfloat16")
    fn: object
    config: LaunchConfig


def unique_variants(kernel: str, fn, configs):
    """Variants for the distinct configs among (dtype name, name, config) triples, first name kept."""
    seen = set()
    for dtype, name, cfg in configs:
        if cfg.key() not in seen:
            seen.add(cfg.key())
            yield Variant(kernel, name, dtype, fn, cfg)


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPE.get(value.dtype, str(value.dtype))
    if isinstance(value, bool):
        return "u1"
    if isinstance(value, int):
        return int_type(value)
    if isinstance(value, float):
        return "fp32"
    return type(value).__name__


def check_args(fn, config: LaunchConfig, args: dict) -> None:
    """Raises AssertionError unless `args` (runtime arguments by name) are, in order, the arguments
    `config` declares, of the declared types: what triton will make of them. (An int equal to 1
    triton specialises to a constant: a simpler kernel than the declared i32 one compiled ahead of
    time; so does a 16-divisible int or pointer, with a divisibility hint.)"""
    if list(args) != list(config.signature):
        raise AssertionError(f"{fn.__name__}: arguments {list(args)}, but the config declares "
                             f"{list(config.signature)}")
    wrong = [f"{k}: {_arg_type(v)} (declared {config.signature[k]})" for k, v in args.items()
             if _arg_type(v) != config.signature[k]]
    if wrong:
        raise AssertionError(f"{fn.__name__}: launch arguments differ from its config: " + ", ".join(wrong))


# check_args costs ~10 us of host time per launch, inside the timed region of small cases: the tests
# turn it on (tests/conftest.py), so every launch they make is checked; measurements leave it off.
CHECK_LAUNCHES = os.environ.get("LOSSBENCH_CHECK_LAUNCHES") == "1"


def launch(fn, grid, config: LaunchConfig, args: dict) -> None:
    """Launches kernel `fn` with `args` (runtime arguments by name, in the kernel's order) under
    `config`, checked first (check_args) when CHECK_LAUNCHES: the AOT table (aot.py) then shows
    what really runs."""
    if CHECK_LAUNCHES:
        check_args(fn, config, args)
    _jit(fn)[grid](*args.values(), **config.kernel_constexprs(), **config.options())


def device_function(fn):
    """Marks a helper that kernels call: _jit rebinds it, where kernel modules hold it, to its jit
    wrap for the current mode (the compiler refuses calls to plain Python functions)."""
    fn._lossbench_device_function = True
    return fn


@functools.cache
def _jit_device(fn, interpret: bool):
    import triton

    return triton.jit(fn)


def _bind(namespace: dict, interpret: bool) -> None:
    """Binds `tl` where a module left it None and replaces marked helpers by their jit wraps."""
    import triton.language

    if namespace.get("tl", 0) is None:
        namespace["tl"] = triton.language
    for name, value in list(namespace.items()):
        if isinstance(value, types.FunctionType) and getattr(value, "_lossbench_device_function", False):
            wrapped = _jit_device(value, interpret)
            namespace[name] = wrapped
            _bind(value.__globals__, interpret)  # the helper's own module


@functools.cache
def _jit_cached(fn, interpret: bool):
    import triton  # `interpret` is only the cache key: triton.jit reads the environment itself

    # Kernel modules leave their `tl` global unbound so that importing them imports no triton
    # (their annotations are strings, from __future__), and hold their helpers unwrapped: bind
    # both before the first wrap, in this package's modules and in the kernel's own module.
    for name, module in list(sys.modules.items()):
        if name.startswith(__name__ + ".") and module is not None:
            _bind(vars(module), interpret)
    _bind(fn.__globals__, interpret)
    return triton.jit(fn)


def _jit(fn):
    """The jit-wrapped kernel for the current mode (compiled or interpreted)."""
    return _jit_cached(fn, _interpreting())


if _HAS_TRITON:  # imported after the helpers above, which the kernel modules use
    from .cross_entropy import cross_entropy  # noqa: E402
    from .jsd import jsd  # noqa: E402
    from .kl_div import kl_div  # noqa: E402
    from .linear_cross_entropy import linear_cross_entropy  # noqa: E402
else:
    def _missing(*args, **kwargs):
        raise NotImplementedError("triton is not installed")

    cross_entropy = jsd = kl_div = linear_cross_entropy = _missing

__all__ = ["available", "cross_entropy", "jsd", "kl_div", "linear_cross_entropy"]
