"""Linear + CrossEntropyLoss: hidden [N, H] @ weight[V, H].T (+ bias) -> logits [N, V], then
cross-entropy. The projection is part of the loss, so fused implementations need never hold N x V."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..inputs import IGNORE_INDEX, Inputs, ignored, nbytes, scalar_grad_output
from . import ce
from .base import Family


def _functional(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    return F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)


class LinearCE(Family):
    name = "linear_ce"
    title = "Linear + CrossEntropyLoss"
    signature = ('fn(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean", '
                 'label_smoothing=0.0)')
    reductions = ("none", "mean", "sum")
    default_reduction = "mean"
    options = {"reduction": "mean", "ignore_frac": 0.0, "label_smoothing": 0.0, "bias": False}
    shape_form = "NxHxV"
    default_shape = "512x256x4096"
    axis_label = "vocabulary V"
    baseline_description = "F.linear + F.cross_entropy"
    row_args = (0, 2)

    def validate(self, options):
        self.check_fraction("ignore_frac", options)
        self.check_fraction("label_smoothing", options)

    def inputs(self, case, gen):
        """hidden [N, H], weight [V, H] (scaled so logits are ~N(0, 1)), optional bias, targets.
        `peaked`: each hidden row is pushed along its target's weight row until the true class's softmax
        reaches a draw from U(0.9, 0.999) (exact for the first-order logit, close after the push)."""
        opts, dtype, device = case.options, case.torch_dtype, torch.device(case.device)
        true_class = torch.randint(0, case.c, (case.n,), generator=gen)
        hidden = torch.randn(case.n, case.h, generator=gen)
        weight = torch.randn(case.c, case.h, generator=gen) / math.sqrt(case.h)
        bias = 0.1 * torch.randn(case.c, generator=gen) if opts["bias"] else None
        if case.input_dist == "peaked":
            z = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
            p = 0.9 + 0.099 * torch.rand(case.n, generator=gen, dtype=torch.float64)
            others = z.scatter(1, true_class.unsqueeze(1), -math.inf).logsumexp(1)
            want = torch.log(p / (1 - p)) + others
            w_y = weight.double()[true_class]
            push = (want - z.gather(1, true_class.unsqueeze(1)).squeeze(1)) / (w_y * w_y).sum(1)
            hidden = (hidden.double() + push.unsqueeze(1) * w_y).float()
        target = ignored(true_class, opts["ignore_frac"], gen).to(device)
        kwargs: dict[str, Any] = {"bias": None if bias is None else bias.to(dtype).to(device),
                                  "ignore_index": IGNORE_INDEX, "reduction": opts["reduction"],
                                  "label_smoothing": float(opts["label_smoothing"])}
        grad_output = torch.randn(case.n, generator=gen) if opts["reduction"] == "none" else scalar_grad_output(gen)
        differentiable = (0, 1, "bias") if bias is not None else (0, 1)
        return Inputs([hidden.to(dtype).to(device), weight.to(dtype).to(device), target], kwargs, differentiable,
                      grad_output.to(dtype).to(device))

    def reference(self, hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0):
        logits = hidden @ weight.t()
        if bias is not None:
            logits = logits + bias
        return ce.reference(logits, target, ignore_index=ignore_index, reduction=reduction,
                            label_smoothing=label_smoothing)

    def mean_denominator(self, inputs):
        return ce.mean_denominator(inputs.args[2], inputs.kwargs["ignore_index"], None)

    def bytes_moved(self, inputs, loss_numel, mode):
        hidden, weight, target = inputs.args
        operands = nbytes(hidden) + nbytes(weight) + nbytes(inputs.kwargs.get("bias"))
        out = loss_numel * hidden.element_size()
        # fwd reads hidden and weight once; with gradients, their gradients are written once too.
        return {"fwd": operands + nbytes(target) + out, "fwd_bwd": 2 * operands + nbytes(target) + out,
                "bwd": 2 * operands + nbytes(target)}[mode]

    def output_bytes(self, inputs, loss_numel):
        return self.dense_output_bytes(inputs, loss_numel)

    @property
    def baseline(self):
        return _functional


FAMILY = LinearCE()
