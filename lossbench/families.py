"""The loss families: their calling contract and the case options each one understands.

Every family mirrors a `torch.nn.functional` function, so torch's own functions are implementations
like any other. Case options are the *data* side of a variant (how inputs are generated); the
keyword arguments an implementation receives are derived from them in `cases.make_inputs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    signature: str
    reductions: tuple[str, ...]
    default_reduction: str
    # option name -> default value; a case states only what differs from these.
    options: dict[str, Any] = field(default_factory=dict)
    shape_form: str = "NxC"  # how --shape and suites give its sizes: "NxC", or "NxHxV" for linear_ce

    @property
    def shape_dims(self) -> int:
        return self.shape_form.count("x") + 1


# Options shared by every family: the loss reduction, torch's (N, C, d) layout (spatial=d, 0 for
# (N, C)) and a non-contiguous (class-dimension-strided) input.
_COMMON = {"spatial": 0, "noncontig": False}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="nll",
            title="NLLLoss",
            signature='fn(log_probs, target, *, weight=None, ignore_index=-100, reduction="mean")',
            reductions=("none", "mean", "sum"),
            default_reduction="mean",
            options={"reduction": "mean", "weight": False, "ignore_frac": 0.0, **_COMMON},
        ),
        Family(
            name="ce",
            title="CrossEntropyLoss",
            signature='fn(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0)',
            reductions=("none", "mean", "sum"),
            default_reduction="mean",
            options={
                "reduction": "mean",
                "weight": False,
                "ignore_frac": 0.0,
                "label_smoothing": 0.0,
                "target": "index",  # or "prob": class-probability targets
                **_COMMON,
            },
        ),
        Family(
            name="kl",
            title="KLDivLoss",
            signature='fn(input, target, *, reduction="batchmean", log_target=False)',
            reductions=("none", "batchmean", "sum", "mean"),
            default_reduction="batchmean",
            options={"reduction": "batchmean", "log_target": False, **_COMMON},
        ),
        Family(
            name="linear_ce",
            title="Linear + CrossEntropyLoss",
            signature='fn(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0)',
            reductions=("none", "mean", "sum"),
            default_reduction="mean",
            # The projection is part of the loss: hidden [N, H] @ weight[V, H].T (+ bias) -> logits [N, V].
            options={"reduction": "mean", "ignore_frac": 0.0, "label_smoothing": 0.0, "bias": False},
            shape_form="NxHxV",
        ),
    )
}

IGNORE_INDEX = -100
INPUT_DISTS = ("normal", "peaked")
MODES = ("fwd", "fwd_bwd", "bwd")


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
    if "label_smoothing" in full and not 0.0 <= float(full["label_smoothing"]) <= 1.0:
        raise UsageError(f"label_smoothing must be in [0, 1], not {full['label_smoothing']}")
    if family.name == "ce":
        if full["target"] not in ("index", "prob"):
            raise UsageError(f"ce: target must be 'index' or 'prob', not {full['target']!r}")
        if full["target"] == "prob" and full["ignore_frac"]:
            raise UsageError("ce: ignore_frac needs index targets (probability targets have no ignore_index)")
    if "ignore_frac" in full and not 0.0 <= float(full["ignore_frac"]) <= 1.0:
        raise UsageError(f"ignore_frac must be in [0, 1], not {full['ignore_frac']}")
    if int(full.get("spatial", 0)) < 0:
        raise UsageError(f"spatial must be >= 0, not {full['spatial']}")
    return full
