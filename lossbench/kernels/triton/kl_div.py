"""KL divergence, pointwise target * (log target - input), fused with its gradient.

d/d input = -target (or -exp(target) with log_target), which does not depend on the input. For the
scalar reductions one pass writes the per-block partial sums and the gradient (already divided by
the reduction's denominator); backward scales it by the scalar grad_output. For reduction="none"
the gradient depends on the per-element grad_output, so backward runs the kernel again in a
gradient-only mode (reading target and grad_output: as many bytes as reading a stored gradient).
The gradient flows to `input` only: target is data.
"""
from __future__ import annotations

import torch

from . import _check_device, _interpreting, _jit
from .cross_entropy import _acc_dtype, _rtne_bf16  # noqa: F401 (_rtne_bf16: kernel global)

BLOCK = 4096
tl = None  # triton.language, bound by _jit at the first launch (importing triton freezes its mode)


def _kl_kernel(X, T, OUT, G, GO, n, den, LOG_TARGET: tl.constexpr, MODE: tl.constexpr,
               ROUND_BF16: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # MODE 0: per-element loss to OUT.  MODE 1: block partial sum to OUT, gradient / den to G.
    # MODE 2: gradient * GO (per element) to G.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(T + offs, mask=mask, other=0.0).to(ACC)
    if LOG_TARGET:
        p = tl.exp(t)
    else:
        p = t
    if MODE != 2:
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        if LOG_TARGET:
            loss = p * (t - x)
        else:  # xlogy(t, t) - t * x: a zero target contributes 0 * log 0 = 0
            loss = t * tl.log(tl.where(t == 0.0, 1.0, t)) - t * x
        if MODE == 0:
            if ROUND_BF16:
                loss = _rtne_bf16(loss)
            tl.store(OUT + offs, loss.to(OUT.dtype.element_ty), mask=mask)
        else:
            tl.store(OUT + pid, tl.sum(tl.where(mask, loss, 0.0), 0))
    if MODE != 0:
        if MODE == 1:
            g = -p / den
        else:
            g = -p * tl.load(GO + offs, mask=mask, other=0.0).to(ACC)
        if ROUND_BF16:
            g = _rtne_bf16(g)
        tl.store(G + offs, g.to(G.dtype.element_ty), mask=mask)


def _launch(x, t, out, grad, grad_out, den, log_target, mode):
    n = t.numel()
    if n == 0:
        return
    low = grad if mode else out
    kernel = _jit(_kl_kernel)
    kernel[(-(-n // BLOCK),)](
        x, t, out, grad, grad_out, n, den, LOG_TARGET=log_target, MODE=mode,
        ROUND_BF16=low.dtype == torch.bfloat16 and _interpreting(),
        ACC=tl.float64 if _acc_dtype(x.dtype) == torch.float64 else tl.float32, BLOCK=BLOCK, num_warps=8)


def _denominator(x, reduction):
    return {"sum": 1, "mean": x.numel(), "batchmean": x.shape[0] if x.dim() else 1}[reduction]


def _forward(x, t, reduction, log_target, grad):
    """Loss (in x's dtype); with `grad` given, also the gradient of a scalar reduction into it."""
    if reduction == "none":
        out = torch.empty_like(x)
        _launch(x, t, out, x, x, 1.0, log_target, 0)
        return out
    acc = _acc_dtype(x.dtype)
    partial = torch.empty(-(-x.numel() // BLOCK), dtype=acc, device=x.device)
    den = _denominator(x, reduction)
    _launch(x, t, partial, grad if grad is not None else x, x, float(den), log_target, 1)
    # float64 over the few block partials: cheap, and keeps the total's rounding to one step
    total = partial.double().sum() / den
    return total.to(x.dtype)


class _KLDiv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, reduction, log_target):
        ctx.reduction, ctx.log_target = reduction, log_target
        if reduction == "none":
            ctx.save_for_backward(t)
            return _forward(x, t, reduction, log_target, None)
        grad = torch.empty_like(x)
        loss = _forward(x, t, reduction, log_target, grad)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (saved,) = ctx.saved_tensors
        if ctx.reduction != "none":
            return saved * grad_output.to(saved.dtype), None, None, None
        grad = torch.empty(saved.shape, dtype=grad_output.dtype, device=saved.device)
        _launch(grad, saved, grad, grad, grad_output.contiguous(), 1.0, ctx.log_target, 2)
        return grad, None, None, None


def kl_div(input, target, *, reduction="batchmean", log_target=False):
    """F.kl_div(input, target) with input as log-probabilities; gradient to input only."""
    _check_device(input)
    if input.dim() > 2:
        raise NotImplementedError(f"inputs with more than 2 dims, got {tuple(input.shape)}")
    if input.shape != target.shape:
        raise NotImplementedError("input and target must have the same shape (no broadcasting)")
    if reduction not in ("none", "sum", "mean", "batchmean"):
        raise ValueError(f"unknown reduction {reduction!r}")
    # Flat element-wise kernels need contiguous memory: non-contiguous inputs cost a copy here.
    x, t = input.contiguous(), target.contiguous()
    if input.requires_grad and torch.is_grad_enabled():
        return _KLDiv.apply(x, t.detach(), reduction, bool(log_target))
    return _forward(x, t, reduction, bool(log_target), None)
