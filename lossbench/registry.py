"""The one registry of implementations, and plugin loading.

    @lossbench.register(family="ce", name="my_fused_ce", devices=("cuda",), unsupported=("weight",))
    def my_fused_ce(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        ...

Capabilities are declarations; whatever they miss, an implementation may still raise
NotImplementedError for a case, which yields an `unsupported` row, never a dropped one.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import UsageError
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

_REGISTRY: dict[tuple[str, str], Implementation] = {}
_LOADED_PLUGINS: set[str] = set()


def _origin(fn: Callable[..., Any]) -> tuple[str, str]:
    return getattr(fn, "__module__", "?"), getattr(fn, "__qualname__", repr(fn))


def register(*, family: str, name: str, devices: Iterable[str] | None = None,
             dtypes: Iterable[str] | None = None, unsupported: Iterable[str] = (),
             mutates_inputs: bool = False, grad_in_forward: bool = False, compiles: bool = False,
             triton: bool = False, collective: bool = False, description: str = "", convention: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that adds `fn` to the registry under (family, name) and returns fn unchanged."""
    get_family(family)
    _load_builtins()  # so a plugin imported first cannot take a built-in name

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        old = _REGISTRY.get((family, name))
        if old is not None and _origin(old.fn) != _origin(fn):  # re-importing a module replaces its own
            raise UsageError(f"implementation {family}/{name} is already registered by {_origin(old.fn)[0]}")
        doc = description or (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[(family, name)] = Implementation(
            family, name, fn,
            tuple(devices) if devices is not None else None,
            tuple(dtypes) if dtypes is not None else None,
            tuple(unsupported), mutates_inputs, grad_in_forward, compiles, triton, collective, doc, convention,
        )
        return fn

    return deco


def implementations(family: str | None = None) -> list[Implementation]:
    _load_builtins()
    order = list(FAMILIES)
    chosen = [impl for (fam, _), impl in _REGISTRY.items() if family in (None, fam)]
    return sorted(chosen, key=lambda impl: order.index(impl.family))  # stable: registration order within a family


def get(family: str, name: str) -> Implementation:
    _load_builtins()
    try:
        return _REGISTRY[(family, name)]
    except KeyError:
        raise UsageError(f"unknown implementation {name!r} for family {family!r}") from None


def _load_builtins() -> None:
    from . import impls  # noqa: F401  (registers on import)


def load_plugin(spec: str) -> None:
    """Import a module by name or a .py file by path; its @register calls add implementations."""
    _load_builtins()
    key = str(Path(spec).resolve()) if spec.endswith(".py") else spec
    if key in _LOADED_PLUGINS:
        return
    try:
        path = Path(spec)
        if spec.endswith(".py"):
            if not path.is_file():
                raise UsageError(f"plugin file {spec!r} not found")
            mod_name = f"lossbench_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except UsageError:
        raise
    except BaseException as exc:  # a plugin may fail in any way, SystemExit included
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UsageError(f"plugin {spec!r} failed to import: {type(exc).__name__}: {exc}") from None
    _LOADED_PLUGINS.add(key)
