"""Cross-entropy over (N, C) logits with int64 targets: one online-softmax pass per row.

A program owns one row and walks the vocabulary in blocks, keeping the running max m and the
running sum of exp(x_c - m) over the classes OTHER than the target (S_other), rescaled whenever m
grows. With e_y = exp(x_y - m) and Z = S_other + e_y:

    1 - p_y = S_other / Z              a ratio of positive terms: no cancellation on confident rows
    nll     = log1p(S_other / e_y)     when p_y > 1/2, else log Z - (x_y - m)

When a gradient is wanted, a second walk over the row writes it (already divided by the mean's
denominator), and backward only scales it by grad_output. Arithmetic is float32 (float64 for
float64 inputs, so gradcheck can see it); the gradient is stored in the input dtype.

Per-row loss, with w_c the class weights (1 without), eps the label smoothing, z the z-loss scale
and lse = log sum_c exp(x_c):
    (1 - eps) * w_y * nll + eps / C * sum_c w_c (lse - x_c) + z * lse^2
"mean" divides the sum by sum of w_y over non-ignored rows (torch's convention, smoothing term
included); the z-loss term is not weighted but shares that denominator.
"""
from __future__ import annotations

import torch

from . import _check_device, _interpreting, _jit

tl = None  # triton.language, bound by _jit at the first launch (importing triton freezes its mode)

MAX_BLOCK = 4096  # columns per step; module-level so tests can force several blocks per row


def _rtne_bf16(x):
    # The interpreter's float32 -> bfloat16 cast truncates (the GPU rounds to nearest even), which
    # doubles the rounding error. Round the float32 bits to nearest even here; the cast that
    # follows then only drops zero bits. Called only under the interpreter (ROUND_BF16).
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


def _ce_kernel(X, x_stride, G, g_stride, Y, W, LOSS, DEN, PARAMS, n_cols, ignore_index, eps, z_scale,
               HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr,
               WRITE_GRAD: tl.constexpr, ROUND_BF16: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * x_stride
    g_row = G + row * g_stride
    y = tl.load(Y + row)
    cols = tl.arange(0, BLOCK)
    if y == ignore_index:
        tl.store(LOSS + row, 0.0)
        if WRITE_GRAD:  # ignored rows get an exactly-zero gradient
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                tl.store(g_row + offs, tl.zeros([BLOCK], dtype=G.dtype.element_ty), mask=offs < n_cols)
    else:
        tl.device_assert((y >= 0) & (y < n_cols), "target out of range")
        if ACC == tl.float64:  # float arguments are float32: float64 runs read theirs from memory
            eps = tl.load(PARAMS)
            z_scale = tl.load(PARAMS + 1)
        x_y = tl.load(x_row + y).to(ACC)
        m = x_y  # starting from the (finite) target logit keeps exp(m_old - m_new) well defined
        s_other = tl.full([], 0.0, ACC)
        w_other = tl.full([], 0.0, ACC)  # sum of w_c over c != y (smoothing)
        wd_sum = tl.full([], 0.0, ACC)  # sum_c w_c (x_y - x_c): the smoothing term, relative to x_y
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(ACC)
            m_new = tl.maximum(m, tl.max(x, 0))
            other = mask & (offs != y)
            e = tl.where(other, tl.exp(x - m_new), 0.0)
            s_other = s_other * tl.exp(m - m_new) + tl.sum(e, 0)
            m = m_new
            if SMOOTH:
                if HAS_WEIGHT:
                    wc = tl.load(W + offs, mask=mask, other=0.0).to(ACC)
                else:
                    wc = tl.where(mask, 1.0, 0.0)
                wd_sum += tl.sum(wc * tl.where(mask, x_y - x, 0.0), 0)
                w_other += tl.sum(tl.where(other, wc, 0.0), 0)

        e_y = tl.exp(x_y - m)
        z_sum = s_other + e_y
        q = s_other / z_sum  # 1 - p_y
        log_z = tl.log(z_sum)
        lse = m + log_z
        # log1p(u) to full precision from log alone (Goldberg): log(1+u) * u / ((1+u) - 1).
        u = s_other / e_y
        one_u = 1.0 + u
        log1p_u = tl.where(one_u == 1.0, u, tl.log(one_u) * (u / (one_u - 1.0)))
        nll = tl.where(s_other < e_y, log1p_u, log_z - (x_y - m))

        if HAS_WEIGHT:
            w_y = tl.load(W + y).to(ACC)
        else:
            w_y = tl.full([], 1.0, ACC)
        loss = w_y * nll
        # dloss/dx_c = p_c * a - (eps/C) w_c - (1 - eps) w_y [c == y]
        a = w_y
        if SMOOTH:
            w_sum = w_other + w_y
            loss = (1.0 - eps) * loss + (eps / n_cols) * (w_sum * nll + wd_sum)
            a = (1.0 - eps) * w_y + (eps / n_cols) * w_sum
        if ZLOSS:
            loss += z_scale * lse * lse
            a += 2.0 * z_scale * lse
        tl.store(LOSS + row, loss)

        if WRITE_GRAD:
            den = tl.load(DEN)
            scale = 1.0 / tl.where(den == 0.0, 1.0, den)  # rows of an empty mean: their 0 stays 0
            # True class with p_y = 1 - q: p_y * a - (eps/C) w_y - (1 - eps) w_y
            #   = (eps/C) w_other + 2 z lse - q * a   (no 1 - p_y difference anywhere)
            g_y = -q * a
            if SMOOTH:
                g_y += (eps / n_cols) * w_other
            if ZLOSS:
                g_y += 2.0 * z_scale * lse
            inv_z = 1.0 / z_sum
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                mask = offs < n_cols
                x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(ACC)
                g = tl.exp(x - m) * inv_z * a
                if SMOOTH:
                    if HAS_WEIGHT:
                        wc = tl.load(W + offs, mask=mask, other=0.0).to(ACC)
                        g -= (eps / n_cols) * wc
                    else:
                        g -= eps / n_cols
                g = tl.where(offs == y, g_y, g) * scale
                if ROUND_BF16:
                    g = _rtne_bf16(g)
                tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)


