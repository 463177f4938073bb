"""The compiled KL kernel (lossbench/kernels/native/kl_div.cpp) behind kernels.cpu.kl_div: every option
and dtype against the float64 reference, torch's special values, layouts, backward semantics, the
fallback without the kernel (and its row note), bad input; and linear_ce's per-chunk loss through the
native cross-entropy kernel."""
import ctypes
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from lossbench import reference
from lossbench.kernels import native
from lossbench.kernels.cpu import kl_div
from lossbench.runners.accuracy import rel_l2, worst_row_err

kl_mod = sys.modules["lossbench.kernels.cpu.kl_div"]

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
REDUCTIONS = ["batchmean", "mean", "sum", "none"]
# relative L2 error budgets against float64 (loss, gradient): a few times each dtype's rounding floor
# (the gradient is -t * go / scale rounded once; the loss is summed in float64)
BUDGET = {torch.float64: (1e-13, 1e-15), torch.float32: (2e-6, 1e-7),
          torch.bfloat16: (1e-3, 3e-4), torch.float16: (1.5e-4, 6e-5)}


def _lib_or_skip():
    lib = kl_mod.native_lib()
    if lib is None:
        pytest.skip(native.unavailable_reason("kl_div") or "kl_div kernel unavailable")
    return lib


def _inputs(shape, dtype, log_target, gen, layout="contig"):
    x = torch.log_softmax(torch.randn(shape, generator=gen, dtype=torch.float64), -1)
    if log_target:
        t = torch.log_softmax(2 * torch.randn(shape, generator=gen, dtype=torch.float64), -1)
    else:
        t = torch.softmax(2 * torch.randn(shape, generator=gen, dtype=torch.float64), -1)
        t[..., :5] = 0.0  # 0 * log 0 = 0
    x, t = x.to(dtype), t.to(dtype)
    if layout == "permuted":  # dense, not contiguous: walked flat in the kernel
        x, t = x.mT.contiguous().mT, t.mT.contiguous().mT
    elif layout == "strided":  # not dense: copied to contiguous first
        x, t = torch.cat([x, x], -1)[..., ::2], torch.cat([t, t], -1)[..., ::2]
    elif layout == "mixed":  # dense, different layouts
        t = t.mT.contiguous().mT
    return x, t


def _grad_output(reduction, shape, dtype, gen):
    if reduction == "none":
        return torch.randn(shape, generator=gen).to(dtype)
    return (0.5 + 1.5 * torch.rand((), generator=gen)).to(dtype)


def _errors(x, t, go, reduction, log_target):
    """(loss rel err, grad rel err, worst-row grad rel err) of kl_div against float64, each less 1.5 times
    its rounding floor, and the loss."""
    xr = x.clone().requires_grad_(True)
    loss = kl_div(xr, t, reduction=reduction, log_target=log_target)
    loss.backward(go)
    assert loss.dtype == x.dtype and xr.grad.dtype == x.dtype and xr.grad.shape == x.shape
    x64 = x.double().requires_grad_(True)
    ref = reference.definition("kl")(x64, t.double(), reduction=reduction, log_target=log_target)
    (g64,) = torch.autograd.grad(ref, x64, go.double())
    g = xr.grad.double()
    row = worst_row_err(g.reshape(-1, g.shape[-1]), g64.reshape(-1, g.shape[-1]))
    # over the rounding floor (the float64 result rounded once to the dtype): float16's mean gradient
    # t / numel underflows, which no float16 result can avoid
    lf = rel_l2(ref.detach().to(x.dtype).double(), ref.detach())
    gf = rel_l2(g64.to(x.dtype).double(), g64)
    rf = worst_row_err(g64.to(x.dtype).double().reshape(-1, g.shape[-1]), g64.reshape(-1, g.shape[-1]))
    return rel_l2(loss.detach().double(), ref.detach()) - 1.5 * lf, rel_l2(g, g64) - 1.5 * gf, row - 1.5 * rf, loss


