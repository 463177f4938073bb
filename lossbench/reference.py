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


# Above this many bytes of float64 work per call, the reference is computed in slices of rows: a whole
# float64 copy of a 4 GiB bf16 input is 16 GiB, and autograd keeps several such intermediates.
REF_CHUNK_BYTES = 1 << 30


def compute(family: str, inputs: Inputs, chunk_bytes: int = REF_CHUNK_BYTES) -> Reference:
    """Loss and input gradients in float64 from the inputs exactly as the implementation receives them."""
    rows = inputs.args[0].shape[0]
    chunk = max(1, chunk_bytes // _row_bytes(family, inputs))
    if chunk >= rows:
        return _compute_whole(family, inputs)
    return _compute_chunked(family, inputs, chunk)


def _row_bytes(family: str, inputs: Inputs) -> int:
    """float64 bytes of one row's largest intermediate (a row of logits for linear_ce)."""
    if family == "linear_ce":
        return 8 * inputs.args[1].shape[0]
    return 8 * max(1, inputs.args[0][0].numel())


def _compute_whole(family: str, inputs: Inputs) -> Reference:
    f64 = Inputs([_f64(a) for a in inputs.args], {k: _f64(v) for k, v in inputs.kwargs.items()},
                 inputs.differentiable, inputs.grad_output)
    leaves = [t.requires_grad_(True) for t in f64.grad_inputs()]
    with torch.enable_grad():
        loss = FUNCTIONS[family](*f64.args, **f64.kwargs)
        grads = torch.autograd.grad(loss, leaves, inputs.grad_output.double())
    return Reference(loss.detach(), [g.detach() for g in grads])


# Which positional arguments are per-row (sliced along dim 0) in each family; the rest are shared.
_ROW_ARGS = {"nll": (0, 1), "ce": (0, 1), "kl": (0, 1), "linear_ce": (0, 2)}


def _mean_den(family: str, inputs: Inputs) -> torch.Tensor:
    """The denominator of reduction="mean"/"batchmean", as the definitions above use it."""
    x, kw = inputs.args[0], inputs.kwargs
    if family == "kl":
        return torch.tensor(float(x.numel() if kw["reduction"] == "mean" else x.shape[0]), dtype=torch.float64)
    target = inputs.args[2 if family == "linear_ce" else 1]
    if target.is_floating_point():  # probability targets: every row counts once
        return torch.tensor(float(target.numel() // target.shape[1]), dtype=torch.float64)
    keep = target != kw.get("ignore_index", -100)
    weight = kw.get("weight")
    if weight is None:
        return keep.sum().double()
    return (weight.double()[torch.where(keep, target, 0)] * keep).sum()


def _compute_chunked(family: str, inputs: Inputs, chunk: int) -> Reference:
    """The same loss and gradients, computed over slices of `chunk` rows: per-row losses
    (reduction="none") summed for the scalar reductions, the upstream gradient divided by the mean's
    denominator, gradients of shared tensors (linear_ce's weight and bias) accumulated."""
    reduction = inputs.kwargs["reduction"]
    fn = FUNCTIONS[family]
    per_row = _ROW_ARGS[family]
    shared = {k: _f64(v).requires_grad_(True) if k in inputs.differentiable else _f64(v)
              for k, v in [*enumerate(inputs.args), *inputs.kwargs.items()]
              if k not in per_row and isinstance(v, torch.Tensor)}
    go = inputs.grad_output.double()
    if reduction in ("mean", "batchmean"):
        den = _mean_den(family, inputs).to(go.device)
        scale = go / torch.where(den == 0, torch.ones_like(den), den)
    else:
        den, scale = None, go
    grads = {k: torch.zeros(inputs.get(k).shape, dtype=torch.float64, device=inputs.get(k).device)
             for k in inputs.differentiable}
    losses = []
    rows = inputs.args[0].shape[0]
    for s in range(0, rows, chunk):
        e = min(rows, s + chunk)
        args = [(_f64(a[s:e]).requires_grad_(i in inputs.differentiable) if i in per_row else shared.get(i, a))
                for i, a in enumerate(inputs.args)]
        kwargs = {k: shared.get(k, v) for k, v in inputs.kwargs.items()}
        kwargs["reduction"] = "none"
        leaves = {k: (args[k] if isinstance(k, int) else kwargs[k]) for k in inputs.differentiable}
        with torch.enable_grad():
            loss = fn(*args, **kwargs)
            upstream = scale[s:e] if reduction == "none" else scale.expand_as(loss)
            chunk_grads = torch.autograd.grad(loss, list(leaves.values()), upstream)
        for (k, _), g in zip(leaves.items(), chunk_grads):
            if k in per_row:
                grads[k][s:e] = g
            else:
                grads[k] += g
        losses.append(loss.detach())
        del loss, chunk_grads, args, kwargs, leaves
    if reduction == "none":
        total = torch.cat(losses)
    else:
        total = torch.stack([part.sum() for part in losses]).sum()
        if den is not None:
            total = total / den if den != 0 else torch.full_like(total, float("nan"))
    return Reference(total, [grads[k] for k in inputs.differentiable])
