"""What an implementation is (its function and declared capabilities), and how lossbench's own
implementations declare themselves.

A leaf module: lossbench/impls declare their implementations here (`builtin`), and the registry
(registry.py) imports lossbench/impls and collects them. So the registry depends on the built-ins
and the built-ins never import the registry: no import circle between them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .families import FAMILIES, get_family


@dataclass(frozen=True)
class Implementation:
    family: str
    name: str
    fn: Callable[..., Any]
    devices: tuple[str, ...] | None = None  # device types ("cpu", "cuda"); None = any
    dtypes: tuple[str, ...] | None = None  # dtype names; None = any
    # Options it cannot handle: "weight" (any non-default value) or "reduction=none" (that value).
    unsupported: tuple[str, ...] = ()
    mutates_inputs: bool = False  # writes into its inputs (gets fresh inputs for every call)
    grad_in_forward: bool = False  # computes the gradient in forward: its fwd time is not comparable
    compiles: bool = False  # first call compiles: compile_ms is reported apart from steady state
    triton: bool = False  # runs Triton kernels: on the CPU only under Triton's interpreter, whose time means nothing
    collective: bool = False  # calls collectives: every rank of the process group must make the same call
    description: str = ""
    # Where its semantics knowingly differ from torch's (e.g. a clamp): recorded in every row.
    convention: str = ""
    # A run-time note for the row's convention, known only where it runs (e.g. "native kernel
    # unavailable, Python fallback (no C++ compiler)"): called with the case, in the process that runs
    # it; None or "" adds nothing.
    note: Callable[[Any], str | None] | None = None

    def convention_for(self, case) -> str | None:
        """The row's `convention`: the static one and the run-time note, joined by "; " (None when neither)."""
        parts = [self.convention] if self.convention else []
        if self.note is not None:
            try:
                extra = self.note(case)
            except Exception as exc:  # a note must never fail a row
                extra = f"note unavailable: {type(exc).__name__}"
            if extra:
                parts.append(extra)
        return "; ".join(parts) or None

    def why_unsupported(self, case) -> str | None:
        """A reason when the declared capabilities exclude this case, else None."""
        device_type = case.device.split(":")[0]
        if self.devices is not None and device_type not in self.devices:
            return f"{self.name} does not run on {device_type}"
        if self.dtypes is not None and case.dtype not in self.dtypes:
            return f"{self.name} does not support {case.dtype}"
        defaults = FAMILIES[self.family].options
        opts = case.options
        for item in self.unsupported:
            key, _, value = item.partition("=")
            if (value and str(opts.get(key)) == value) or (not value and opts.get(key) != defaults.get(key)):
                return f"{self.name} does not support {key}={opts.get(key)}"
        return None


# Every comparison (speedup, err_ratio_vs_torch, mem ratio) is made against this implementation.
BASELINE = "torch_functional"


# lossbench's own implementations, in declaration order (the registry adds them before any plugin's).
BUILTINS: list[Implementation] = []


def make(fn: Callable[..., Any], *, family: str, name: str, devices: Iterable[str] | None = None,
         dtypes: Iterable[str] | None = None, unsupported: Iterable[str] = (), mutates_inputs: bool = False,
         grad_in_forward: bool = False, compiles: bool = False, triton: bool = False, collective: bool = False,
         description: str = "", convention: str = "",
         note: Callable[[Any], str | None] | None = None) -> Implementation:
    """An Implementation of `fn` under (family, name); its description defaults to fn's first doc line."""
    get_family(family)
    doc = description or (fn.__doc__ or "").strip().split("\n")[0]
    return Implementation(family, name, fn, tuple(devices) if devices is not None else None,
                          tuple(dtypes) if dtypes is not None else None, tuple(unsupported), mutates_inputs,
                          grad_in_forward, compiles, triton, collective, doc, convention, note)


def builtin(**capabilities) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for lossbench's own implementations (the keywords of `make`): declares fn, returns it unchanged."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        BUILTINS.append(make(fn, **capabilities))
        return fn

    return deco