# --- fast: the kernel builds and agrees with float64 ----------------------------------------------
def test_kernel_builds_and_matches_float64():
    _lib_or_skip()
    gen = torch.Generator().manual_seed(0)
    for log_target in (False, True):
        for reduction in REDUCTIONS:
            x, t = _inputs((37, 1000), torch.float32, log_target, gen)
            go = _grad_output(reduction, x.shape, torch.float32, gen)
            le, ge, row, loss = _errors(x, t, go, reduction, log_target)
            assert type(loss.grad_fn).__name__ == "_NativeKLDivBackward"
            budget = BUDGET[torch.float32]
            assert le < budget[0] and ge < budget[1] and row < 2 * budget[1], (reduction, log_target, le, ge, row)


# --- every option, dtype and layout ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("layout", ["contig", "3d", "permuted", "strided", "mixed"])
def test_grid(dtype, reduction, log_target, layout):
    _lib_or_skip()
    gen = torch.Generator().manual_seed(1)
    shape = (6, 5, 301) if layout == "3d" else (65, 1537)  # tails of the 16-lane blocks and chunks
    x, t = _inputs(shape, dtype, log_target, gen, "contig" if layout == "3d" else layout)
    go = _grad_output(reduction, shape, dtype, gen)
    le, ge, row, _ = _errors(x, t, go, reduction, log_target)
    budget = BUDGET[dtype]
    assert le < budget[0], le
    assert ge < budget[1] and row < 2 * budget[1], (ge, row)


def test_large_multi_chunk_sum_and_thread_count():
    """Many chunks (2^15 elements each) on several threads: float64 partial sums added in chunk order,
    so the loss has the same bits whatever the thread count. The gradient (10 MB, written in 2 MiB
    pieces, the last one short) is the same on any thread count and is -t * grad_output everywhere."""
    _lib_or_skip()
    gen = torch.Generator().manual_seed(2)
    x, t = _inputs((64, 40000), torch.float32, False, gen)
    threads = torch.get_num_threads()
    go = torch.tensor(0.75)

    def run():
        xg = x.clone().requires_grad_(True)
        loss = kl_div(xg, t, reduction="sum")
        loss.backward(go)
        return loss.detach(), xg.grad

    try:
        torch.set_num_threads(1)
        one, g1 = run()
        torch.set_num_threads(max(2, threads))
        many, g2 = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many) and torch.equal(g1, g2)
    assert torch.equal(g1, -(t.double() * 0.75).float())  # every piece written, rounded once
    ref = reference.definition("kl")(x.double(), t.double(), reduction="sum")
    assert abs(one.double() - ref) / abs(ref) < 1e-6


def test_log_f32_ulp():
    """The kernel's own log: at most 2 ulp over positive floats (subnormals to FLT_MAX), and torch's
    special values."""
    lib = _lib_or_skip()
    lib.lb_kl_log_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    gen = torch.Generator().manual_seed(3)
    bits = torch.randint(1, 0x7F800000, (1 << 20,), generator=gen, dtype=torch.int32)
    v = torch.cat([bits.view(torch.float32), torch.linspace(0.5, 2.0, 100001)])
    y = torch.empty_like(v)
    lib.lb_kl_log_f32(v.data_ptr(), y.data_ptr(), v.numel())
    ref = torch.log(v.double())
    ulp = (ref.float().nextafter(torch.tensor(math.inf)) - ref.float()).double()  # ulp at the result
    err = ((y.double() - ref).abs() / ulp)[ref != 0]
    assert float(err.max()) <= 2.0, float(err.max())
    sp = torch.tensor([0.0, -0.0, math.inf, -1.0, math.nan, -math.inf, 1.0])
    out = torch.empty_like(sp)
    lib.lb_kl_log_f32(sp.data_ptr(), out.data_ptr(), sp.numel())
    assert torch.equal(out[:3], torch.tensor([-math.inf, -math.inf, math.inf]))
    assert bool(out[3:6].isnan().all()) and out[6] == 0.0


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_special_values_as_torch(log_target, dtype):
    """Zero targets (0 * log 0 = 0), negative / NaN / infinite targets and inputs: NaN and inf where
    torch's F.kl_div has them, in the pointwise loss and the gradient."""
    _lib_or_skip()
    vals = [0.0, -0.0, 1e-45, 0.3, 1.0, -0.5, math.inf, -math.inf, math.nan, -200.0, 80.0]
    tt = torch.tensor(vals, dtype=dtype).repeat_interleave(len(vals))
    xx = torch.tensor(vals, dtype=dtype).repeat(len(vals))
    if dtype == torch.float32:
        tt[2::len(vals)] = 1e-45  # a subnormal float32 target
    got = kl_div(xx, tt, reduction="none", log_target=log_target)
    want = F.kl_div(xx, tt, reduction="none", log_target=log_target)
    assert torch.equal(got.isnan(), want.isnan()), (tt[got.isnan() != want.isnan()], xx[got.isnan() != want.isnan()])
    fin = ~want.isnan()
    assert torch.equal(got[fin].isinf(), want[fin].isinf())
    close = fin & ~want.isinf()
    assert torch.allclose(got[close], want[close], rtol=1e-6, atol=1e-30)
    xr = xx.clone().requires_grad_(True)
    kl_div(xr, tt, reduction="sum", log_target=log_target).backward()
    xw = xx.clone().requires_grad_(True)
    F.kl_div(xw, tt, reduction="sum", log_target=log_target).backward()
    assert torch.equal(xr.grad.isnan(), xw.grad.isnan())
    ok = ~xw.grad.isnan()
    assert torch.allclose(xr.grad[ok], xw.grad[ok], rtol=1e-6, atol=0)


