"""Fused linear + cross-entropy for CPU: the [N, V] logits never exist at once.

Per chunk of rows: logits = hidden_chunk @ weight.T (+ bias) into a reused buffer, the fused
cross-entropy chunk kernel turns it in place into the unscaled gradient of the logits, then
    grad_hidden_chunk = f * (U @ weight)          (f: per-row factor, applied to the small result)
    grad_weight      += U.T @ (f * hidden_chunk)  (accumulated in float32 for low-precision inputs)
    grad_bias        += U.T @ f
so the row factors never cost a pass over the [chunk, V] buffer. For mean/sum, the forward computes
the gradients with grad_output = 1 and backward scales them; reduction="none" has a per-row
grad_output only known in backward, so its forward computes the loss alone and backward runs the
sweep again with the factors times grad_output.

The per-chunk cross-entropy is the compiled kernel (lossbench/kernels/native/cross_entropy.cpp) where it
builds: it writes the chunk's *final* logits gradient (softmax share from the row sum of the other
classes, never 1 - p_y as a difference; the mean's 1 / total and, for "none" in backward, each row's
grad_output folded in, in float64) into a float32 buffer, so the three products need no row factors.
Without it (or with LOSSBENCH_NATIVE=0) the Python chunk kernel (CERows) runs.
"""
from __future__ import annotations

import ctypes

import torch

from .cross_entropy import _REDUCTIONS, CERows, keep_graph, reduce_rows
from .cross_entropy import _DTYPE_CODE as _CE_DTYPE_CODE
from .cross_entropy import _NativeArgs as _CEArgs
from .cross_entropy import native_lib as ce_native_lib

__all__ = ["linear_cross_entropy"]

# Bytes of the [chunk, V] logits buffer (float32). Large enough for efficient GEMMs (128 rows at
# V = 65536), small next to the weight gradient that any implementation has to return.
CHUNK_BYTES = 32 << 20


def _grad_buffers(N: int, H: int, V: int, dtype, cd, has_bias: bool):
    """grad_hidden in the input dtype (each row written once); grad_weight and grad_bias accumulated over
    the chunks in the compute dtype (rounded once at the end)."""
    return (torch.empty((N, H), dtype=dtype), torch.zeros((V, H), dtype=cd),
            torch.zeros((V,), dtype=cd) if has_bias else None)


