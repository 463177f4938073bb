"""NLLLoss: -log p[y] per row from log-probabilities, with class weights and ignore_index.

Also the class-index machinery cross-entropy shares: index-target inputs, the kept-weight mean.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..inputs import IGNORE_INDEX, Inputs, class_last_shape, ignored, logits, nbytes, scalar_grad_output, to_class_dim1
from . import f64
from .base import Family

# Options shared by the class-dimension families: torch's (N, C, d) layout (spatial=d, 0 for (N, C))
# and a non-contiguous (class-dimension-strided) input.
LAYOUT_OPTIONS = {"spatial": 0, "noncontig": False}


def validate_layout(options: dict[str, Any]) -> None:
    if int(options.get("spatial", 0)) < 0:
        raise UsageError(f"spatial must be >= 0, not {options['spatial']}")


def placer(case, noncontig: bool):
    dtype, device = case.torch_dtype, torch.device(case.device)
    return lambda x: to_class_dim1(x.to(dtype), noncontig).to(device)


def index_target_inputs(case, gen: torch.Generator, log_probs_first: bool) -> Inputs:
    """nll's and ce's inputs: logits (or their log_softmax), class-index targets with a fraction
    ignored, optional class weights; or, for ce with target="prob", class-probability targets."""
    opts, dtype, device = case.options, case.torch_dtype, torch.device(case.device)
    row_shape = class_last_shape(case)[:-1]
    true_class = torch.randint(0, case.c, row_shape, generator=gen)
    place = placer(case, bool(opts["noncontig"]))
    z = logits(case, gen, true_class)
    first = F.log_softmax(z, -1) if log_probs_first else z
    if opts.get("target") == "prob":
        target = place(F.softmax(2 * torch.randn(row_shape + (case.c,), generator=gen), -1))
    else:
        target = ignored(true_class, opts["ignore_frac"], gen).to(device)
    weight = (0.5 + 1.5 * torch.rand(case.c, generator=gen)).to(dtype).to(device) if opts["weight"] else None
    kwargs: dict[str, Any] = {"reduction": opts["reduction"], "weight": weight, "ignore_index": IGNORE_INDEX}
    if "label_smoothing" in opts:
        kwargs["label_smoothing"] = float(opts["label_smoothing"])
    # reduction="none": one loss per row, in torch's order (N,) or (N, d)
    grad_output = torch.randn(row_shape, generator=gen) if opts["reduction"] == "none" else scalar_grad_output(gen)
    return Inputs([place(first), target], kwargs, (0,), grad_output.to(dtype).to(device))


class NLL(Family):
    name = "nll"
    title = "NLLLoss"
    signature = 'fn(log_probs, target, *, weight=None, ignore_index=-100, reduction="mean")'
    reductions = ("none", "mean", "sum")
    default_reduction = "mean"
    options = {"reduction": "mean", "weight": False, "ignore_frac": 0.0, **LAYOUT_OPTIONS}
    shape_form = "NxC"
    default_shape = "2048x1000"
    axis_label = "classes c"
    baseline_description = "F.nll_loss"
    row_args = (0, 1)

    def validate(self, options):
        self.check_fraction("ignore_frac", options)
        validate_layout(options)

    def inputs(self, case, gen):
        return index_target_inputs(case, gen, log_probs_first=True)

    def reference(self, log_probs, target, *, weight=None, ignore_index=-100, reduction="mean"):
        per_row, w = f64.picked_and_mask(log_probs, target, weight, ignore_index)
        return f64.reduce(per_row, reduction, w.sum())

    def mean_denominator(self, inputs):
        return f64.kept_weight_total(inputs.args[1], inputs.kwargs["ignore_index"], inputs.kwargs.get("weight"))

    def bytes_moved(self, inputs, loss_numel, mode):
        x, target = inputs.args
        size = x.element_size()
        extra = nbytes(target) + nbytes(inputs.kwargs.get("weight"))
        rows = nbytes(x) // (x.shape[1] * size)
        # the forward gathers one value per row; the gradient is dense, written once
        return {"fwd": rows * size + extra + loss_numel * size, "fwd_bwd": rows * size + extra + nbytes(x),
                "bwd": extra + nbytes(x)}[mode]

    def output_bytes(self, inputs, loss_numel):
        return self.dense_output_bytes(inputs, loss_numel)

    @property
    def baseline(self):
        return F.nll_loss


FAMILY = NLL()