def test_empty_input_means_are_nan():
    _lib_or_skip()
    x = torch.empty(0, 7)
    for reduction, want in (("sum", 0.0), ("mean", math.nan), ("batchmean", math.nan)):
        got = kl_div(x, x.clone(), reduction=reduction)
        ref = F.kl_div(x, x.clone(), reduction=reduction)
        assert (math.isnan(got) and math.isnan(ref)) or float(got) == float(ref) == want


# --- backward semantics -------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
def test_gradcheck(reduction, log_target):
    _lib_or_skip()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(5, 7, generator=gen, dtype=torch.float64), 1)
    t = t.log() if log_target else t
    fn = lambda z: kl_div(z, t, reduction=reduction, log_target=log_target)  # noqa: E731
    assert type(fn(x).grad_fn).__name__ == "_NativeKLDivBackward"
    assert torch.autograd.gradcheck(fn, (x,))


def test_retain_graph_grad_layout_and_inputs_untouched():
    _lib_or_skip()
    gen = torch.Generator().manual_seed(5)
    x, t = _inputs((30, 500), torch.float32, False, gen, "permuted")
    saved = (x.clone(), t.clone())
    xr = x.clone().requires_grad_(True)
    assert xr.stride() == x.stride()
    loss = kl_div(xr, t)
    loss.backward(torch.tensor(2.0), retain_graph=True)
    first = xr.grad.clone()
    assert xr.grad.stride() == xr.stride()  # made in input's layout: adopted as .grad without a copy
    loss.backward(torch.tensor(2.0))
    assert torch.equal(xr.grad, 2 * first)
    assert torch.equal(x, saved[0]) and torch.equal(t, saved[1])
    # grad_output 1: the gradient is exactly -t / N, rounded once
    xr.grad = None
    kl_div(xr, t).backward()
    assert torch.equal(xr.grad, (-(t.double() / 30)).float())


def test_no_grad_forward_and_target_dtype_mismatch():
    _lib_or_skip()
    gen = torch.Generator().manual_seed(6)
    x, t = _inputs((20, 300), torch.float32, False, gen)
    with torch.no_grad():
        a = kl_div(x, t, reduction="none")
    ref = reference.definition("kl")(x.double(), t.double(), reduction="none")
    assert rel_l2(a.double(), ref) < BUDGET[torch.float32][0]
    # input and target of different dtypes: the Python path (the kernel takes one dtype)
    loss = kl_div(x.requires_grad_(True), t.double())
    assert type(loss.grad_fn).__name__ == "_KLDivBackward"


