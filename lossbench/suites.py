"""Suites are TOML data a user can copy and edit (see suites/quick.toml); this module expands them.

Top-level keys give defaults (and `impls`, the implementations the suite measures unless --impl
says otherwise; without it, every registered one); each [[group]] names `families` and may override `shapes`, `dtypes`,
`modes`, `input_dists`; every other key in a group is a family option, and a list of values expands
as a grid. The CLI's filters then narrow the plan (--family, --dtype, --mode, --input-dist) or
replace its shapes (--shape).
"""
from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cases import Case, parse_dtype, parse_shape
from .errors import UsageError
from .families import FAMILIES, INPUT_DISTS, MODES, get_family

SUITE_DIR = Path(__file__).parent / "suites"
AXES = ("shapes", "dtypes", "modes", "input_dists")
# Each family takes the shapes of its own form from a list: NxC for nll/ce/kl, NxHxV for linear_ce.
DEFAULTS = {"shapes": ["4096x8192", "2048x512x32768"], "dtypes": ["float32"], "modes": list(MODES),
            "input_dists": ["normal"]}
DEFAULT_BUDGET_S = 0.5


@dataclass
class Plan:
    items: list[tuple[Case, tuple[str, ...]]] = field(default_factory=list)  # (case, modes)
    budget_s: float = DEFAULT_BUDGET_S
    name: str = "default"
    impls: list[str] | None = None  # the suite's implementations (top-level `impls`); None: every one


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITE_DIR.glob("*.toml"))


def load_suite(name_or_file: str) -> tuple[str, dict[str, Any]]:
    path = Path(name_or_file)
    if not (name_or_file.endswith(".toml") and path.is_file()):
        path = SUITE_DIR / f"{name_or_file}.toml"
        if not path.is_file():
            raise UsageError(f"unknown suite {name_or_file!r} (built in: {', '.join(suite_names())}; or a .toml file)")
    try:
        return path.stem, tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"suite {str(path)!r} is not valid TOML: {exc}") from None


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _check_axis(axis: str, values: list[str]) -> None:
    for v in values:
        if axis == "dtypes":
            parse_dtype(v)
        elif axis == "modes" and v not in MODES:
            raise UsageError(f"unknown mode {v!r} (known: {', '.join(MODES)})")
        elif axis == "input_dists" and v not in INPUT_DISTS:
            raise UsageError(f"unknown input_dist {v!r} (known: {', '.join(INPUT_DISTS)})")
        elif axis == "shapes":
            parse_shape(v)


def build_plan(suite: dict[str, Any] | None, *, devices: list[str], name: str = "default",
               families: list[str] | None = None, dtypes: list[str] | None = None,
               modes: list[str] | None = None, shapes: list[str] | None = None,
               input_dists: list[str] | None = None) -> Plan:
    """Expand a suite (or, without one, each family's torch-default case) under the CLI's filters."""
    filters = {"dtypes": dtypes, "modes": modes, "input_dists": input_dists}
    for axis, values in (*filters.items(), ("shapes", shapes)):
        if values is not None:
            _check_axis(axis, values)
    for fam in families or []:
        get_family(fam)

    if suite is None:
        top = {**DEFAULTS, **{axis: values for axis, values in filters.items() if values}}
        groups = [{"families": list(FAMILIES)}]
        budget = DEFAULT_BUDGET_S
    else:
        unknown = set(suite) - {"description", "budget_s", "group", "impls", *AXES}
        if unknown:
            raise UsageError(f"suite {name!r}: unknown key {sorted(unknown)[0]!r}")
        top = {**DEFAULTS, **{a: suite[a] for a in AXES if a in suite}}
        groups = suite.get("group", [])
        budget = float(suite.get("budget_s", DEFAULT_BUDGET_S))

    plan: dict[Case, list[str]] = {}
    for group in groups:
        axes = {a: _as_list(group.get(a, top[a])) for a in AXES}
        for a, values in axes.items():
            _check_axis(a, values)
        if shapes:
            axes["shapes"] = shapes
        for axis, values in filters.items():
            if values:
                axes[axis] = [v for v in axes[axis] if v in values]
        option_keys = [k for k in group if k not in (*AXES, "families")]
        option_grid = [dict(zip(option_keys, combo))
                       for combo in itertools.product(*(_as_list(group[k]) for k in option_keys))]
        for fam in _as_list(group.get("families", [])):
            family = get_family(fam)
            if families and fam not in families:
                continue
            fam_shapes = [dims for dims in map(parse_shape, axes["shapes"]) if len(dims) == family.shape_dims]
            for dims, dtype, dist, opts, device in itertools.product(
                    fam_shapes, axes["dtypes"], axes["input_dists"], option_grid, devices):
                case = Case.from_shape(fam, dims, dtype, device, dist, opts)
                merged = plan.setdefault(case, [])
                merged += [m for m in axes["modes"] if m not in merged]
    items = [(case, tuple(m for m in MODES if m in ms)) for case, ms in plan.items() if ms]
    if not items:
        raise UsageError("nothing to run: the filters leave no case (check --family, --dtype, --mode, "
                         "--input-dist, and that --shape has the family's form: NxC, or NxHxV for linear_ce)")
    impls = None if suite is None or "impls" not in suite else [str(i) for i in _as_list(suite["impls"])]
    return Plan(items, budget, name, impls)
