"""Fused cross-entropy for CPU: loss and gradient in one forward sweep over cache-sized row chunks.

Per chunk of rows (about one L2 of float32), on one of a few worker threads:
  1. U = exp(x) written straight into the chunk of the gradient buffer: one exp per element of an
     exact argument. (exp(x - max) when a row max is out of range: overflow / underflow guard.)
  2. p_y's numerator read, the target's entry zeroed, and the other classes summed (torch.sum's
     cascade). That sum q is 1 - p_y up to normalisation, a sum of positive terms, never the
     difference 1 - p_y: confident rows keep full relative precision in the target's gradient entry
     and in the loss, log1p(q / e_y) = -log p_y. The row total is q + e_y.
  3. the target's entry set to -q.
The buffer then holds the *unnormalised, unscaled* gradient e - q onehot; the row's 1 / total, its
class weight, the mean's 1 / denominator (0 on ignored rows) and grad_output are one float64 factor
per row, applied in backward in the one pass over the buffer that backward has to make anyway (and
the target entries are rewritten from q in float64, rounded once). Label smoothing needs the
normalised probabilities in forward (p - eps/C), so that path scales the chunk there.

Backward scales the buffer in place and hands it to autograd, which adopts it as the input's .grad
without a copy: the only full-size allocation is the gradient itself. With retain_graph (or
gradcheck) backward returns a scaled copy and leaves the stored gradient as it was.

bfloat16 / float16 logits go through float32 chunk buffers and the gradient is rounded once into
the input dtype; float64 stays float64.
"""
from __future__ import annotations

import bisect
import ctypes
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["cross_entropy"]

# Bytes of float32 work per chunk, about one worker thread's L2 (2 MiB here), so that the later touches
# of the chunk (gather, scatter, row sum) hit cache. 2, 4 and 8 MiB measured within 3% of each other.
CHUNK_BYTES = 4 << 20

_REDUCTIONS = ("none", "mean", "sum")


# --- allocation --------------------------------------------------------------------------------
# Transparent huge pages (madvise) were tried for the gradient buffer: first touch of 1 GiB fell from
# 262144 page faults to 512 on an idle machine, but took seconds longer whenever other processes
# loaded the CPUs, so buffers are plain allocations.


def alloc_like_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised buffer shaped like x: x's strides when x is dense (so autograd can adopt it as
    x.grad without a layout copy), contiguous otherwise."""
    if x.is_contiguous():
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    else:
        out = torch.empty_like(x, dtype=dtype)
    return out


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def keep_graph() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True, gradcheck): then the stored
    gradient must survive, so backward works out of place. Unknown: assume it does."""
    fn = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if fn is None:
        return True
    try:
        return bool(fn())
    except RuntimeError:
        return True


# --- chunk scheduling ----------------------------------------------------------------------------
# A chunk's work is a handful of torch ops on a cache-sized block. Run from one thread, every op is
# its own parallel region, with a barrier at its end: a few thousand barriers per call, and on a
# loaded machine each one waits for a descheduled OpenMP thread (seconds lost). Instead, one Python
# worker per torch thread takes chunks from a shared queue and runs each chunk's ops single-threaded
# (its OpenMP thread count is set to 1; ops release the GIL): no barriers, and a stalled worker only
# delays its own chunk.

def _find_gomp():
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libgomp" in line or "libiomp" in line:
                    lib = ctypes.CDLL(line.split()[-1])
                    lib.omp_set_num_threads.argtypes = [ctypes.c_int]
                    return lib
    except (OSError, AttributeError):
        pass
    return None


_omp = _find_gomp()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, executor)
_pool_lock = threading.Lock()


def _init_worker() -> None:
    torch.empty(1).add_(1)  # torch's lazy per-thread OpenMP initialisation happens first...
    _omp.omp_set_num_threads(1)  # ...then this thread's ops run single-threaded


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != n:
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)  # torch's thread count changed: retire the old workers
            _pool = (os.getpid(), n, ThreadPoolExecutor(n, thread_name_prefix="lossbench-cpu",
                                                          initializer=_init_worker))
        return _pool[2]


