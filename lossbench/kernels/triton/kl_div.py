"""KL divergence, pointwise target * (log target - input), fused with its gradient.

d/d input = -target (or -exp(target) with log_target), which does not depend on the input. For the
scalar reductions one pass writes the per-block partial sums and the gradient (already divided by
the reduction's denominator); backward scales it by the scalar grad_output. For reduction="none"
the gradient depends on the per-element grad_output, so backward runs the kernel again in a
gradient-only mode (reading target and grad_output: as many bytes as reading a stored gradient).
The gradient flows to `input` only: target is data.
"""
from __future__ import annotations

import itertools
import struct

import torch

from . import (LaunchConfig, TritonDtype, _check_device, _interpreting, int_type, launch, triton_type,
               unique_variants)
from .cross_entropy import DTYPES, _acc_dtype, _rtne_bf16  # noqa: F401 (_rtne_bf16: kernel global)

BLOCK = 4096
NUM_WARPS = 8
tl = None  # triton.language, bound by _jit at the first launch (importing triton freezes its mode)


def _kl_kernel(X, T, OUT, G, GO, n, den, den_lo, LOG_TARGET: tl.constexpr, MODE: tl.constexpr,
               ROUND_BF16: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # MODE 0: per-element loss to OUT.  MODE 1: block partial sum to OUT, gradient / den to G.
    # MODE 2: gradient * GO (per element) to G.
    # den is a float32 argument: den + den_lo is the count exactly (float64 needs all its digits).
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
            if ACC == tl.float64:
                g = -p / (tl.cast(den, ACC) + tl.cast(den_lo, ACC))
            else:
                g = -p / den
        else:
            g = -p * tl.load(GO + offs, mask=mask, other=0.0).to(ACC)
        if ROUND_BF16:
            g = _rtne_bf16(g)
        tl.store(G + offs, g.to(G.dtype.element_ty), mask=mask)


def kl_config(dtype: torch.dtype, *, target_dtype: torch.dtype, mode: int, log_target: bool, n: int,
              interpret: bool = False) -> LaunchConfig:
    """The launch configuration of _kl_kernel: what _launch passes for inputs of `dtype`.

    target_dtype: the input's dtype or the accumulation dtype (kl_div converts any other target to
    the latter: the kernel converts it so anyway). OUT is the per-block partial sums (acc dtype) in
    mode 1, else of `dtype`, as are G and GO (the input itself where unused; mode 2's grad_output
    has the loss's dtype, autograd sees to it). n: the element count, i64 from 2^31 on. den and
    den_lo are float32 (float arguments are). `interpret` turns on the bfloat16 rounding workaround.
    """
    if mode not in (0, 1, 2):
        raise ValueError(f"mode {mode}")
    acc_dtype = _acc_dtype(dtype)
    if target_dtype not in (dtype, acc_dtype):
        raise ValueError(f"target dtype {target_dtype} for {dtype} inputs (kl_div converts it to {acc_dtype})")
    dt, acc = triton_type(dtype), triton_type(acc_dtype)
    signature = {"X": f"*{dt}", "T": f"*{triton_type(target_dtype)}", "OUT": f"*{acc if mode == 1 else dt}",
                 "G": f"*{dt}", "GO": f"*{dt}", "n": int_type(n), "den": "fp32", "den_lo": "fp32"}
    constexprs = {"LOG_TARGET": log_target, "MODE": mode, "ROUND_BF16": interpret and dtype == torch.bfloat16,
                  "ACC": TritonDtype("float64" if acc == "fp64" else "float32"), "BLOCK": BLOCK}
    return LaunchConfig(signature, constexprs, num_warps=NUM_WARPS)


def variants():
    """Every compiled form of _kl_kernel: kl_config over its whole input domain (all dtypes, target
    dtypes, modes, log_target, int32 and int64 element counts), without the interpreter rounding."""
    def configs():
        for dtype, mode, log_target, n in itertools.product(DTYPES, (0, 1, 2), (False, True), (2, 2**31)):
            for target_dtype in (dtype, _acc_dtype(dtype)):
                cfg = kl_config(dtype, target_dtype=target_dtype, mode=mode, log_target=log_target, n=n)
                sig = cfg.signature
                name = (f"{triton_type(dtype)} target={sig['T'][1:]} mode={mode}"
                        f"{' log_target' if log_target else ''} n:{sig['n']} BLOCK={BLOCK} warps={cfg.num_warps}")
                yield str(dtype)[6:], name, cfg

    return list(unique_variants("kl", _kl_kernel, configs()))


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _launch(x, t, out, grad, grad_out, den, log_target, mode):
    n = t.numel()
    if n == 0:
        return
    cfg = kl_config(x.dtype, target_dtype=t.dtype, mode=mode, log_target=log_target, n=n,
                    interpret=_interpreting())
    den_hi = _f32(den)
    launch(_kl_kernel, (-(-n // BLOCK),), cfg, dict(X=x, T=t, OUT=out, G=grad, GO=grad_out, n=n, den=den_hi,
                                                     den_lo=_f32(den - den_hi)))


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
        ctx.reduction, ctx.log_target, ctx.dtype = reduction, log_target, x.dtype
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
        # grad_output has the loss's dtype (autograd casts it): the kernel's config relies on that
        go = grad_output.to(ctx.dtype).contiguous()
        grad = torch.empty(saved.shape, dtype=ctx.dtype, device=saved.device)
        _launch(grad, saved, grad, grad, go, 1.0, ctx.log_target, 2)
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
    if input.dtype not in DTYPES:
        raise NotImplementedError(f"dtype {input.dtype}")
    # Flat element-wise kernels need contiguous memory: non-contiguous inputs cost a copy here.
    x, t = input.contiguous(), target.contiguous()
    if t.dtype != x.dtype:  # the kernel would convert it to the accumulation dtype: do it here (same values)
        t = t.to(_acc_dtype(x.dtype))
    if input.requires_grad and torch.is_grad_enabled():
        return _KLDiv.apply(x, t.detach(), reduction, bool(log_target))
    return _forward(x, t, reduction, bool(log_target), None)
