"""float64 references, written from the definitions rather than by calling torch's loss in float64.

Conventions follow torch where the maths leaves a choice, and are stated here:
- mean over zero contributing rows (every target ignored, or all weights zero) is 0/0 = NaN, as torch
  returns; its gradient is zero (torch's backward never divides an ignored row by the zero total).
- cross-entropy with class weights and `reduction="mean"` divides by the summed weights of the
  non-ignored targets, the label-smoothing term included; probability targets divide by the row count.
- label smoothing mixes the target with the uniform distribution: (1 - eps) * onehot + eps / C.
- KL: pointwise target * (log target - input), with 0 * log 0 = 0; "mean" divides by every element,
  "batchmean" by the batch size (dim 0).
- JSD: Liger's generalized JSD (forward / reverse KL at beta 0 / 1), "batchmean" over kept rows.
Gradients come from float64 autograd through these definitions. Each family writes its own
(`Family.reference`, lossbench/families); this module evaluates them, whole or in slices of rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .families import Family, get_family
from .inputs import Inputs


@dataclass
class Reference:
    loss: torch.Tensor  # float64
    grads: list[torch.Tensor]  # float64, one per differentiable input, same order as Inputs.differentiable


def _f64(x: Any) -> Any:
    return x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


# Above this many bytes of float64 work per call, the reference is computed in slices of rows: a whole
# float64 copy of a 4 GiB bf16 input is 16 GiB, and autograd keeps several such intermediates.
REF_CHUNK_BYTES = 1 << 30


def definition(family: str):
    """The family's loss written from its definition (Family.reference): call it with float64 tensors."""
    return get_family(family).reference


def compute(family: str, inputs: Inputs, chunk_bytes: int = REF_CHUNK_BYTES) -> Reference:
    """Loss and input gradients in float64 from the inputs exactly as the implementation receives them."""
    fam = get_family(family)
    rows = inputs.args[0].shape[0]
    chunk = max(1, chunk_bytes // row_bytes(fam, inputs))
    if chunk >= rows:
        return _compute_whole(fam, inputs)
    return _compute_chunked(fam, inputs, chunk)


def row_bytes(family: Family, inputs: Inputs) -> int:
    """float64 bytes of one row's largest intermediate: the widest row of a per-row argument (linear_ce's
    logits row, V wide, is wider than its hidden row: its weight has V rows)."""
    per_row = [inputs.args[k] if isinstance(k, int) else inputs.kwargs.get(k) for k in family.row_args]
    widths = [t[0].numel() for t in per_row if t is not None]
    widths += [t.shape[0] for k, t in enumerate(inputs.args) if k not in family.row_args and t.dim() == 2]
    return 8 * max(1, *widths)


def _compute_whole(family: Family, inputs: Inputs) -> Reference:
    f64 = Inputs([_f64(a) for a in inputs.args], {k: _f64(v) for k, v in inputs.kwargs.items()},
                 inputs.differentiable, inputs.grad_output)
    leaves = [t.requires_grad_(True) for t in f64.grad_inputs()]
    with torch.enable_grad():
        loss = family.reference(*f64.args, **f64.kwargs)
        grads = torch.autograd.grad(loss, leaves, inputs.grad_output.double())
    return Reference(loss.detach(), [g.detach() for g in grads])


def _compute_chunked(family: Family, inputs: Inputs, chunk: int) -> Reference:
    """The same loss and gradients, computed over slices of `chunk` rows: per-row losses
    (reduction="none") summed for the scalar reductions, the upstream gradient divided by the mean's
    denominator, gradients of shared tensors (linear_ce's weight and bias) accumulated."""
    reduction = inputs.kwargs["reduction"]
    per_row = family.row_args
    shared = {k: _f64(v).requires_grad_(True) if k in inputs.differentiable else _f64(v)
              for k, v in [*enumerate(inputs.args), *inputs.kwargs.items()]
              if k not in per_row and isinstance(v, torch.Tensor)}
    go = inputs.grad_output.double()
    if reduction in ("mean", "batchmean"):
        den = family.mean_denominator(inputs).to(go.device)
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
        kwargs = {k: (_f64(v[s:e]) if k in per_row and v is not None else shared.get(k, v))
                  for k, v in inputs.kwargs.items()}
        kwargs["reduction"] = "none"
        leaves = {k: (args[k] if isinstance(k, int) else kwargs[k]) for k in inputs.differentiable}
        with torch.enable_grad():
            loss = family.reference(*args, **kwargs)
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
