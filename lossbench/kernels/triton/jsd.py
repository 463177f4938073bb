"""Generalised Jensen-Shannon divergence (JSD as Liger-Kernel defines it), fused with its gradient.

X = log_q (student, gets the gradient), Y = log_p (teacher, data), Q = exp(X), P = exp(Y):
    beta == 0: P (Y - X), dX = -P;  beta == 1: Q (X - Y), dX = Q (X - Y) + Q;
    otherwise: log M = logaddexp(log beta + Y, log(1-beta) + X) (max-shifted),
               beta P (Y - log M) + (1-beta) Q (X - log M), dX = (1-beta) Q (X - log M).
The loss is pointwise, so one program per row makes a single pass over V in BLOCK chunks: it writes
the gradient divided by the reduction's denominator and the row's loss (accumulation dtype); the
host sums the rows in float64. beta is a runtime argument (a float32 pair hi + lo, exact enough for
float64 inputs) and the constexpr BETA_CASE picks the branch (0: beta == 0, 1: beta == 1, 2: other),
so one compiled variant serves every beta in (0, 1) (Liger makes beta itself a constexpr). For
reduction="none" the forward writes the unscaled gradient and backward scales rows by grad_output.
Rows whose label is ignore_index get loss 0 and gradient 0.
"""
from __future__ import annotations

import itertools
import struct

import torch

from . import (LaunchConfig, TritonDtype, _check_device, _interpreting, int_type, launch, triton_type,
               unique_variants)
from .cross_entropy import DTYPES, _acc_dtype, _rtne_bf16  # noqa: F401 (_rtne_bf16: kernel global)

BLOCK = 2048
NUM_WARPS = 8
tl = None  # triton.language, bound by _jit at the first launch (importing triton freezes its mode)


