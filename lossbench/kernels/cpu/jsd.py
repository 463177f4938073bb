"""Fused generalised Jensen-Shannon divergence for CPU (JSD as Liger-Kernel defines it).

X = log_q (student, gets the gradient), Y = log_p (teacher, data), Q = exp(X), P = exp(Y):
    beta == 0: forward KL(P||Q)   P (Y - X)                               dX = -P
    beta == 1: reverse KL(Q||P)   Q (X - Y)                               dX = Q (X - Y) + Q
    otherwise: log M = logaddexp(log beta + Y, log(1-beta) + X)           (max-shifted: stable)
               beta P (Y - log M) + (1-beta) Q (X - log M)                dX = (1-beta) Q (X - log M)
One forward sweep over cache-sized row chunks (cross_entropy.run_chunks workers) computes the row
losses and the gradient together, in float32 (float64 for float64 inputs), rounded once into the
gradient buffer, the only full-size allocation. For the scalar reductions the buffer holds dX / den
and backward only multiplies by grad_output (or hands the buffer over when grad_output is 1); for
"none" it holds dX and backward scales each row by its grad_output.
"""
from __future__ import annotations

import math

import torch

from .cross_entropy import CHUNK_BYTES, alloc_like_rows, compute_dtype, keep_graph, row_ranges, run_chunks, \
    scale_rows_

__all__ = ["jsd"]

_REDUCTIONS = ("batchmean", "sum", "none")


def _chunk(x: torch.Tensor, y: torch.Tensor, beta: float):
    """(row losses, dX) of a [rows, V] chunk already in the compute dtype."""
    if beta == 0.0:
        p = torch.exp(y)
        loss = torch.sub(y, x).mul_(p)
        return loss.sum(1), p.neg_()
    if beta == 1.0:
        q = torch.exp(x)
        d = torch.sub(x, y).mul_(q)  # Q (X - Y)
        return d.sum(1), d.add_(q)
    # logaddexp shifts by the max itself: log M never comes from an underflowed M
    log_m = torch.logaddexp(y + math.log(beta), x + math.log1p(-beta))
    q = torch.exp(x)
    dx = torch.sub(x, log_m).mul_(q).mul_(1.0 - beta)  # (1-beta) Q (X - log M)
    loss = torch.sub(y, log_m).mul_(torch.exp(y)).mul_(beta).add_(dx)
    return loss.sum(1), dx


def jsd_forward(log_q, log_p, label, beta, ignore_index, reduction, need_grad):
    """(loss, G, den): G the rounded gradient buffer (dX / den, or dX for "none") or None."""
    n, v = log_q.shape
    cd = compute_dtype(log_q.dtype)
    keep = None if label is None else (label != ignore_index)
    kept = n if keep is None else int(keep.sum())
    den = float(kept) if reduction == "batchmean" else 1.0
    # scalar reductions fold 1/den in; zero kept rows under batchmean: gradient exactly zero
    factor = 1.0 if reduction == "none" else (1.0 / den if den > 0 else 0.0)
    G = alloc_like_rows(log_q, log_q.dtype) if need_grad else None
    rows_loss = torch.zeros(n, dtype=cd)
    x_all, y_all = log_q.detach(), log_p.detach()
    step = max(1, CHUNK_BYTES // max(1, v * 4))

    def do(r0: int, r1: int, slot: int) -> None:
        x, y = x_all[r0:r1].to(cd), y_all[r0:r1].to(cd)  # to() copies only when the dtype changes
        lr, dx = _chunk(x, y, beta)
        if keep is not None:
            k = keep[r0:r1]
            lr = lr.masked_fill_(~k, 0.0)
            dx.masked_fill_(~k.view(-1, 1), 0.0)
        rows_loss[r0:r1] = lr
        if G is not None:
            if factor != 1.0:
                dx.mul_(factor)
            G[r0:r1].copy_(dx)  # the one rounding to the input dtype

    run_chunks(do, row_ranges(n, step))
    if reduction == "none":
        loss = rows_loss.to(log_q.dtype)
    else:
        total = rows_loss.sum(dtype=torch.float64)
        if reduction == "batchmean":
            total = total / kept if kept > 0 else torch.tensor(float("nan"), dtype=torch.float64)
        loss = total.to(log_q.dtype)
    return loss, G


class _JSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_q, log_p, label, beta, ignore_index, reduction):
        loss, G = jsd_forward(log_q, log_p, label, beta, ignore_index, reduction, bool(ctx.needs_input_grad[0]))
        ctx.G, ctx.reduction = G, reduction
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        G = ctx.G
        if G is None:
            raise RuntimeError("fused jsd: backward through the graph a second time; "
                               "use retain_graph=True the first time")
        keep = keep_graph()
        if not keep:
            ctx.G = None  # autograd adopts the buffer as log_q.grad without a copy
        cd = compute_dtype(G.dtype)
        if ctx.reduction == "none":
            return scale_rows_(G, grad_output.to(cd), inplace=not keep), None, None, None, None, None
        go = float(grad_output)
        if go == 1.0:
            return (G if not keep else G.clone()), None, None, None, None, None
        s = torch.full((G.shape[0],), go, dtype=cd)
        return scale_rows_(G, s, inplace=not keep), None, None, None, None, None


def jsd(log_q, log_p, *, label=None, beta=0.5, ignore_index=-100, reduction="batchmean"):
    """Generalised JSD(beta) of student log-probs log_q [N, V] against teacher log-probs log_p, fused
    on CPU (gradient wrt log_q only)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if log_q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise NotImplementedError(f"dtype {log_q.dtype} is not supported")
    if log_p.dtype != log_q.dtype:
        raise NotImplementedError("log_q and log_p must have the same dtype")
    if log_q.dim() != 2 or log_q.shape != log_p.shape:
        raise NotImplementedError("jsd needs 2-D log_q and log_p of the same shape")
    if log_q.device.type != "cpu" or log_p.device.type != "cpu":
        raise NotImplementedError("CPU kernel: tensors must be on the CPU")
    if log_p.requires_grad:
        raise NotImplementedError("gradient with respect to log_p is not supported")
    if not 0.0 <= float(beta) <= 1.0:
        raise NotImplementedError("beta must lie in [0, 1]")
    if label is not None:
        if label.dtype != torch.int64 or label.shape != (log_q.shape[0],) or label.device.type != "cpu":
            raise NotImplementedError("label must be an int64 CPU tensor of shape [N]")
    return _JSD.apply(log_q, log_p, label, float(beta), int(ignore_index), reduction)