# --- fallback without the kernel --------------------------------------------------------------------
def test_fallback_without_native_and_row_note(monkeypatch):
    from lossbench import registry, sweep
    from lossbench.cases import Case

    gen = torch.Generator().manual_seed(7)
    x, t = _inputs((25, 400), torch.float32, True, gen)
    monkeypatch.setenv("LOSSBENCH_NATIVE", "0")
    assert kl_mod.native_lib() is None
    xr = x.clone().requires_grad_(True)
    loss = kl_div(xr, t, log_target=True)
    assert type(loss.grad_fn).__name__ == "_KLDivBackward"  # today's Python path
    loss.backward(torch.tensor(0.7))
    x64 = x.double().requires_grad_(True)
    ref = reference.definition("kl")(x64, t.double(), reduction="batchmean", log_target=True)
    (g64,) = torch.autograd.grad(ref, x64, torch.tensor(0.7, dtype=torch.float64))
    assert rel_l2(loss.detach().double(), ref.detach()) < 1e-5 and rel_l2(xr.grad.double(), g64) < 1e-6
    impl = next(i for i in registry.implementations("kl") if i.name == "fused")
    case = Case.make("kl", 8, 16, "float32", "cpu")
    rows = list(sweep.impl_rows({}, case, impl, ["fwd_bwd"], status="ok"))
    note = "native kernel unavailable, Python fallback (native kernels disabled (LOSSBENCH_NATIVE=0))"
    assert rows[0]["convention"] == note and impl.convention_for(case) == note
    assert impl.convention_for(Case.make("kl", 8, 16, "float32", "cuda")) is None
    monkeypatch.setenv("LOSSBENCH_NATIVE", "1")
    if native.unavailable_reason("kl_div") is None:
        assert impl.convention_for(case) is None


# --- bad input: one-line errors ---------------------------------------------------------------------
@pytest.mark.parametrize("args, kwargs, exc", [
    ((torch.randn(4, 5), torch.rand(1, 5)), {}, NotImplementedError),           # broadcasting
    ((torch.randn(4, 5), torch.rand(4, 5)), {"reduction": "avg"}, ValueError),  # unknown reduction
    ((torch.randint(0, 3, (4, 5)), torch.rand(4, 5)), {}, NotImplementedError),  # integer input
    ((torch.randn(4, 5).to(torch.complex64), torch.rand(4, 5)), {}, NotImplementedError),
    ((torch.tensor(0.5), torch.tensor(0.5)), {}, NotImplementedError),            # 0-d
    ((torch.randn(4, 5), torch.rand(4, 5, requires_grad=True)), {}, NotImplementedError),  # target grad
])
def test_bad_input_one_line_errors(args, kwargs, exc):
    with pytest.raises(exc) as info:
        kl_div(*args, **kwargs)
    assert "\n" not in str(info.value) and str(info.value)


# --- linear_ce: the per-chunk loss through the native cross-entropy kernel -----------------------------
lce_mod = sys.modules["lossbench.kernels.cpu.linear_cross_entropy"]


def _ce_lib_or_skip():
    if lce_mod.ce_native_lib() is None:
        pytest.skip(native.unavailable_reason("cross_entropy") or "cross_entropy kernel unavailable")


def _linear_case(N, H, V, dtype, bias, ignore_frac, gen, peaked=False):
    h = torch.randn(N, H, generator=gen).to(dtype)
    w = (torch.randn(V, H, generator=gen) / math.sqrt(H) * (8 if peaked else 2)).to(dtype)
    b = (0.1 * torch.randn(V, generator=gen)).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=gen)
    if peaked:  # the target's logit far above the rest: p_y near 1, the gradient all in 1 - p_y
        w64 = w.double()
        y = (h.double() @ w64.T).argmax(1)
    y[torch.rand(N, generator=gen) < ignore_frac] = -100
    return h, w, b, y