def run_chunks(fn, ranges) -> None:
    """fn(r0, r1, slot) for every (r0, r1) in ranges; slot in [0, workers) identifies the worker (for
    per-worker buffers). Runs inline, chunk after chunk, when torch has one thread."""
    ranges = list(ranges)
    n = torch.get_num_threads()
    if n <= 1 or len(ranges) < 2 or _omp is None:
        with torch.no_grad():
            for r0, r1 in ranges:
                fn(r0, r1, 0)
        return
    n = min(n, len(ranges))
    queue = iter(ranges)
    lock = threading.Lock()

    def worker(slot: int) -> None:
        with torch.no_grad():
            while True:
                with lock:
                    r = next(queue, None)
                if r is None:
                    return
                fn(r[0], r[1], slot)

    futures = [_executor(torch.get_num_threads()).submit(worker, i) for i in range(n)]
    for f in futures:
        f.result()


def row_ranges(n: int, rows: int):
    return [(a, min(n, a + rows)) for a in range(0, n, rows)]


# --- the per-chunk kernel ------------------------------------------------------------------------
class CERows:
    """One call's cross-entropy over row chunks. Per chunk only the work on the [rows, C] block
    happens (exp, one gather, two scatters, one row sum); every per-row quantity is written into
    [N] vectors and the loss rows are formed once, vectorised, by finish().

    The chunk's buffer U receives the unscaled gradient:
        label_smoothing == 0:  e - q onehot(y) = tot (p - onehot(y))       (factor w_y * k / tot)
        label_smoothing  > 0:  c1 p - eps/C w - (1-eps) w_y onehot(y),
                               c1 = (1-eps) w_y + eps W / C                 (factor k)
    with k = 1/sum(w_y) for mean, 1 otherwise, 0 on ignored rows (see factors())."""

    def __init__(self, n_classes: int, dtype: torch.dtype, target: torch.Tensor, weight, ignore_index: int,
                 label_smoothing: float, device=None):
        C = self.C = n_classes
        cd = self.cd = compute_dtype(dtype)
        eps = self.eps = float(label_smoothing)
        N = self.N = target.shape[0]
        target = target.to(torch.int64)
        keep = self.keep = target != int(ignore_index)
        safe = torch.where(keep, target, torch.zeros_like(target))
        self.yi = safe.view(N, 1)
        self.ignored = (~keep).nonzero().view(-1).tolist()
        if weight is not None:
            if weight.dim() != 1 or weight.shape[0] != C:
                raise ValueError(f"weight must have shape ({C},), got {tuple(weight.shape)}")
            self.w64 = weight.detach().to(device=device, dtype=torch.float64)
            self.W = float(self.w64.sum())
            self.wy = self.w64[safe] * keep  # float64 [N], 0 on ignored rows
            if eps:
                self.w_row = (weight.detach().to(device=device, dtype=cd) * (eps / C)).view(1, C)
                wy_cd = self.wy.to(cd).view(N, 1)
                self.c1 = (1.0 - eps) * wy_cd + eps * self.W / C
                self.t_entry = eps * (self.W - wy_cd) / C  # target entry before "- c1 q"
        else:
            self.w64 = self.wy = None
            self.W = float(C)
        self.tiny = 1e-300 if cd == torch.float64 else 1e-30  # p_y below: loss from the row max
        # unshifted exp(x) while every row max is in [exp_lo, exp_hi] (sums stay above tiny_tot)
        if cd == torch.float64:
            self.exp_lo, self.exp_hi, self.tiny_tot = -500.0, 600.0, 1e-200
        else:
            self.exp_lo, self.exp_hi, self.tiny_tot = -40.0, 60.0, 1e-20
        self.py = torch.empty((N, 1), dtype=cd)
        self.q = torch.empty((N, 1), dtype=cd)
        self.tot = torch.empty((N, 1), dtype=cd)
        self.x_y = torch.empty(N, dtype=torch.float64)
        self.sx = torch.empty(N, dtype=torch.float64) if eps else None
        self.fallback: list[tuple[torch.Tensor, torch.Tensor]] = []

    def factors(self, reduction: str):
        """(per-row backward factors, float64 [N], mean denominator)."""
        total = float(self.wy.sum()) if self.wy is not None else float(self.keep.sum())
        k = (1.0 / total if total != 0 else 0.0) if reduction == "mean" else 1.0
        if self.wy is not None and self.eps == 0.0:
            f = self.wy * k
        else:
            f = self.keep.to(torch.float64) * k
        return f, total

    def chunk_has_rows(self, r0: int, r1: int) -> bool:
        """False when every row of [r0, r1) is ignored."""
        if not self.ignored:
            return True
        a, b = bisect.bisect_left(self.ignored, r0), bisect.bisect_left(self.ignored, r1)
        return b - a < r1 - r0

    def chunk(self, r0: int, r1: int, xc: torch.Tensor, U: torch.Tensor) -> None:
        """Rows [r0, r1): logits xc (any dtype / strides), U the compute-dtype contiguous buffer
        (U may be xc itself: everything read from xc is read before exp overwrites it)."""
        R = r1 - r0
        yi = self.yi[r0:r1]
        alias = U.data_ptr() == xc.data_ptr()
        self.x_y[r0:r1].copy_(xc.gather(1, yi).view(R))
        m = xc.amax(1) if alias else None
        if self.eps:
            if self.w64 is None:
                torch.sum(xc, 1, dtype=torch.float64, out=self.sx[r0:r1])
            else:
                torch.mv(xc.to(torch.float64), self.w64, out=self.sx[r0:r1])
        py, q, tot = self.py[r0:r1], self.q[r0:r1], self.tot[r0:r1]
        # U <- exp(x) itself, unshifted, when that can neither overflow nor underflow the row sums:
        # one exp of an exact argument (exp(x - max) would first round x - max, an error that grows
        # with |max|), and no pass for the max. The 1 / row-sum normalisation is never applied
        # here: p_c = U_c / tot, and for label_smoothing == 0 the 1 / tot joins the per-row factor
        # that backward applies anyway.
        if alias:  # the logits are overwritten: decide from their row max, read beforehand
            shift = not (float(m.max()) <= self.exp_hi and float(m.min()) >= self.exp_lo)
            self._exp_sums(xc, U, yi, py, q, tot, m if shift else None)
        else:
            self._exp_sums(xc, U, yi, py, q, tot, None)
            if not bool(((tot < math.inf) & (tot > self.tiny_tot)).all()):  # overflow / underflow / NaN
                m = xc.amax(1)
                self._exp_sums(xc, U, yi, py, q, tot, m)
        low = py < self.tiny
        if bool(low.any()):
            # p_y at or near underflow: -log p_y = (max - x_y) - log(max_c p_c), as 1/Z = max_c p_c
            rows = low.view(-1).nonzero().view(-1)
            pmax = (U.index_select(0, rows).amax(1) / tot.view(-1).index_select(0, rows)).to(torch.float64)
            mr = (m.index_select(0, rows) if m is not None else xc.index_select(0, rows).amax(1)).to(torch.float64)
            self.fallback.append((rows + r0, (mr - self.x_y[r0:r1].index_select(0, rows)) - pmax.log()))
        eps, C = self.eps, self.C
        if eps == 0.0:
            U.scatter_(1, yi, q.neg())
        else:
            inv = tot.reciprocal()
            qn = q * inv
            if self.w64 is None:  # c1 = 1
                U.mul_(inv)
                U.sub_(eps / C)
                U.scatter_(1, yi, (eps * (C - 1) / C) - qn)
            else:
                c1 = self.c1[r0:r1]
                U.mul_(c1 * inv)
                U.sub_(self.w_row)
                U.scatter_(1, yi, self.t_entry[r0:r1] - c1 * qn)
        if self.ignored:
            a, b = bisect.bisect_left(self.ignored, r0), bisect.bisect_left(self.ignored, r1)
            if b > a:
                U.index_fill_(0, torch.tensor(self.ignored[a:b]) - r0, 0.0)

    def _exp_sums(self, xc, U, yi, py, q, tot, m) -> None:
        """U <- exp(x - m) (m: row max, or None for no shift), then p_y, the other classes' sum
        (1 - p_y up to normalisation, without cancellation: the target's entry is zeroed first, and
        torch.sum's cascade keeps it to a few ulps) and the row total."""
        if m is None:
            if xc.dtype == self.cd and U.data_ptr() != xc.data_ptr():
                torch.exp(xc, out=U)
            else:
                if U.data_ptr() != xc.data_ptr():
                    U.copy_(xc)
                U.exp_()
        else:
            mm = m.view(-1, 1).to(self.cd)
            if xc.dtype == self.cd and U.data_ptr() != xc.data_ptr():
                torch.sub(xc, mm, out=U)
            else:
                if U.data_ptr() != xc.data_ptr():
                    U.copy_(xc)
                U.sub_(mm)
            U.exp_()
        torch.gather(U, 1, yi, out=py)
        U.scatter_(1, yi, 0.0)
        torch.sum(U, 1, keepdim=True, out=q)
        torch.add(q, py, out=tot)

    def skip(self, r0: int, r1: int) -> None:
        """Rows [r0, r1) are all ignored: fill the per-row vectors with harmless values."""
        self.py[r0:r1] = 1.0
        self.q[r0:r1] = 0.0
        self.tot[r0:r1] = 1.0
        self.x_y[r0:r1] = 0.0
        if self.sx is not None:
            self.sx[r0:r1] = 0.0

    def renorm(self) -> torch.Tensor:
        """Per-row factor (float64 [N]) that backward must apply on top of factors(): 1 / tot
        of the softmax renormalisation when label_smoothing == 0 (already applied otherwise)."""
        if self.eps == 0.0:
            return self.tot.view(-1).to(torch.float64).reciprocal()
        return torch.ones(self.N, dtype=torch.float64)

    def finish(self) -> torch.Tensor:
        """Loss rows, float64 [N], 0 on ignored rows."""
        nll = torch.log1p(self.q / self.py).view(-1).to(torch.float64)  # -log p_y, accurate near p_y = 1
        for rows, vals in self.fallback:
            nll.index_copy_(0, rows, vals)
        eps, C = self.eps, self.C
        if eps == 0.0:
            loss = nll if self.wy is None else nll * self.wy
        else:
            wy = self.wy if self.wy is not None else torch.ones_like(nll)
            smooth = self.W * (self.x_y + nll) - self.sx  # sum_c w_c (-log p_c) = W lse - sum_c w_c x_c
            loss = (1.0 - eps) * wy * nll + (eps / C) * smooth
        return loss.masked_fill(~self.keep, 0.0) if self.ignored else loss