def _jsd_kernel(X, Y, LABEL, LOSS, G, n_cols, ignore_index, beta_hi, beta_lo, den, den_lo,
                BETA_CASE: tl.constexpr, HAS_LABEL: tl.constexpr, ROUND_BF16: tl.constexpr,
                ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * n_cols  # int64: N * V may exceed 2^31
    # float32 pairs: hi + lo carry beta and den to float64 precision (float arguments are float32)
    beta = tl.cast(beta_hi, ACC) + tl.cast(beta_lo, ACC)
    scale = 1.0 / (tl.cast(den, ACC) + tl.cast(den_lo, ACC))
    keep = True
    if HAS_LABEL:
        keep = tl.load(LABEL + row) != ignore_index
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(X + base + offs, mask=mask, other=0.0).to(ACC)
        y = tl.load(Y + base + offs, mask=mask, other=0.0).to(ACC)
        if BETA_CASE == 0:
            p = tl.exp(y)
            loss = p * (y - x)
            g = -p
        elif BETA_CASE == 1:
            q = tl.exp(x)
            loss = q * (x - y)
            g = loss + q
        else:
            a = tl.log(beta) + y
            b = tl.log(1.0 - beta) + x
            m = tl.maximum(a, b)
            # logaddexp shifted by the max: the exp argument is <= 0, M itself never formed
            log_m = m + tl.log(1.0 + tl.exp(tl.minimum(a, b) - m))
            q = tl.exp(x)
            g = (1.0 - beta) * q * (x - log_m)
            loss = beta * tl.exp(y) * (y - log_m) + g
        acc += tl.where(mask, loss, 0.0)
        g = tl.where(keep, g * scale, 0.0)
        if ROUND_BF16:
            g = _rtne_bf16(g)
        tl.store(G + base + offs, g.to(G.dtype.element_ty), mask=mask)
    tl.store(LOSS + row, tl.where(keep, tl.sum(acc, 0), 0.0))


def jsd_config(dtype: torch.dtype, *, beta_case: int, has_label: bool, n_cols: int, ignore_index: int = -100,
               interpret: bool = False) -> LaunchConfig:
    """The launch configuration of _jsd_kernel for [N, V] inputs of `dtype`: LOSS holds the row losses
    in the accumulation dtype, G the gradient in `dtype`, LABEL int64 (log_q itself when there is no
    label). n_cols and ignore_index are ints (i64 from 2^31 on); beta and den are float32 pairs.
    `interpret` turns on the bfloat16 rounding workaround."""
    if beta_case not in (0, 1, 2):
        raise ValueError(f"beta_case {beta_case}")
    dt, acc = triton_type(dtype), triton_type(_acc_dtype(dtype))
    signature = {"X": f"*{dt}", "Y": f"*{dt}", "LABEL": "*i64" if has_label else f"*{dt}", "LOSS": f"*{acc}",
                 "G": f"*{dt}", "n_cols": int_type(n_cols), "ignore_index": int_type(ignore_index),
                 "beta_hi": "fp32", "beta_lo": "fp32", "den": "fp32", "den_lo": "fp32"}
    constexprs = {"BETA_CASE": beta_case, "HAS_LABEL": has_label,
                  "ROUND_BF16": interpret and dtype == torch.bfloat16,
                  "ACC": TritonDtype("float64" if acc == "fp64" else "float32"), "BLOCK": BLOCK}
    return LaunchConfig(signature, constexprs, num_warps=NUM_WARPS)


def variants():
    """Every compiled form of _jsd_kernel: jsd_config over its whole input domain (all dtypes, the three
    beta cases, with and without label, i32 and i64 n_cols and ignore_index), without the interpreter
    rounding. The reduction is not a kernel input (only den changes)."""
    def configs():
        for dtype, case, has_label, n_cols, ign in itertools.product(DTYPES, (0, 1, 2), (False, True),
                                                                      (2, 2**31), (-100, -2**40)):
            cfg = jsd_config(dtype, beta_case=case, has_label=has_label, n_cols=n_cols, ignore_index=ign)
            sig = cfg.signature
            name = (f"{triton_type(dtype)} beta_case={case}{' label' if has_label else ''} n_cols:{sig['n_cols']}"
                    f" ignore_index:{sig['ignore_index']} BLOCK={BLOCK} warps={cfg.num_warps}")
            yield str(dtype)[6:], name, cfg

    return list(unique_variants("jsd", _jsd_kernel, configs()))


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _forward(x, y, label, beta, ignore_index, reduction, grad):
    """Row losses (accumulation dtype) and, into grad, the gradient / den."""
    n, v = x.shape
    kept = n if label is None else int((label != ignore_index).sum())
    den = float(kept) if (reduction == "batchmean" and kept > 0) else 1.0
    rows = torch.empty(n, dtype=_acc_dtype(x.dtype), device=x.device)
    if n and v:
        case = 0 if beta == 0.0 else 1 if beta == 1.0 else 2
        cfg = jsd_config(x.dtype, beta_case=case, has_label=label is not None, n_cols=v,
                         ignore_index=ignore_index, interpret=_interpreting())
        b_hi, d_hi = _f32(beta), _f32(den)
        launch(_jsd_kernel, (n,), cfg, dict(X=x, Y=y, LABEL=label if label is not None else x, LOSS=rows, G=grad,
                                            n_cols=v, ignore_index=ignore_index, beta_hi=b_hi,
                                            beta_lo=_f32(beta - b_hi), den=d_hi, den_lo=_f32(den - d_hi)))
    else:
        rows.zero_()
        grad.zero_()
    if reduction == "batchmean" and kept == 0:
        grad.zero_()  # torch's empty mean: NaN loss, zero gradient
    if reduction == "none":
        return rows.to(x.dtype)
    total = rows.double().sum()
    if reduction == "batchmean":
        total = total / kept if kept else torch.tensor(float("nan"), dtype=torch.float64, device=x.device)
    return total.to(x.dtype)


class _JSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, label, beta, ignore_index, reduction):
        grad = torch.empty_like(x)
        loss = _forward(x, y, label, beta, ignore_index, reduction, grad)
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (g,) = ctx.saved_tensors
        acc = _acc_dtype(g.dtype)
        if ctx.reduction == "none":  # per-row grad_output, product in the accumulation dtype, rounded once
            return (g.to(acc) * grad_output.to(acc).view(-1, 1)).to(g.dtype), None, None, None, None, None
        return (g.to(acc) * grad_output.to(acc)).to(g.dtype), None, None, None, None, None


def jsd(log_q, log_p, *, label=None, beta=0.5, ignore_index=-100, reduction="batchmean"):
    """Generalised JSD(beta) of student log-probs log_q [N, V] against teacher log-probs log_p;
    gradient to log_q only."""
    _check_device(log_q)
    if reduction not in ("batchmean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    if log_q.dim() != 2 or log_q.shape != log_p.shape:
        raise NotImplementedError("jsd needs 2-D log_q and log_p of the same shape")
    if log_q.dtype not in DTYPES or log_p.dtype != log_q.dtype:
        raise NotImplementedError(f"dtypes {log_q.dtype}, {log_p.dtype}")
    if log_p.device != log_q.device or (label is not None and label.device != log_q.device):
        raise NotImplementedError("all tensors must be on one device")
    if log_p.requires_grad:
        raise NotImplementedError("gradient with respect to log_p is not supported")
    if not 0.0 <= float(beta) <= 1.0:
        raise NotImplementedError("beta must lie in [0, 1]")
    if label is not None and (label.dtype != torch.int64 or label.shape != (log_q.shape[0],)):
        raise NotImplementedError("label must be int64 of shape [N]")
    x, y = log_q.contiguous(), log_p.detach().contiguous()  # row-major: the kernel indexes row * V
    lab = None if label is None else label.contiguous()
    if log_q.requires_grad and torch.is_grad_enabled():
        return _JSD.apply(x, y, lab, float(beta), int(ignore_index), reduction)
    return _forward(x, y, lab, float(beta), int(ignore_index), reduction, torch.empty_like(x))
