"""Building blocks of the float64 references, written from the definitions (see lossbench/reference.py
for the conventions they follow)."""
from __future__ import annotations

import torch


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, NaN when den == 0, with the gradient of num / 1 (zero for masked rows) then."""
    safe = torch.where(den == 0, torch.ones_like(den), den)
    nan_if_empty = torch.where(den == 0, torch.full_like(den, float("nan")), torch.zeros_like(den)).detach()
    return num / safe + nan_if_empty


def reduce(per_row: torch.Tensor, reduction: str, mean_den: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return ratio(per_row.sum(), mean_den)


def class_weights(weight: torch.Tensor | None, ndim: int) -> torch.Tensor | float:
    if weight is None:
        return 1.0
    return weight.view(1, -1, *([1] * (ndim - 2)))


def picked_and_mask(log_p: torch.Tensor, target: torch.Tensor, weight, ignore_index: int):
    """-log p[y] per row, and the per-row weight w[y] (0 for ignored rows)."""
    keep = target != ignore_index
    safe_target = torch.where(keep, target, torch.zeros_like(target))
    picked = log_p.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    w = weight[safe_target] if weight is not None else torch.ones_like(picked)
    w = w * keep
    return -picked * w, w


def log_softmax(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    # log p_c = z_c - log sum_k exp(z_k), with the max subtracted first for range.
    m = logits.amax(dim, keepdim=True).detach()
    return logits - m - (logits - m).exp().sum(dim, keepdim=True).log()


def kept_weight_total(target: torch.Tensor, ignore_index: int, weight: torch.Tensor | None) -> torch.Tensor:
    """Sum of the class weights of the kept targets (their count without weights), in float64."""
    keep = target != ignore_index
    if weight is None:
        return keep.sum().double()
    return (weight.double()[torch.where(keep, target, 0)] * keep).sum()
