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

import itertools

import torch

from . import (LaunchConfig, TritonDtype, _check_device, _interpreting, device_function, int_type, launch,
               triton_type, unique_variants)

tl = None  # triton.language, bound by _jit at the first launch (importing triton freezes its mode)

MAX_BLOCK = 4096  # columns per step; module-level so tests can force several blocks per row
BLOCKS = (1024, 4096)  # the block sizes of the rule (see ce_config), before the MAX_BLOCK cap
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@device_function  # a jit function once bound (_jit): the compiler refuses calls to plain Python
def _rtne_bf16(x):
    # The interpreter's float32 -> bfloat16 cast truncates (the GPU rounds to nearest even), which
    # doubles the rounding error. Round the float32 bits to nearest even here; the cast that
    # follows then only drops zero bits. Called only under the interpreter (ROUND_BF16): on a GPU
    # the constexpr branch that calls it is not even generated.
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
        # Checked only by the interpreter (and by compiled kernels with TRITON_DEBUG=1); otherwise an
        # out-of-range target reads nothing and its row comes out NaN, as masked loads cannot fault.
        in_range = (y >= 0) & (y < n_cols)
        tl.device_assert(in_range, "target out of range")
        x_y = tl.load(x_row + y, mask=in_range, other=float("nan")).to(ACC)
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

        # Float arguments are float32: float64 runs read theirs from memory, here rather than before
        # the loop, where ptxas kept them across it in local memory (new names: the compiler does not
        # let this branch of the runtime `if` change an argument's type).
        if ACC == tl.float64:
            smooth_eps = tl.load(PARAMS)
            z = tl.load(PARAMS + 1)
        else:
            smooth_eps = eps
            z = z_scale
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
            w_y = tl.load(W + y, mask=in_range, other=float("nan")).to(ACC)
        else:
            w_y = tl.full([], 1.0, ACC)
        loss = w_y * nll
        # dloss/dx_c = p_c * a - (eps/C) w_c - (1 - eps) w_y [c == y]
        a = w_y
        if SMOOTH:
            w_sum = w_other + w_y
            loss = (1.0 - smooth_eps) * loss + (smooth_eps / n_cols) * (w_sum * nll + wd_sum)
            a = (1.0 - smooth_eps) * w_y + (smooth_eps / n_cols) * w_sum
        if ZLOSS:
            loss += z * lse * lse
            a += 2.0 * z * lse
        tl.store(LOSS + row, loss)

        if WRITE_GRAD:
            den = tl.load(DEN)
            scale = 1.0 / tl.where(den == 0.0, 1.0, den)  # rows of an empty mean: their 0 stays 0
            # True class with p_y = 1 - q: p_y * a - (eps/C) w_y - (1 - eps) w_y
            #   = (eps/C) w_other + 2 z lse - q * a   (no 1 - p_y difference anywhere)
            g_y = -q * a
            if SMOOTH:
                g_y += (smooth_eps / n_cols) * w_other
            if ZLOSS:
                g_y += 2.0 * z * lse
            inv_z = 1.0 / z_sum
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                mask = offs < n_cols
                x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(ACC)
                g = tl.exp(x - m) * inv_z * a
                if SMOOTH:
                    if HAS_WEIGHT:
                        wc = tl.load(W + offs, mask=mask, other=0.0).to(ACC)
                        g -= (smooth_eps / n_cols) * wc
                    else:
                        g -= smooth_eps / n_cols
                g = tl.where(offs == y, g_y, g) * scale
                if ROUND_BF16:
                    g = _rtne_bf16(g)
                tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)


def _block(n_cols: int) -> int:
    """Columns per step: the smallest of BLOCKS that holds the row (else the largest), capped at
    MAX_BLOCK. A few sizes, not the next power of two, keep the compiled variants few (aot.py)."""
    block = next((b for b in BLOCKS if n_cols <= b), BLOCKS[-1])
    return min(MAX_BLOCK, block)


def ce_config(dtype: torch.dtype, *, has_weight: bool, smooth: bool, zloss: bool, write_grad: bool, n_cols: int,
              interpret: bool = False) -> LaunchConfig:
    """The launch configuration of _ce_kernel: what _launch passes, for logits of `dtype`.

    Pointers the kernel does not read for a variant get a tensor of the type declared here: W is the
    logits without a weight (a weight must have the logits' dtype, as torch requires); DEN and
    PARAMS are acc-dtype tensors (the loss buffer when unused); G is the gradient, or the logits.
    Ints are i32: the launcher refuses more than 2^31 - 1 classes and an ignore_index outside int32,
    and copies logits whose row stride does not fit. `interpret` turns on the bfloat16 rounding
    workaround (ROUND_BF16), never compiled.

    Registers (aot.resource_table, sm_80 and sm_90): BLOCK 4096 with 8 warps is 16 columns per
    thread per step, 1024 with 4 warps 8; at most 86 registers, no variant spills. Float64 takes 16
    warps for BLOCK 4096 (8 columns per thread): with 8, ptxas stopped at 128 registers in the
    smoothing variants and spilled 8 bytes on sm_90 (up to 174 registers elsewhere); with 16 they
    need at most 96. (The kernel reads float64's PARAMS after the first loop for the same reason.)
    """
    if not 0 < n_cols < 2**31:
        raise NotImplementedError(f"{n_cols} classes: the kernel indexes a row with int32 (1 to 2^31 - 1 classes)")
    dt, acc = triton_type(dtype), triton_type(_acc_dtype(dtype))
    block = _block(n_cols)
    signature = {"X": f"*{dt}", "x_stride": "i32", "G": f"*{dt}", "g_stride": "i32", "Y": "*i64",
                 "W": f"*{dt}", "LOSS": f"*{acc}", "DEN": f"*{acc}", "PARAMS": f"*{acc}", "n_cols": "i32",
                 "ignore_index": "i32", "eps": "fp32", "z_scale": "fp32"}
    constexprs = {"HAS_WEIGHT": has_weight, "SMOOTH": smooth, "ZLOSS": zloss, "WRITE_GRAD": write_grad,
                  "ROUND_BF16": interpret and write_grad and dtype == torch.bfloat16,
                  "ACC": TritonDtype("float64" if acc == "fp64" else "float32"), "BLOCK": block}
    num_warps = 4 if block <= 1024 else 16 if acc == "fp64" else 8
    return LaunchConfig(signature, constexprs, num_warps=num_warps)