def _validate(logits: torch.Tensor, target: torch.Tensor, reduction: str, label_smoothing: float):
    if target.is_floating_point():
        raise NotImplementedError("probability (floating-point) targets are not supported")
    if logits.dim() != 2:
        raise NotImplementedError(f"only 2-D logits [N, C] are supported, got {logits.dim()}-D")
    if logits.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise NotImplementedError(f"dtype {logits.dtype} is not supported")
    if logits.device.type != "cpu":
        raise NotImplementedError("CPU kernel: logits must be on the CPU")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def reduce_rows(loss_rows: torch.Tensor, reduction: str, total: float, dtype: torch.dtype) -> torch.Tensor:
    """loss_rows float64 [N] -> the reduced loss in the input dtype (mean over zero weight: NaN)."""
    if reduction == "none":
        return loss_rows.to(dtype)
    s = loss_rows.sum()
    if reduction == "mean":
        s = s / total if total != 0 else torch.full((), math.nan, dtype=torch.float64)
    return s.to(dtype)


def ce_forward(logits, target, weight, ignore_index, reduction, label_smoothing, need_grad,
               chunk_rows=None):
    """(loss, unscaled gradient buffer or None, per-row float64 factors, (targets, q) or None)."""
    N, C = logits.shape
    dtype = logits.dtype
    st = CERows(C, dtype, target, weight, ignore_index, label_smoothing, logits.device)
    cd = st.cd
    factors, total = st.factors(reduction)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // max(1, C * 4))
    R = max(1, min(int(chunk_rows), N))
    direct = need_grad and dtype == cd and logits.is_contiguous()
    G = alloc_like_rows(logits, dtype) if need_grad else None
    x = logits.detach()
    work: dict[int, torch.Tensor] = {}

    def do(r0: int, r1: int, slot: int) -> None:
        if not st.chunk_has_rows(r0, r1):
            st.skip(r0, r1)
            if G is not None:
                G[r0:r1].zero_()
            return
        if direct:
            U = G[r0:r1]
        else:
            if slot not in work:
                work[slot] = torch.empty((R, C), dtype=cd)
            U = work[slot][: r1 - r0]
        st.chunk(r0, r1, x[r0:r1], U)
        if G is not None and not direct:
            G[r0:r1].copy_(U)

    run_chunks(do, row_ranges(N, R))
    target_q = None
    if st.eps == 0.0:
        factors = factors * st.renorm()
        target_q = (st.yi, st.q.view(-1))  # backward rewrites the target entries (-q * s) in float64
    return reduce_rows(st.finish(), reduction, total, dtype), G, factors, target_q


