"""float64 references, written from the definitions rather than by calling torch's loss in float64.

Conventions follow torch where the maths leaves a choice, and are stated here:
- mean over zero contributing rows (every target ignored, or all weights zero) is 0/0 = NaN, as torch
  returns; its gradient is zero (torch's backward never divides an ignored row by the zero total).
- cross-entropy with class weights and `reduction="mean"` divides by the summed weights of the
  non-ignored targets, the label-smoothing term included; probability targets divide by the row count.
- label smoothing mixes the target with the uniform distribution: (1 - eps) * onehot + eps / C.
- KL: pointwise target * (log target - input), with 0 * log 0 = 0; "mean" divides by every element,
  "batchmean" by the batch size (dim 0).
Gradients come from float64 autograd through these definitions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .cases import Inputs


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, NaN when den == 0, with the gradient of num / 1 (zero for masked rows) then."""
    safe = torch.where(den == 0, torch.ones_like(den), den)
    nan_if_empty = torch.where(den == 0, torch.full_like(den, float("nan")), torch.zeros_like(den)).detach()
    return num / safe + nan_if_empty


def _class_weights(weight: torch.Tensor | None, ndim: int) -> torch.Tensor | float:
    if weight is None:
        return 1.0
    return weight.view(1, -1, *([1] * (ndim - 2)))


def _picked_and_mask(log_p: torch.Tensor, target: torch.Tensor, weight, ignore_index: int):
    """-log p[y] per row, and the per-row weight w[y] (0 for ignored rows)."""
    keep = target != ignore_index
    safe_target = torch.where(keep, target, torch.zeros_like(target))
    picked = log_p.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    w = weight[safe_target] if weight is not None else torch.ones_like(picked)
    w = w * keep
    return -picked * w, w


def _reduce(per_row: torch.Tensor, reduction: str, mean_den: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return _ratio(per_row.sum(), mean_den)


def nll(log_probs, target, *, weight=None, ignore_index=-100, reduction="mean"):
    per_row, w = _picked_and_mask(log_probs, target, weight, ignore_index)
    return _reduce(per_row, reduction, w.sum())


def log_softmax(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    # log p_c = z_c - log sum_k exp(z_k), with the max subtracted first for range.
    m = logits.amax(dim, keepdim=True).detach()
    return logits - m - (logits - m).exp().sum(dim, keepdim=True).log()


def ce(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    log_p = log_softmax(logits, 1)
    n_classes = logits.shape[1]
    wc = _class_weights(weight, logits.dim())
    eps = float(label_smoothing)
    if target.is_floating_point():  # class probabilities
        t = target * (1 - eps) + eps / n_classes
        per_row = -(wc * t * log_p).sum(1)
        rows = torch.tensor(float(per_row.numel()), dtype=per_row.dtype, device=per_row.device)
        return _reduce(per_row, reduction, rows)
    nll_row, w = _picked_and_mask(log_p, target, weight, ignore_index)
    smooth_row = -(wc * log_p).sum(1) * (target != ignore_index)
    per_row = (1 - eps) * nll_row + (eps / n_classes) * smooth_row
    return _reduce(per_row, reduction, w.sum())


def kl(input, target, *, reduction="batchmean", log_target=False):
    if log_target:
        pointwise = target.exp() * (target - input)
    else:
        pointwise = torch.xlogy(target, target) - target * input
    if reduction == "none":
        return pointwise
    total = pointwise.sum()
    if reduction == "sum":
        return total
    return total / (pointwise.numel() if reduction == "mean" else input.shape[0])


def linear_ce(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return ce(logits, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)


FUNCTIONS = {"nll": nll, "ce": ce, "kl": kl, "linear_ce": linear_ce}


@dataclass
class Reference:
    loss: torch.Tensor  # float64
    grads: list[torch.Tensor]  # float64, one per differentiable input, same order as Inputs.differentiable


def _f64(x: Any) -> Any:
    return x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def compute(family: str, inputs: Inputs) -> Reference:
    """Loss and input gradients in float64 from the inputs exactly as the implementation receives them."""
    f64 = Inputs([_f64(a) for a in inputs.args], {k: _f64(v) for k, v in inputs.kwargs.items()},
                 inputs.differentiable, inputs.grad_output)
    leaves = [t.requires_grad_(True) for t in f64.grad_inputs()]
    with torch.enable_grad():
        loss = FUNCTIONS[family](*f64.args, **f64.kwargs)
        grads = torch.autograd.grad(loss, leaves, inputs.grad_output.double())
    return Reference(loss.detach(), [g.detach() for g in grads])
