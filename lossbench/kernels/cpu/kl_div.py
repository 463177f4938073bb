"""Fused KL divergence for CPU.

The compiled kernel (lossbench/kernels/native/kl_div.cpp) runs where it builds: forward one read of
input and target (loss summed in float64, in chunk order), backward one read of the target and one
write of the gradient. Without a compiler (or with LOSSBENCH_NATIVE=0) the Python path below runs,
and the `fused` rows say so in their convention column.

The gradient with respect to the input is -target / scale (-exp(target) / scale for log targets),
independent of the input: the forward sweep over cache-sized chunks only reduces the loss (no
full-size temporaries), and backward writes the gradient in one pass over the target, grad_output
folded in (the gradient rounded once). Both sweeps run chunks on the worker threads of
cross_entropy.run_chunks. Memory: the gradient (and the loss itself for reduction="none"). Pointwise loss follows
torch: target * (log target - input) with xlogy's 0 * log 0 = 0, or exp(t) * (t - input).
"""
from __future__ import annotations

import ctypes
import math

import torch

from .cross_entropy import compute_dtype, row_ranges, run_chunks

__all__ = ["kl_div"]

CHUNK_ELEMS = 1 << 18  # 1 MiB of float32 per chunk and buffer: cache-resident per worker thread

_REDUCTIONS = ("none", "mean", "sum", "batchmean")


def _pointwise(xc: torch.Tensor, tc: torch.Tensor, log_target: bool, cd: torch.dtype) -> torch.Tensor:
    """Pointwise KL of a chunk in the compute dtype (chunk-sized temporaries only)."""
    t = tc.to(cd)  # t may be the caller's target itself: never written
    if log_target:
        out = torch.sub(t, xc)  # exp(t) * (t - x)
        return out.mul_(torch.exp(t))
    out = torch.xlogy(t, t)  # xlogy(t, t) - t * x: 0 where t == 0
    return out.sub_(torch.mul(t, xc))


class _Layout:
    """How one call walks its tensors: flat element ranges when every tensor involved is contiguous,
    else ranges of dim-0 rows (any strides)."""

    def __init__(self, tensors):
        self.flat = all(t.is_contiguous() for t in tensors)
        ref = tensors[0]
        if self.flat:
            self.n, self.step = ref.numel(), CHUNK_ELEMS
        else:
            self.n = ref.shape[0]
            self.step = max(1, CHUNK_ELEMS // max(1, ref[0].numel()))
        self.ranges = row_ranges(self.n, self.step)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1) if self.flat else t


def kl_forward(input: torch.Tensor, target: torch.Tensor, reduction: str, log_target: bool):
    cd = compute_dtype(input.dtype)
    out = None
    if reduction == "none":
        out = torch.empty_like(input)
    lay = _Layout([input, target] + ([out] if out is not None else []))
    x, t = lay.view(input.detach()), lay.view(target.detach())
    o = lay.view(out) if out is not None else None
    partial = torch.zeros(len(lay.ranges), dtype=torch.float64)

    def do(a: int, b: int, slot: int) -> None:
        pw = _pointwise(x[a:b], t[a:b], log_target, cd)
        if o is not None:
            o[a:b].copy_(pw)
        else:
            partial[a // lay.step] = pw.sum(dtype=torch.float64)

    run_chunks(do, lay.ranges)
    if reduction == "none":
        return out
    total = partial.sum()
    if reduction == "mean":
        total = total / input.numel()
    elif reduction == "batchmean":
        total = total / input.shape[0]
    return total.to(input.dtype)


def _scale(reduction: str, input: torch.Tensor) -> float:
    if reduction == "mean":
        return float(input.numel())
    if reduction == "batchmean":
        return float(input.shape[0])
    return 1.0


class _KLDiv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, reduction, log_target):
        loss = kl_forward(input, target, reduction, log_target)
        ctx.save_for_backward(target)
        ctx.reduction, ctx.log_target, ctx.scale = reduction, log_target, _scale(reduction, input)
        # the gradient takes the layout autograd wants for input.grad (input's, when dense)
        ctx.in_dtype, ctx.in_shape = input.dtype, input.shape
        ctx.g_stride = torch.empty_like(input, device="meta").stride()
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (target,) = ctx.saved_tensors
        dtype = ctx.in_dtype
        cd = compute_dtype(dtype)
        g = torch.empty_strided(ctx.in_shape, ctx.g_stride, dtype=dtype)
        none = ctx.reduction == "none"
        lay = _Layout([g, target] + ([grad_output] if none else []))
        gv, t = lay.view(g), lay.view(target)
        go = lay.view(grad_output) if none else None
        factor = None if none else -float(grad_output) / ctx.scale
        direct = not none and not ctx.log_target and target.dtype == dtype

        def do(a: int, b: int, slot: int) -> None:
            if direct:  # -t * go / scale in one op, rounded once
                torch.mul(t[a:b], factor, out=gv[a:b])
                return
            v = t[a:b].to(cd)
            v = v.exp() if ctx.log_target else v
            if none:
                gv[a:b].copy_(v.mul(go[a:b]).neg_())
            else:
                gv[a:b].copy_(v.mul(factor))

        run_chunks(do, lay.ranges)
        return g, None, None, None


