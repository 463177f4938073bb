"""Linear layer + cross-entropy, chunked over tokens so the (N, V) logits never exist at once.

Per chunk of rows: logits = hidden_chunk @ weight.T (+ bias) as a float32 matmul of the input
dtype (bf16/fp16 tensor cores with float32 output on CUDA), the cross-entropy kernel writes the
chunk's loss and overwrites the logits with their gradient, then
    grad_hidden[chunk] = grad_logits @ weight,  grad_weight += grad_logits.T @ hidden_chunk,
    grad_bias += grad_logits summed over rows,
with grad_weight and grad_bias accumulated in float32. For bf16/fp16 the gradient of the logits is
rounded to the input dtype for the two matmuls, except for its largest entries (the true classes),
whose rounding residual is added back separately (see _run).

For the scalar reductions every gradient is computed in forward and backward only scales it.
"mean" needs the number of non-ignored rows before the first chunk, so it is counted first.
reduction="none" needs a per-row grad_output, unknown in forward: forward computes only the
loss and backward runs the chunks again with the rows scaled.
"""
from __future__ import annotations

import functools

import torch

from . import _check_device
from .cross_entropy import _acc_dtype, _launch, _mean_den, _reduce

CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 32 << 20}  # float32 logits per chunk


def default_chunk_size(n_rows: int, vocab: int, device: torch.device) -> int:
    rows = max(1, CHUNK_BYTES.get(device.type, 32 << 20) // (4 * vocab))
    if rows >= 64:
        rows -= rows % 64  # whole tiles for the matmuls
    return min(n_rows, rows) if n_rows else 1


@functools.cache
def _mm_has_out_dtype() -> bool:
    try:
        a = torch.zeros(16, 16, dtype=torch.bfloat16, device="cuda")
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


class _Matmul:
    """a @ b with `acc` (float32/float64) output and accumulation, from operands of the input dtype."""

    def __init__(self, dtype, acc, device):
        self.acc = acc
        self.native = dtype == acc
        self.out_dtype = not self.native and device.type == "cuda" and _mm_has_out_dtype()

    def __call__(self, a, b):
        if self.native:
            return a @ b
        if self.out_dtype:
            return torch.mm(a, b, out_dtype=self.acc)
        # Elsewhere upcast first: products of bf16/fp16 values are exact in float32, so this
        # matches a float32-accumulating low-precision matmul.
        return a.to(self.acc) @ b.to(self.acc)


def _run(hidden, weight, bias, target, *, ignore_index, label_smoothing, den, chunk, grads, row_scale=None):
    """Per-row losses; with grads=(h, w, b) flags, also those gradients (None where not wanted).
    row_scale: per-row multiplier of the gradient (reduction="none" backward)."""
    n, h_dim = hidden.shape
    acc = _acc_dtype(hidden.dtype)
    mm = _Matmul(hidden.dtype, acc, hidden.device)
    # Without a low-precision matmul with float32 output, upcast the weight once, not per chunk.
    w_mm = weight if mm.native or mm.out_dtype else weight.to(acc)
    rows = torch.empty(n, dtype=acc, device=hidden.device)
    want_h, want_w, want_b = grads if grads else (False, False, False)
    g_h = torch.empty_like(hidden) if want_h else None
    g_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
    g_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want_b else None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        h = hidden[s:e]
        logits = mm(h, w_mm.T)
        if bias is not None:
            logits += bias.to(acc)
        rows[s:e] = _launch(logits, target[s:e], weight=None, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, lse_square_scale=0.0, den=den,
                            grad=logits if grads else None)
        if not grads:
            continue
        if row_scale is not None:
            logits *= row_scale[s:e, None]
        if want_b:
            g_b += logits.sum(0)
        if mm.native:
            g, fix = logits, None
        else:
            g = logits.to(hidden.dtype)
            # Rounding the true class's gradient (-(1 - p_y), the largest entry of a row) to bf16/fp16
            # would cost as much accuracy as the final rounding; put its rounding residual back as a
            # rank-1 term per row: O(chunk * H), against O(chunk * V * H) for the matmuls.
            y = target[s:e]
            keep = y != ignore_index
            y_safe = torch.where(keep, y, 0)[:, None]
            fix = (logits.gather(1, y_safe) - g.gather(1, y_safe).to(acc)) * keep[:, None]
        del logits
        if want_h:
            g_h_chunk = mm(g, w_mm)
            if fix is not None:
                g_h_chunk += fix * w_mm[y_safe[:, 0]].to(acc)
            g_h[s:e] = g_h_chunk
        if want_w:
            g_w += mm(g.T, h)
            if fix is not None:
                g_w.index_add_(0, y_safe[:, 0], fix * h.to(acc))  # atomics on CUDA: order may vary
    return rows, g_h, g_w, g_b


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, reduction, label_smoothing, chunk):
        acc = _acc_dtype(hidden.dtype)
        den = (_mean_den(target, None, ignore_index, acc) if reduction == "mean"
               else torch.ones(1, dtype=acc, device=hidden.device))
        flags = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, den=den, chunk=chunk)
        ctx.reduction, ctx.kw, ctx.flags = reduction, kw, flags
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        if reduction == "none":  # the gradient needs grad_output's rows: recompute in backward
            rows, *_ = _run(hidden, weight, bias, target, grads=None, **kw)
            ctx.save_for_backward(hidden, weight, bias, target)
        else:
            rows, g_h, g_w, g_b = _run(hidden, weight, bias, target, grads=flags, **kw)
            ctx.save_for_backward(g_h, g_w, g_b)
        return _reduce(rows, reduction, den).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        w_dtype, b_dtype = ctx.dtypes
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            scale = grad_output.to(_acc_dtype(hidden.dtype))
            _, g_h, g_w, g_b = _run(hidden, weight, bias, target, grads=ctx.flags, row_scale=scale, **ctx.kw)
        else:
            g_h, g_w, g_b = ctx.saved_tensors
            go = grad_output.to(ctx.kw["den"].dtype)  # float32 (float64 for float64 inputs)
            g_h = None if g_h is None else g_h * grad_output.to(g_h.dtype)
            g_w = None if g_w is None else g_w * go
            g_b = None if g_b is None else g_b * go
        g_w = None if g_w is None else g_w.to(w_dtype)
        g_b = None if g_b is None else g_b.to(b_dtype)
        return g_h, g_w, g_b, None, None, None, None, None


def linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, chunk_size=None):
    """F.cross_entropy(F.linear(hidden, weight, bias), target) without materialising the logits."""
    _check_device(hidden)
    if target.is_floating_point():
        raise NotImplementedError("class-probability targets are not supported (integer class targets only)")
    if hidden.dim() != 2 or weight.dim() != 2 or target.dim() != 1:
        raise NotImplementedError(f"only hidden (N, H), weight (V, H), target (N,); got {tuple(hidden.shape)}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise NotImplementedError("hidden, weight and bias must share a dtype")
    chunk = int(chunk_size) if chunk_size else default_chunk_size(hidden.shape[0], weight.shape[0], hidden.device)
    target = target.to(torch.int64).contiguous()  # the kernel reads int64 targets (torch also takes uint8)
    grad_on = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if grad_on:
        return _LinearCrossEntropy.apply(hidden, weight, bias, target, ignore_index, reduction,
                                         float(label_smoothing), chunk)
    acc = _acc_dtype(hidden.dtype)
    den = (_mean_den(target, None, ignore_index, acc) if reduction == "mean"
           else torch.ones(1, dtype=acc, device=hidden.device))
    rows, *_ = _run(hidden, weight, bias, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                    den=den, chunk=chunk, grads=None)
    return _reduce(rows, reduction, den).to(hidden.dtype)
