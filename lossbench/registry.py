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
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import UsageError
from .families import FAMILIES, get_family
from .implementation import BASELINE, BUILTINS, Implementation, make

__all__ = ["BASELINE", "Implementation", "get", "implementations", "load_plugin", "register"]


_REGISTRY: dict[tuple[str, str], Implementation] = {}
_LOADED_PLUGINS: set[str] = set()
_builtins_loaded = False


def _origin(fn: Callable[..., Any]) -> tuple[str, str]:
    return getattr(fn, "__module__", "?"), getattr(fn, "__qualname__", repr(fn))


def register(*, family: str, name: str, devices: Iterable[str] | None = None,
             dtypes: Iterable[str] | None = None, unsupported: Iterable[str] = (),
             mutates_inputs: bool = False, grad_in_forward: bool = False, compiles: bool = False,
             triton: bool = False, collective: bool = False, description: str = "", convention: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that adds `fn` to the registry under (family, name) and returns fn unchanged."""
    capabilities = dict(family=family, name=name, devices=devices, dtypes=dtypes, unsupported=unsupported,
                        mutates_inputs=mutates_inputs, grad_in_forward=grad_in_forward, compiles=compiles,
                        triton=triton, collective=collective, description=description, convention=convention)
    get_family(family)  # an unknown family fails here, before fn exists
    _load_builtins()  # so a plugin imported first cannot take a built-in name

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _add(make(fn, **capabilities))
        return fn

    return deco


def _add(impl: Implementation) -> None:
    old = _REGISTRY.get((impl.family, impl.name))
    if old is not None and _origin(old.fn) != _origin(impl.fn):  # re-importing a module replaces its own
        raise UsageError(f"implementation {impl.family}/{impl.name} is already registered by {_origin(old.fn)[0]}")
    _REGISTRY[(impl.family, impl.name)] = impl


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
    """Imports lossbench/impls (they declare themselves in implementation.BUILTINS) and adds them once."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    from . import impls  # noqa: F401  (declares on import)

    for impl in BUILTINS:
        _add(impl)
    _builtins_loaded = True


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
