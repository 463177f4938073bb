"""The loss families, one module each; this package lists them and checks a case's options.

Every family mirrors a torch-style loss function, so torch's own functions are implementations like
any other. A family's options are the *data* side of a variant (how inputs are generated); the keyword
arguments an implementation receives come from the family's `inputs`. Adding a family: one module
here with a `Family` subclass (base.py says what it must state), listed in FAMILIES below, and its
implementations in lossbench/impls and lossbench/kernels.
"""
from __future__ import annotations

from typing import Any

from ..errors import UsageError
from ..inputs import IGNORE_INDEX
from . import ce, jsd, kl, linear_ce, nll
from .base import MODES, Family

__all__ = ["FAMILIES", "Family", "IGNORE_INDEX", "INPUT_DISTS", "MODES", "get_family", "normalize_options"]

FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (nll, ce, kl, linear_ce, jsd)}

INPUT_DISTS = ("normal", "peaked")


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UsageError(f"unknown family {name!r} (known: {', '.join(FAMILIES)})") from None


def normalize_options(family: Family, options: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and reject options or values the family does not know."""
    unknown = set(options) - set(family.options)
    if unknown:
        raise UsageError(
            f"family {family.name!r} has no option {sorted(unknown)[0]!r} "
            f"(options: {', '.join(family.options)})"
        )
    full = {**family.options, **options}
    if full["reduction"] not in family.reductions:
        raise UsageError(
            f"family {family.name!r}: reduction {full['reduction']!r} not one of {family.reductions}"
        )
    family.validate(full)
    return full