def _variant_name(dtype, cfg):
    c = cfg.constexprs
    flags = [f for f, on in (("weight", c["HAS_WEIGHT"]), ("smooth", c["SMOOTH"]), ("zloss", c["ZLOSS"]),
                             ("grad", c["WRITE_GRAD"])) if on]
    return f"{triton_type(dtype)} {'+'.join(flags) or 'plain'} BLOCK={c['BLOCK']} warps={cfg.num_warps}"


def _n_cols_probes():
    """Class counts at and around every power of two: they reach every block a rule over powers of
    two (or BLOCKS) can pick."""
    edges = {1 << k for k in range(31)} | set(BLOCKS) | {MAX_BLOCK}
    return sorted({n for e in edges for n in (e - 1, e, e + 1) if 0 < n < 2**31})


def variants():
    """Every compiled form of _ce_kernel: ce_config over its whole input domain (all dtypes, all
    flags, every block the rule picks), without the interpreter-only rounding."""
    def configs():
        for dtype, flags, n_cols in itertools.product(DTYPES, itertools.product((False, True), repeat=4),
                                                      _n_cols_probes()):
            has_weight, smooth, zloss, write_grad = flags
            cfg = ce_config(dtype, has_weight=has_weight, smooth=smooth, zloss=zloss, write_grad=write_grad,
                            n_cols=n_cols)
            yield str(dtype)[6:], _variant_name(dtype, cfg), cfg

    return list(unique_variants("ce", _ce_kernel, configs()))


def _launch(logits, target, *, weight, ignore_index, label_smoothing, lse_square_scale, den, grad):
    """Per-row losses in the accumulation dtype; writes the gradient (divided by `den`) into `grad`.

    logits: (N, C) with unit column stride and a row stride below 2^31 (_row_major); target: int64;
    weight: None or of the logits' dtype; grad: same shape and dtype as logits (may be logits
    itself), or None; den: 1-element tensor of the accumulation dtype (the mean's denominator, 1 for
    sum/none), or None without grad.
    """
    n, c = logits.shape
    acc = _acc_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    if n == 0:
        return loss
    if int_type(ignore_index) != "i32":
        raise NotImplementedError(f"ignore_index {ignore_index} does not fit in int32")
    cfg = ce_config(logits.dtype, has_weight=weight is not None, smooth=label_smoothing != 0.0,
                    zloss=lse_square_scale != 0.0, write_grad=grad is not None, n_cols=c,
                    interpret=_interpreting())
    g = grad if grad is not None else logits  # unused pointer when WRITE_GRAD is off
    params = (torch.tensor([label_smoothing, lse_square_scale], dtype=acc, device=logits.device)
              if acc == torch.float64 else loss)  # float64 only: saves a host-to-device copy per call
    launch(_ce_kernel, (n,), cfg, dict(
        X=logits, x_stride=logits.stride(0), G=g, g_stride=g.stride(0), Y=target,
        W=weight if weight is not None else logits, LOSS=loss, DEN=den if den is not None else loss,
        PARAMS=params, n_cols=c, ignore_index=ignore_index, eps=float(label_smoothing),
        z_scale=float(lse_square_scale)))
    return loss


def _row_major(x: torch.Tensor) -> torch.Tensor:
    # The kernels take a row stride (an int32) but need unit column stride; anything else costs a copy.
    return x if x.stride(-1) == 1 and x.stride(0) < 2**31 else x.contiguous()


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
    target = target.to(torch.int64).contiguous()  # torch also takes uint8 targets
    if weight is not None:
        if weight.dtype != logits.dtype:
            raise NotImplementedError(f"weight of dtype {weight.dtype} for {logits.dtype} logits "
                                      "(torch refuses it too)")
        weight = weight.contiguous()
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    if need_grad:
        return _CrossEntropy.apply(logits, target, weight, ignore_index, reduction, float(label_smoothing),
                                   float(lse_square_scale), bool(inplace_grad))
    x = _row_major(logits)
    den = _mean_den(target, weight, ignore_index, _acc_dtype(x.dtype)) if reduction == "mean" else None
    rows = _launch(x, target, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                   lse_square_scale=lse_square_scale, den=den, grad=None)
    return _reduce(rows, reduction, den).to(logits.dtype)