def scale_rows_(G: torch.Tensor, s: torch.Tensor, inplace: bool) -> torch.Tensor:
    """G [N, C] * s[:, None], in place or into a new tensor (s in the compute dtype; for a low-precision
    G the product is computed in float32 and rounded once), chunk by chunk on the worker threads."""
    s = s.view(-1, 1)
    out = G if inplace else torch.empty_like(G)
    rows = max(1, CHUNK_BYTES // max(1, G.shape[1] * G.element_size()))

    def do(r0: int, r1: int, slot: int) -> None:
        torch.mul(G[r0:r1], s[r0:r1], out=out[r0:r1])

    run_chunks(do, row_ranges(G.shape[0], rows))
    return out


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, chunk_rows, need):
        need = need and bool(ctx.needs_input_grad[0])
        loss, G, factors, target_q = ce_forward(logits, target, weight, ignore_index, reduction,
                                                label_smoothing, need, chunk_rows)
        ctx.G, ctx.factors, ctx.reduction, ctx.target_q = G, factors, reduction, target_q
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        G = ctx.G
        if G is None:
            raise RuntimeError("fused cross_entropy: backward through the graph a second time; "
                               "use retain_graph=True the first time")
        keep = keep_graph()
        if not keep:
            ctx.G = None  # hand the buffer to autograd: it becomes logits.grad without a copy
        # the whole per-row multiplier in float64, rounded once to the compute dtype
        go = grad_output.to(torch.float64)
        s64 = ctx.factors * (go if ctx.reduction == "none" else go.reshape(()))
        g = scale_rows_(G, s64.to(compute_dtype(G.dtype)), inplace=not keep)
        if ctx.target_q is not None:
            # confident rows' gradient is almost all in the target entry -(1 - p_y): one rounding
            # of the float64 product instead of three (the factor's, the stored q's, the product's)
            # (index_put_, not scatter_: torch's CPU scatter_ makes a float32 copy of a bf16 tensor)
            yi, q = ctx.target_q
            rows = torch.arange(g.shape[0], device=g.device)
            g.index_put_((rows, yi.view(-1)), (q.to(torch.float64) * s64).neg_().to(g.dtype))
        return g, None, None, None, None, None, None, None