# --- the compiled kernel (lossbench/kernels/native/kl_div.cpp) --------------------------------------
# Why the gradient is made in backward, not written in forward for grad_output == 1 (as the native
# cross-entropy does): it needs only the target, and grad_output is known only in backward. Written in
# forward, any grad_output other than 1 costs a second pass (read + write of the gradient): 5 tensor
# passes instead of the 4 here (forward: read input and target; backward: read target, write gradient),
# and grad_output 1 would save one read. The harness, like a scaled or accumulated loss, passes
# grad_output != 1.

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def native_lib():
    """The compiled kernel library, or None (no compiler, a build error, LOSSBENCH_NATIVE=0)."""
    from .. import native

    try:
        lib = native.load("kl_div")
    except native.NativeUnavailable:
        return None
    if getattr(lib.lb_kl_loss, "argtypes", None) is None:
        lib.lb_kl_loss.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_int64, ctypes.POINTER(ctypes.c_double)]
        lib.lb_kl_grad.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_int64, ctypes.c_double]
    return lib


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of t is contiguous."""
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.shape[d] != 1:
            if t.stride(d) != expected:
                return False
            expected *= t.shape[d]
    return True


def _flat_together(tensors) -> bool:
    """Same shape and strides, and those strides cover one dense block: elementwise kernels may walk
    the memory of all of them as one flat array."""
    ref = tensors[0]
    return all(t.shape == ref.shape and t.stride() == ref.stride() and _dense(t)
               for t in tensors)


def _buffer_like(ref: torch.Tensor) -> torch.Tensor:
    """Uninitialised tensor with ref's shape and (dense) strides, from native.grad_buffer (huge pages
    for large buffers): contiguous in ref's memory order, permuted back."""
    from .. import native

    order = sorted(range(ref.dim()), key=lambda d: (-ref.stride(d), d))
    buf = native.grad_buffer(tuple(ref.shape[d] for d in order), ref.dtype)
    inverse = [order.index(d) for d in range(ref.dim())]
    return buf.permute(inverse)


def _same_layout(tensors):
    """The tensors as they are when they share one dense layout, else contiguous copies."""
    return tensors if _flat_together(tensors) else [t.contiguous() for t in tensors]


class _NativeKLDiv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, reduction, log_target, lib):
        x, t = _same_layout([input.detach(), target.detach()])
        code, n = _DTYPE_CODE[x.dtype], x.numel()
        if reduction == "none":
            loss = _buffer_like(x)
            if lib.lb_kl_loss(code, int(log_target), x.data_ptr(), t.data_ptr(), loss.data_ptr(), n, None) != 0:
                raise RuntimeError(f"kl_div native: dtype {x.dtype} rejected")
        else:
            total = ctypes.c_double()
            if lib.lb_kl_loss(code, int(log_target), x.data_ptr(), t.data_ptr(), None, n, ctypes.byref(total)) != 0:
                raise RuntimeError(f"kl_div native: dtype {x.dtype} rejected")
            s = torch.tensor(total.value, dtype=torch.float64)
            if reduction != "sum":  # an empty input divides 0 by 0: NaN, as torch
                s = s / _scale(reduction, input)
            loss = s.to(input.dtype)
        ctx.save_for_backward(target)
        ctx.reduction, ctx.log_target, ctx.scale, ctx.lib = reduction, log_target, _scale(reduction, input), lib
        # the gradient takes the layout autograd wants for input.grad (input's, when dense)
        ctx.like = torch.empty_like(input, device="meta")
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (target,) = ctx.saved_tensors
        like = ctx.like
        t = target.detach()
        if ctx.reduction == "none":
            go = grad_output.detach().to(like.dtype)
            if _flat_together([like, t, go]):
                g = _buffer_like(like)
            else:
                t, go = t.contiguous(), go.contiguous()
                g = _buffer_like(t)
            go_ptr, factor = go.data_ptr(), 0.0
        else:
            if not _flat_together([like, t]):
                t = t.contiguous()
            g = _buffer_like(t)
            go_ptr = None  # the factor in float64, the product rounded once in the kernel
            factor = float(grad_output) / ctx.scale if ctx.scale else math.nan
        if ctx.lib.lb_kl_grad(_DTYPE_CODE[t.dtype], int(ctx.log_target), t.data_ptr(), go_ptr, g.data_ptr(),
                              t.numel(), factor) != 0:
            raise RuntimeError(f"kl_div native: dtype {t.dtype} rejected")
        return g, None, None, None, None


def kl_div(input, target, *, reduction="batchmean", log_target=False):
    """F.kl_div(input, target, reduction=..., log_target=...), fused on CPU (gradient wrt input)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not (input.is_floating_point() and target.is_floating_point()):
        raise NotImplementedError("kl_div needs floating-point input and target")
    if input.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise NotImplementedError(f"dtype {input.dtype} is not supported")
    if input.shape != target.shape:
        raise NotImplementedError("broadcasting input and target is not supported")
    if input.dim() == 0:
        raise NotImplementedError("0-d input is not supported")
    if input.device.type != "cpu" or target.device.type != "cpu":
        raise NotImplementedError("CPU kernel: tensors must be on the CPU")
    if target.requires_grad:
        raise NotImplementedError("gradient with respect to the target is not supported")
    lib = native_lib() if input.dtype == target.dtype else None
    if lib is not None:
        return _NativeKLDiv.apply(input, target, reduction, bool(log_target), lib)
    return _KLDiv.apply(input, target, reduction, bool(log_target))