def _launch(logits, target, *, weight, ignore_index, label_smoothing, lse_square_scale, den, grad):
    """Per-row losses in the accumulation dtype; writes the gradient (divided by `den`) into `grad`.

    logits: (N, C) with unit column stride; grad: same shape (may be logits itself), or None;
    den: 1-element tensor of the accumulation dtype (the mean's denominator, 1 for sum/none).
    """
    n, c = logits.shape
    acc = _acc_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    if n == 0:
        return loss
    block = min(MAX_BLOCK, 1 << (c - 1).bit_length())  # next power of two
    g = grad if grad is not None else logits  # unused pointer when WRITE_GRAD is off
    params = (torch.tensor([label_smoothing, lse_square_scale], dtype=acc, device=logits.device)
              if acc == torch.float64 else logits)  # float64 only: saves a host-to-device copy per call
    kernel = _jit(_ce_kernel)
    kernel[(n,)](
        logits, logits.stride(0), g, g.stride(0), target, weight if weight is not None else logits,
        loss, den, params, c, ignore_index, float(label_smoothing), float(lse_square_scale),
        HAS_WEIGHT=weight is not None, SMOOTH=label_smoothing != 0.0, ZLOSS=lse_square_scale != 0.0,
        WRITE_GRAD=grad is not None,
        ROUND_BF16=grad is not None and grad.dtype == torch.bfloat16 and _interpreting(),
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return loss


def _row_major(x: torch.Tensor) -> torch.Tensor:
    # The kernels take a row stride but need unit column stride; anything else costs a copy.
    return x if x.stride(-1) == 1 else x.contiguous()


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mean_den(target, weight, ignore_index, acc):
    """sum of w[y] over non-ignored rows (their count without weights), a 1-element `acc` tensor."""
    keep = target != ignore_index
    if weight is None:
        return keep.sum().to(acc).reshape(1)
    w = weight.to(acc)[torch.where(keep, target, 0)] * keep
    return w.sum().reshape(1)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
                inplace_grad):
        x = _row_major(logits)
        acc = _acc_dtype(x.dtype)
        if reduction == "mean":
            den = _mean_den(target, weight, ignore_index, acc)
        else:
            den = torch.ones(1, dtype=acc, device=x.device)
        # inplace_grad: the gradient overwrites the logits (saves N*C memory, destroys the input;
        # with a column stride the copy _row_major made is overwritten instead)
        grad = x if inplace_grad else torch.empty_like(x)
        rows = _launch(x, target, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                       lse_square_scale=lse_square_scale, den=den, grad=grad)
        ctx.save_for_backward(grad)
        ctx.reduction, ctx.inplace, ctx.spent = reduction, inplace_grad, False
        return _reduce(rows, reduction, den).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # grad_output has the loss's dtype, the gradient's: the product of two bf16/fp16 values is
        # exact in float32, so torch's elementwise multiply rounds it once (per-row scales for "none").
        go = grad_output[:, None] if ctx.reduction == "none" else grad_output
        if not ctx.inplace:  # the stored gradient stays intact: backward may run again
            return grad * go, *([None] * 7)
        # inplace_grad: scale in place too (no N x C allocation), so only one backward is possible
        if ctx.spent:
            raise RuntimeError("cross_entropy(inplace_grad=True): backward can run only once")
        ctx.spent = True
        return grad.mul_(go), *([None] * 7)


def _reduce(rows, reduction, den):
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / den[0]


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  lse_square_scale=0.0, inplace_grad=False):
    """F.cross_entropy for (N, C) logits and int64 class targets, plus an optional z-loss
    (lse_square_scale * logsumexp^2 per non-ignored row). inplace_grad=True stores the gradient
    in the logits' own memory, overwriting them."""
    _check_device(logits)
    if target.is_floating_point():
        raise NotImplementedError("class-probability targets are not supported (integer class targets only)")
    if logits.dim() != 2 or target.dim() != 1:
        raise NotImplementedError(f"only (N, C) logits with (N,) targets, got {tuple(logits.shape)}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise NotImplementedError(f"dtype {logits.dtype}")
    target = target.contiguous()
    if weight is not None:
        weight = weight.contiguous()
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    if need_grad:
        return _CrossEntropy.apply(logits, target, weight, ignore_index, reduction, float(label_smoothing),
                                   float(lse_square_scale), bool(inplace_grad))
    x = _row_major(logits)
    den = _mean_den(target, weight, ignore_index, _acc_dtype(x.dtype)) if reduction == "mean" else None
    rows = _launch(x, target, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                   lse_square_scale=lse_square_scale, den=den if den is not None else x, grad=None)
    return _reduce(rows, reduction, den).to(logits.dtype)