# --- the compiled kernel (lossbench/kernels/native/cross_entropy.cpp) --------------------------------
# Same algorithm and accuracy argument as above, one C++ pass per row instead of torch ops per chunk:
# each row is read from memory once (row max; the exp pass re-reads it from L2), and the forward writes
# the *final* gradient for grad_output == 1 (1 / total, class weight, the mean's 1 / denominator, 0 on
# ignored rows all applied there, the target entry from q in double), so that backward is a no-op
# handing the buffer to autograd when grad_output is 1. Any other grad_output costs one in-place scaling
# pass (the target entries recomputed in double from the stored row statistics). The buffer is
# advised for huge pages (native.grad_buffer: 4 KiB page faults of a fresh 1 GiB buffer cost more than
# the kernel). Without a compiler (or with LOSSBENCH_NATIVE=0) the Python path above runs, and the `fused`
# rows say so in their convention column (native.cpu_row_note).

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


class _NativeArgs(ctypes.Structure):  # mirrors `struct Args` in cross_entropy.cpp
    _fields_ = [("x", ctypes.c_void_p), ("N", ctypes.c_int64), ("C", ctypes.c_int64), ("ldx", ctypes.c_int64),
                ("y", ctypes.c_void_p), ("ignore_index", ctypes.c_int64), ("wy", ctypes.c_void_p),
                ("w", ctypes.c_void_p), ("eps", ctypes.c_double), ("W", ctypes.c_double),
                ("kmean", ctypes.c_double), ("loss", ctypes.c_void_p), ("stats", ctypes.c_void_p),
                ("go", ctypes.c_void_p), ("go_scalar", ctypes.c_double), ("G", ctypes.c_void_p),
                ("Gout", ctypes.c_void_p)]


def native_lib():
    """The compiled kernel library, or None (no compiler, a build error, LOSSBENCH_NATIVE=0)."""
    from .. import native

    try:
        lib = native.load("cross_entropy")
    except native.NativeUnavailable:
        return None
    if lib.lb_ce_args_size() != ctypes.sizeof(_NativeArgs):  # a stale build of another layout
        return None
    return lib


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