def _linear_errors(h, w, b, y, go, **kw):
    from lossbench.kernels.cpu import linear_cross_entropy

    leaves = [t.clone().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
    loss = linear_cross_entropy(leaves[0], leaves[1], y, bias=leaves[2] if b is not None else None, **kw)
    loss.backward(go)
    refs = [t.detach().double().requires_grad_(True) for t in leaves]
    logits = refs[0] @ refs[1].T + (refs[2] if b is not None else 0)
    kw.pop("chunk_size", None)
    ref = reference.definition("ce")(logits, y, ignore_index=-100, **kw)
    grads = torch.autograd.grad(ref, refs, go.double())
    errs = [rel_l2(loss.detach().double(), ref.detach())]
    errs += [rel_l2(t.grad.double(), g) for t, g in zip(leaves, grads)]
    errs.append(worst_row_err(leaves[0].grad.double(), grads[0]))  # grad_hidden's worst row
    return errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_native_inner_loss(dtype, reduction, monkeypatch):
    _ce_lib_or_skip()
    calls = []
    real = lce_mod._sweep_native
    monkeypatch.setattr(lce_mod, "_sweep_native", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(8)
    h, w, b, y = _linear_case(40, 24, 1003, dtype, True, 0.25, gen)
    go = _grad_output(reduction, (40,), dtype, gen)
    errs = _linear_errors(h, w, b, y, go, reduction=reduction, label_smoothing=0.1, chunk_size=7)
    assert calls, "the native sweep did not run"
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    assert max(errs) < tol, errs


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ignore_frac, eps", [(0.0, 0.0), (0.3, 0.0), (0.3, 0.1), (1.0, 0.1)])
@pytest.mark.parametrize("peaked", [False, True])
def test_linear_ce_native_grid(dtype, reduction, bias, ignore_frac, eps, peaked):
    _ce_lib_or_skip()
    gen = torch.Generator().manual_seed(9)
    h, w, b, y = _linear_case(33, 32, 2049, dtype, bias, ignore_frac, gen, peaked)
    go = _grad_output(reduction, (33,), dtype, gen)
    errs = _linear_errors(h, w, b, y, go, reduction=reduction, label_smoothing=eps, chunk_size=5)
    if ignore_frac == 1.0 and reduction == "mean":
        return  # 0 / 0: NaN loss, as torch (checked by the shared grid)
    # low precision: the logits themselves are rounded to the input dtype (as in torch's own linear);
    # on peaked rows that shifts p_y visibly (the Python fallback measures the same: bf16 2.1e-2 and a
    # worst row 0.12; its float16 grad_hidden overflows to inf there)
    tol, row_tol = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-11, 1e-11), torch.bfloat16: (3e-2, 0.2),
                    torch.float16: (5e-3, 3e-2)}[dtype]
    assert max(errs[:-1]) < tol and errs[-1] < row_tol, errs


def test_linear_ce_native_matches_fallback_and_never_makes_n_by_v(monkeypatch):
    _ce_lib_or_skip()
    from lossbench.kernels.cpu import linear_cross_entropy

    gen = torch.Generator().manual_seed(10)
    N, V = 64, 3001
    h, w, b, y = _linear_case(N, 16, V, torch.float32, True, 0.2, gen)
    sizes = []
    real_empty, real_zeros = torch.empty, torch.zeros

    def spy(fn):
        def wrapped(*a, **k):
            t = fn(*a, **k)
            sizes.append(t.numel())
            return t
        return wrapped

    monkeypatch.setattr(torch, "empty", spy(real_empty))
    monkeypatch.setattr(torch, "zeros", spy(real_zeros))
    hn = h.clone().requires_grad_(True)
    linear_cross_entropy(hn, w, y, bias=b, chunk_size=8, label_smoothing=0.05).backward()
    monkeypatch.setattr(torch, "empty", real_empty)
    monkeypatch.setattr(torch, "zeros", real_zeros)
    assert sizes and max(sizes) < N * V  # chunk buffers and the weight gradient only: never N x V
    monkeypatch.setenv("LOSSBENCH_NATIVE", "0")
    assert lce_mod.ce_native_lib() is None
    hp = h.clone().requires_grad_(True)
    linear_cross_entropy(hp, w, y, bias=b, chunk_size=8, label_smoothing=0.05).backward()
    assert rel_l2(hn.grad.double(), hp.grad.double()) < 1e-5


def test_linear_ce_native_bad_target():
    _ce_lib_or_skip()
    from lossbench.kernels.cpu import linear_cross_entropy

    h, w = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(IndexError) as info:
        linear_cross_entropy(h, w, torch.tensor([0, 1, 5, -100]))
    assert "\n" not in str(info.value)
