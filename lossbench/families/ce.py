"""CrossEntropyLoss: log_softmax and NLL in one, with label smoothing and class-probability targets."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..inputs import nbytes
from . import f64
from .base import Family
from .nll import LAYOUT_OPTIONS, index_target_inputs, validate_layout


def reference(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Cross-entropy from its definition; linear_ce's reference applies it to the projected logits."""
    log_p = f64.log_softmax(logits, 1)
    n_classes = logits.shape[1]
    wc = f64.class_weights(weight, logits.dim())
    eps = float(label_smoothing)
    if target.is_floating_point():  # class probabilities
        t = target * (1 - eps) + eps / n_classes
        per_row = -(wc * t * log_p).sum(1)
        rows = torch.tensor(float(per_row.numel()), dtype=per_row.dtype, device=per_row.device)
        return f64.reduce(per_row, reduction, rows)
    nll_row, w = f64.picked_and_mask(log_p, target, weight, ignore_index)
    smooth_row = -(wc * log_p).sum(1) * (target != ignore_index)
    per_row = (1 - eps) * nll_row + (eps / n_classes) * smooth_row
    return f64.reduce(per_row, reduction, w.sum())


def mean_denominator(target: torch.Tensor, ignore_index: int, weight: torch.Tensor | None) -> torch.Tensor:
    if target.is_floating_point():  # probability targets: every row counts once
        return torch.tensor(float(target.numel() // target.shape[1]), dtype=torch.float64)
    return f64.kept_weight_total(target, ignore_index, weight)


class CE(Family):
    name = "ce"
    title = "CrossEntropyLoss"
    signature = 'fn(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0)'
    reductions = ("none", "mean", "sum")
    default_reduction = "mean"
    options = {"reduction": "mean", "weight": False, "ignore_frac": 0.0, "label_smoothing": 0.0,
               "target": "index",  # or "prob": class-probability targets
               **LAYOUT_OPTIONS}
    shape_form = "NxC"
    default_shape = "2048x1000"
    axis_label = "classes c"
    baseline_description = "F.cross_entropy"
    row_args = (0, 1)

    def validate(self, options):
        self.check_fraction("ignore_frac", options)
        self.check_fraction("label_smoothing", options)
        validate_layout(options)
        if options["target"] not in ("index", "prob"):
            raise UsageError(f"ce: target must be 'index' or 'prob', not {options['target']!r}")
        if options["target"] == "prob" and options["ignore_frac"]:
            raise UsageError("ce: ignore_frac needs index targets (probability targets have no ignore_index)")

    def inputs(self, case, gen):
        return index_target_inputs(case, gen, log_probs_first=False)

    def reference(self, *args, **kwargs):
        return reference(*args, **kwargs)

    def mean_denominator(self, inputs):
        return mean_denominator(inputs.args[1], inputs.kwargs["ignore_index"], inputs.kwargs.get("weight"))

    def bytes_moved(self, inputs, loss_numel, mode):
        # logits read once; the gradient written once
        x, target = inputs.args
        extra = nbytes(target) + nbytes(inputs.kwargs.get("weight"))
        out = loss_numel * x.element_size()
        return {"fwd": nbytes(x) + extra + out, "fwd_bwd": 2 * nbytes(x) + extra + out, "bwd": 2 * nbytes(x) + extra}[mode]

    def output_bytes(self, inputs, loss_numel):
        return self.dense_output_bytes(inputs, loss_numel)

    @property
    def baseline(self):
        return F.cross_entropy


FAMILY = CE()