class _NativeCall:
    """One call's tensors (kept alive while the kernel may use them) and its argument block."""

    def __init__(self, logits, target, weight, ignore_index, reduction, label_smoothing):
        N, C = logits.shape
        x = logits.detach()
        if x.stride(1) != 1:
            x = x.contiguous()
        cd = compute_dtype(logits.dtype)
        y = target.detach().to(torch.int64).contiguous()
        keep = y != ignore_index
        bad = keep & ((y < 0) | (y >= C))
        if bool(bad.any()):
            raise IndexError(f"Target {int(y[bad][0])} is out of bounds.")
        if weight is not None:
            if weight.dim() != 1 or weight.shape[0] != C:
                raise ValueError(f"weight must have shape ({C},), got {tuple(weight.shape)}")
            w64 = weight.detach().to(torch.float64)
            wy = (w64[torch.where(keep, y, torch.zeros_like(y))] * keep).contiguous()
            W, total = float(w64.sum()), float(wy.sum())
            w = weight.detach().to(cd).contiguous()
        else:
            wy = w = None
            W, total = float(C), float(keep.sum())
        kmean = (1.0 / total if total != 0 else 0.0) if reduction == "mean" else 1.0
        self.tensors = (x, y, wy, w)
        self.loss = torch.empty(N, dtype=torch.float64)
        self.stats = torch.empty((N, 3), dtype=torch.float64)
        self.total, self.code = total, _DTYPE_CODE[logits.dtype]
        self.args = _NativeArgs(_ptr(x), N, C, x.stride(0), _ptr(y), int(ignore_index), _ptr(wy), _ptr(w),
                                float(label_smoothing), W, kmean, _ptr(self.loss), _ptr(self.stats), None, 1.0,
                                None, None)


class _NativeCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, lib, need):
        call = _NativeCall(logits, target, weight, ignore_index, reduction, label_smoothing)
        G = None
        if need and ctx.needs_input_grad[0]:
            from .. import native

            G = native.grad_buffer(tuple(logits.shape), logits.dtype)
            call.args.G = G.data_ptr()
        lib.lb_ce_forward(call.code, ctypes.byref(call.args))
        ctx.G, ctx.call, ctx.lib, ctx.reduction = G, call, lib, reduction
        return reduce_rows(call.loss, reduction, call.total, logits.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        G = ctx.G
        if G is None:
            raise RuntimeError("fused cross_entropy: backward through the graph a second time; "
                               "use retain_graph=True the first time")
        keep = keep_graph()
        if not keep:
            ctx.G = None  # hand the buffer to autograd: it becomes logits.grad without a copy
        go = grad_output.detach().to(torch.float64)
        if ctx.reduction == "none":
            go = go.reshape(-1).contiguous()
            ones = bool((go == 1.0).all())
        else:
            go = float(go.reshape(()))
            ones = go == 1.0
        if ones:  # the forward wrote exactly this gradient
            return (G.clone() if keep else G), None, None, None, None, None, None, None
        out = torch.empty_like(G) if keep else G
        call = ctx.call
        args = _NativeArgs.from_buffer_copy(call.args)
        args.G, args.Gout = G.data_ptr(), out.data_ptr()
        if isinstance(go, float):
            args.go, args.go_scalar = None, go
        else:
            args.go = go.data_ptr()
        ctx.lib.lb_ce_rescale(call.code, ctypes.byref(args))
        return out, None, None, None, None, None, None, None


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  chunk_rows=None):
    """F.cross_entropy for 2-D logits [N, C] and class-index targets [N], fused on CPU: the compiled
    kernel when it builds here, else the Python path (chunk_rows: its chunk size, for tests)."""
    _validate(logits, target, reduction, float(label_smoothing))
    if weight is not None and weight.requires_grad:
        raise NotImplementedError("gradient with respect to class weights is not supported")
    # ctx.needs_input_grad is True under no_grad too: a gradient is computed only when a graph is built
    need = torch.is_grad_enabled() and logits.requires_grad
    lib = native_lib()
    if lib is not None:
        return _NativeCrossEntropy.apply(logits, target, weight, int(ignore_index), reduction,
                                         float(label_smoothing), lib, need)
    return _CrossEntropy.apply(logits, target, weight, int(ignore_index), reduction, float(label_smoothing),
                               chunk_rows, need)