def _sweep(hidden, weight, bias, target, opts, factors, chunk_rows, need_grads):
    """One pass over row chunks: (float64 loss rows, and if need_grads the gradients scaled per row
    by `factors`: grad_hidden in the input dtype, grad_weight / grad_bias in the compute dtype)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dtype = hidden.dtype
    st = CERows(V, dtype, target, None, *opts)
    cd = st.cd
    R = max(1, min(int(chunk_rows), N))
    logits_buf = torch.empty((R, V), dtype=dtype)
    work = logits_buf if dtype == cd else torch.empty((R, V), dtype=cd)
    gh, gw, gb = _grad_buffers(N, H, V, dtype, cd, bias is not None) if need_grads else (None, None, None)
    wt = weight.t()
    for r0 in range(0, N, R):
        r1 = min(N, r0 + R)
        m = r1 - r0
        if not st.chunk_has_rows(r0, r1):
            st.skip(r0, r1)
            if need_grads:
                gh[r0:r1].zero_()
            continue
        hc = hidden[r0:r1]
        L = logits_buf[:m]
        if bias is not None:
            torch.addmm(bias, hc, wt, out=L)
        else:
            torch.mm(hc, wt, out=L)
        U = work[:m]
        st.chunk(r0, r1, L, U)
        if not need_grads:
            continue
        f = factors[r0:r1].view(m, 1)
        if st.eps == 0.0:
            f = f / st.tot[r0:r1].to(torch.float64)  # the 1 / row-sum normalisation (see CERows.chunk)
        f = f.to(cd)
        # grad_hidden: (f * U) @ W = f * (U @ W). Low precision: U rounded once to the input dtype,
        # as torch's own logits gradient is, and multiplied in the input dtype like F.linear's backward
        Ul = U if dtype == cd else L.copy_(U)
        ghc = gh[r0:r1]
        torch.mm(Ul, weight, out=ghc)
        ghc.mul_(f)
        # grad_weight += U.T @ (f * h), grad_bias += U.T @ f, in the compute dtype
        gw.addmm_(U.t(), hc.to(cd) * f)
        if gb is not None:
            gb.addmv_(U.t(), f.view(m))
    return st.finish(), gh, gw, gb


def _sweep_native(lib, hidden, weight, bias, y, opts, kmean, go, chunk_rows, need_grads):
    """_sweep with the compiled cross-entropy per chunk. y: int64 targets [N] (validated); kmean: the
    mean's 1 / total (1 otherwise); go: float64 per-row grad_output [N] (reduction="none" in backward)
    or None (1). Returns the float64 loss rows and the gradients, already scaled."""
    ignore_index, eps, _ = opts
    N, H = hidden.shape
    V = weight.shape[0]
    dtype = hidden.dtype
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    code = _CE_DTYPE_CODE[cd]  # the kernel reads the chunk's logits in the compute dtype
    R = max(1, min(int(chunk_rows), N))
    logits_buf = torch.empty((R, V), dtype=dtype)
    lc = logits_buf if dtype == cd else torch.empty((R, V), dtype=cd)
    G = torch.empty((R, V), dtype=cd) if need_grads else None
    loss = torch.empty(N, dtype=torch.float64)
    stats = torch.empty((N, 3), dtype=torch.float64)
    gh, gw, gb = _grad_buffers(N, H, V, dtype, cd, bias is not None) if need_grads else (None, None, None)
    wt = weight.t()
    args = _CEArgs(None, 0, V, V, None, int(ignore_index), None, None, float(eps), float(V), float(kmean),
                   None, None, None, 1.0, None, None)
    for r0 in range(0, N, R):
        r1 = min(N, r0 + R)
        m = r1 - r0
        hc = hidden[r0:r1]
        L = logits_buf[:m]
        if bias is not None:
            torch.addmm(bias, hc, wt, out=L)
        else:
            torch.mm(hc, wt, out=L)
        X = L if lc is logits_buf else lc[:m].copy_(L)
        args.x, args.N, args.y = X.data_ptr(), m, y[r0:r1].data_ptr()
        args.loss, args.stats = loss[r0:r1].data_ptr(), stats[r0:r1].data_ptr()
        args.go = None if go is None else go[r0:r1].data_ptr()
        args.G = None if G is None else G.data_ptr()
        if lib.lb_ce_forward(code, ctypes.byref(args)) != 0:
            raise RuntimeError(f"linear_cross_entropy native: dtype {cd} rejected")
        if not need_grads:
            continue
        Gc = G[:m]
        # grad_hidden = G @ W; low precision: G rounded once to the input dtype, as torch's own logits
        # gradient is, and multiplied in the input dtype like F.linear's backward
        Gl = Gc if dtype == cd else L.copy_(Gc)
        torch.mm(Gl, weight, out=gh[r0:r1])
        gw.addmm_(Gc.t(), hc.to(cd))  # in the compute dtype
        if gb is not None:
            gb.add_(Gc.sum(0))
    return loss, gh, gw, gb


def _native_targets(target, V, ignore_index):
    y = target.detach().to(torch.int64).contiguous()
    bad = (y != ignore_index) & ((y < 0) | (y >= V))
    if bool(bad.any()):
        raise IndexError(f"Target {int(y[bad][0])} is out of bounds.")
    return y


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, reduction, label_smoothing, chunk_rows):
        N, H = hidden.shape
        V = weight.shape[0]
        opts = (ignore_index, label_smoothing, hidden.device)
        factors, total = CERows(V, hidden.dtype, target, None, *opts).factors(reduction)
        if chunk_rows is None:
            chunk_rows = max(1, CHUNK_BYTES // max(1, V * 4))
        need = any(ctx.needs_input_grad[:3])
        eager_grads = need and reduction != "none"
        lib = ce_native_lib()
        if lib is not None:
            y = _native_targets(target, V, ignore_index)
            kmean = (1.0 / total if total != 0 else 0.0) if reduction == "mean" else 1.0
            loss_rows, gh, gw, gb = _sweep_native(lib, hidden, weight, bias, y, opts, kmean, None, chunk_rows,
                                                  eager_grads)
            ctx.native = (lib, y, kmean)
        else:
            loss_rows, gh, gw, gb = _sweep(hidden, weight, bias, target, opts, factors, chunk_rows, eager_grads)
            ctx.native = None
        ctx.grads = (gh, gw, gb) if eager_grads else None
        if need and reduction == "none":
            ctx.save_for_backward(hidden, weight, bias)
            ctx.sweep_args = (target, opts, factors, chunk_rows)
        ctx.reduction = reduction
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return reduce_rows(loss_rows, reduction, total, hidden.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        h_dt, w_dt, b_dt = ctx.dtypes
        if ctx.reduction == "none":
            hidden, weight, bias = ctx.saved_tensors
            target, opts, factors, chunk_rows = ctx.sweep_args
            go = grad_output.to(torch.float64).contiguous()
            if ctx.native is not None:
                lib, y, kmean = ctx.native
                _, gh, gw, gb = _sweep_native(lib, hidden, weight, bias, y, opts, kmean, go, chunk_rows, True)
            else:
                _, gh, gw, gb = _sweep(hidden, weight, bias, target, opts, factors * go, chunk_rows, True)
            inplace = True
        else:
            if ctx.grads is None:
                raise RuntimeError("fused linear_cross_entropy: backward through the graph a second time; "
                                   "use retain_graph=True the first time")
            gh, gw, gb = ctx.grads
            inplace = not keep_graph()
            if inplace:
                ctx.grads = None
            go = float(grad_output)
            if go != 1.0 or not inplace:
                gh = gh.mul_(go) if inplace else gh * go
                gw = gw.mul_(go) if inplace else gw * go
                if gb is not None:
                    gb = gb.mul_(go) if inplace else gb * go
        gw = gw.to(w_dt)
        if gb is not None:
            gb = gb.to(b_dt)
        return gh, gw, gb, None, None, None, None, None


def linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, chunk_size=None):
    """F.cross_entropy(F.linear(hidden, weight, bias), target, ...) without materialising the logits.
    hidden [N, H], weight [V, H], bias [V] or None, target [N] class indices; chunk_size: rows per
    chunk (default: a 32 MiB float32 logits buffer)."""
    if target.is_floating_point():
        raise NotImplementedError("probability (floating-point) targets are not supported")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise NotImplementedError("only 2-D hidden [N, H] and weight [V, H] are supported")
    if hidden.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise NotImplementedError(f"dtype {hidden.dtype} is not supported")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise NotImplementedError("hidden, weight and bias must share one dtype")
    if any(t is not None and t.device.type != "cpu" for t in (hidden, weight, bias, target)):
        raise NotImplementedError("CPU kernel: tensors must be on the CPU")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match")
    if target.dim() != 1 or target.shape[0] != hidden.shape[0]:
        raise ValueError(f"target must have shape ({hidden.shape[0]},), got {tuple(target.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError("chunk_size must be a positive number of rows")
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, int(ignore_index), reduction,
                                     float(label_smoothing), chunk_size)
