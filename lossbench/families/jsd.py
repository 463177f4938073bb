"""Generalized Jensen-Shannon divergence, as Liger-Kernel defines it (LigerJSD), for distillation.

    fn(log_q, log_p, *, label=None, beta=0.5, ignore_index=-100, reduction="batchmean")

log_q: the student's log-probabilities [N, V] (the input that gets a gradient); log_p: the teacher's
[N, V] (data). With M = beta * P + (1 - beta) * Q, per element:
    0 < beta < 1:  beta * P * (log P - log M) + (1 - beta) * Q * (log Q - log M)
                   = beta * KL(P || M) + (1 - beta) * KL(Q || M)
    beta == 0:     P * (log P - log Q), the forward KL(P || Q)    (Liger's special case: the general
    beta == 1:     Q * (log Q - log P), the reverse KL(Q || P)     form would be 0 at both ends)
Rows whose `label` is ignore_index contribute nothing. "batchmean" divides the total by the kept rows
(all N without labels): Liger's normalisation, its only one. "sum" and "none" (one loss per row, 0 on
ignored rows) are ours; an empty batchmean is NaN with a zero gradient, as torch's empty means.
torch has no JSD: the baseline is written from torch primitives (`functional` below).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..inputs import IGNORE_INDEX, Inputs, ignored, logits, nbytes, scalar_grad_output
from . import f64
from .base import Family


def _pointwise(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """The per-element divergence, in log_q's dtype (used by the float64 reference and the baseline)."""
    if beta == 0:
        return log_p.exp() * (log_p - log_q)
    if beta == 1:
        return log_q.exp() * (log_q - log_p)
    # log M without forming M: it underflows where both probabilities are tiny
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * log_p.exp() * (log_p - log_m) + (1 - beta) * log_q.exp() * (log_q - log_m)


def _per_row(log_q, log_p, label, beta, ignore_index):
    rows = _pointwise(log_q, log_p, float(beta)).sum(1)
    if label is None:
        return rows, torch.tensor(float(rows.numel()), dtype=rows.dtype, device=rows.device)
    keep = label != ignore_index
    # where(), not a 0/1 product: an ignored row's inf or NaN must not reach the total
    return torch.where(keep, rows, torch.zeros_like(rows)), keep.sum().to(rows.dtype)


def functional(log_q, log_p, *, label=None, beta=0.5, ignore_index=-100, reduction="batchmean"):
    """JSD from torch primitives, as a user without a fused kernel writes it (the baseline)."""
    if reduction not in JSD.reductions:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    rows, kept = _per_row(log_q, log_p, label, beta, ignore_index)
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / kept


class JSD(Family):
    name = "jsd"
    title = "Jensen-Shannon divergence (Liger's generalized JSD)"
    signature = 'fn(log_q, log_p, *, label=None, beta=0.5, ignore_index=-100, reduction="batchmean")'
    reductions = ("none", "batchmean", "sum")
    default_reduction = "batchmean"
    # ignore_frac > 0 passes a label per row, that fraction of them ignore_index; 0 passes no label.
    options = {"reduction": "batchmean", "beta": 0.5, "ignore_frac": 0.0}
    shape_form = "NxC"
    default_shape = "2048x1000"
    axis_label = "vocabulary V"
    baseline_description = "JSD from torch primitives (logaddexp, exp): torch has no JSD"
    row_args = (0, 1, "label")

    def validate(self, options):
        if isinstance(options["beta"], bool) or not isinstance(options["beta"], (int, float)):
            raise UsageError(f"jsd: beta must be a number in [0, 1], not {options['beta']!r}")
        self.check_fraction("beta", options)
        self.check_fraction("ignore_frac", options)

    def inputs(self, case, gen):
        opts, dtype, device = case.options, case.torch_dtype, torch.device(case.device)
        true_class = torch.randint(0, case.c, (case.n,), generator=gen)
        # `peaked` makes both distributions confident on the same class, as a distilled student is
        log_q = F.log_softmax(logits(case, gen, true_class), -1)
        log_p = F.log_softmax(logits(case, gen, true_class), -1)
        label = ignored(true_class, opts["ignore_frac"], gen).to(device) if opts["ignore_frac"] else None
        kwargs = {"label": label, "beta": float(opts["beta"]), "ignore_index": IGNORE_INDEX,
                  "reduction": opts["reduction"]}
        grad_output = torch.randn(case.n, generator=gen) if opts["reduction"] == "none" else scalar_grad_output(gen)
        return Inputs([log_q.to(dtype).to(device), log_p.to(dtype).to(device)], kwargs, (0,),
                      grad_output.to(dtype).to(device))

    def reference(self, log_q, log_p, *, label=None, beta=0.5, ignore_index=-100, reduction="batchmean"):
        rows, kept = _per_row(log_q, log_p, label, beta, ignore_index)
        return f64.reduce(rows, reduction, kept)

    def mean_denominator(self, inputs):
        label, n = inputs.kwargs.get("label"), inputs.args[0].shape[0]
        if label is None:
            return torch.tensor(float(n), dtype=torch.float64)
        return (label != inputs.kwargs["ignore_index"]).sum().double()

    def bytes_moved(self, inputs, loss_numel, mode):
        # both distributions read once; the gradient (which needs both) written once
        log_q, log_p = inputs.args
        extra = nbytes(log_p) + nbytes(inputs.kwargs.get("label"))
        out = loss_numel * log_q.element_size()
        return {"fwd": nbytes(log_q) + extra + out, "fwd_bwd": 2 * nbytes(log_q) + extra + out,
                "bwd": 2 * nbytes(log_q) + extra}[mode]

    def output_bytes(self, inputs, loss_numel):
        return self.dense_output_bytes(inputs, loss_numel)

    @property
    def baseline(self):
        return functional


FAMILY = JSD()
