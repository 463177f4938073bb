"""Fused CPU kernels (lossbench.kernels.cpu) against the float64 reference: values, gradients,
option grid, confident-row precision, gradcheck, chunk counts, input immutability. Correctness only."""
import math
import sys
import zlib

import pytest
import torch

from lossbench import reference
from lossbench.kernels.cpu import cross_entropy, kl_div, linear_cross_entropy
from lossbench.runners.accuracy import rel_l2, worst_row_err

ce_mod = sys.modules["lossbench.kernels.cpu.cross_entropy"]
lce_mod = sys.modules["lossbench.kernels.cpu.linear_cross_entropy"]

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-11}
LOW = (torch.bfloat16, torch.float16)


def _use_path(path, monkeypatch):
    """Cross-entropy runs the compiled kernel ("native", skipped where it does not build) or the Python
    path ("python": LOSSBENCH_NATIVE=0 forces the fallback)."""
    if path == "python":
        monkeypatch.setenv("LOSSBENCH_NATIVE", "0")
        assert ce_mod.native_lib() is None
    elif ce_mod.native_lib() is None:
        from lossbench.kernels import native

        pytest.skip(native.unavailable_reason("cross_entropy") or "stale native build")
    return path


@pytest.fixture(params=["native", "python"])
def ce_path(request, monkeypatch):
    return _use_path(request.param, monkeypatch)


def _ignored(y, frac, gen):
    y = y.clone()
    y[torch.rand(y.shape[0], generator=gen) < frac] = -100
    if frac >= 1.0:
        y[:] = -100
    return y


def _grad_output(reduction, n, dtype, gen):
    if reduction == "none":
        return torch.randn(n, generator=gen).to(dtype)
    return (0.5 + 1.5 * torch.rand((), generator=gen)).to(dtype)


def _ref_ce(logits, target, go, weight=None, **kw):
    x64 = logits.detach().double().requires_grad_(True)
    w64 = None if weight is None else weight.double()
    loss = reference.definition("ce")(x64, target, weight=w64, ignore_index=-100, **kw)
    (g,) = torch.autograd.grad(loss, x64, go.double())
    return loss.detach(), g


def _run_ce(logits, target, go, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss = cross_entropy(x, target, **kw)
    loss.backward(go)
    return loss.detach(), x.grad


def _check_ignored_rows_zero(grad, target):
    ign = target == -100
    if bool(ign.any()):
        assert bool((grad[ign] == 0).all()), "ignored rows must have exactly zero gradient"


# --- cross_entropy: option grid ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [1000, 4099])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("path", ["native", pytest.param("python", marks=pytest.mark.slow)])
def test_ce_grid(dtype, C, reduction, weighted, ignore_frac, eps, path, monkeypatch):
    _use_path(path, monkeypatch)  # the Python path's grid is in the slow tier: the fast one keeps the kernel's
    # zlib.crc32, not hash(): str hashes change with every process (PYTHONHASHSEED), and so would the inputs
    gen = torch.Generator().manual_seed(zlib.crc32(repr((C, reduction, weighted, ignore_frac, eps)).encode()))
    N = 37
    logits = (3 * torch.randn(N, C, generator=gen)).to(dtype)
    target = _ignored(torch.randint(0, C, (N,), generator=gen), ignore_frac, gen)
    weight = (0.5 + 1.5 * torch.rand(C, generator=gen)).to(dtype) if weighted else None
    go = _grad_output(reduction, N, dtype, gen)
    kw = dict(weight=weight, reduction=reduction, label_smoothing=eps)
    ref_loss, ref_g = _ref_ce(logits, target, go, **kw)
    # small chunks: several chunks, a partial last one, and all-ignored chunks when ignore_frac is high
    loss, g = _run_ce(logits, target, go, chunk_rows=8, **kw)
    assert loss.dtype == dtype and g.dtype == dtype and g.shape == logits.shape
    assert loss.shape == ref_loss.shape
    if reduction == "mean" and ignore_frac == 1.0:
        assert math.isnan(loss.item())
        assert bool((g == 0).all())
        return
    assert rel_l2(loss.double(), ref_loss) < TOL[dtype]
    assert worst_row_err(g.double(), ref_g) < (TOL[dtype] if dtype == torch.float32 else 3e-2)
    _check_ignored_rows_zero(g, target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ce_dtypes_default_chunks(dtype, reduction, ce_path):
    gen = torch.Generator().manual_seed(1)
    N, C = 300, 2000
    logits = torch.randn(N, C, generator=gen).to(dtype)
    target = _ignored(torch.randint(0, C, (N,), generator=gen), 0.2, gen)
    go = _grad_output(reduction, N, dtype, gen)
    ref_loss, ref_g = _ref_ce(logits, target, go, reduction=reduction, label_smoothing=0.05)
    loss, g = _run_ce(logits, target, go, reduction=reduction, label_smoothing=0.05)
    tol = 2e-2 if dtype in LOW else TOL[dtype]
    assert loss.dtype == dtype and g.dtype == dtype
    assert rel_l2(loss.double(), ref_loss) < tol
    assert worst_row_err(g.double(), ref_g) < tol * 1.5
    _check_ignored_rows_zero(g, target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ce_noncontiguous(dtype, ce_path):
    gen = torch.Generator().manual_seed(2)
    N, C = 50, 1000
    logits = torch.randn(N, C, generator=gen).to(dtype).t().contiguous().t()
    assert not logits.is_contiguous()
    target = _ignored(torch.randint(0, C, (N,), generator=gen), 0.3, gen)
    weight = (0.5 + torch.rand(C, generator=gen)).to(dtype)
    for reduction in ("mean", "none"):
        go = _grad_output(reduction, N, dtype, gen)
        kw = dict(weight=weight, reduction=reduction, label_smoothing=0.1)
        ref_loss, ref_g = _ref_ce(logits, target, go, **kw)
        loss, g = _run_ce(logits, target, go, chunk_rows=16, **kw)
        assert rel_l2(loss.double(), ref_loss) < TOL[dtype]
        assert worst_row_err(g.double(), ref_g) < (TOL[dtype] if dtype == torch.float32 else 3e-2)
        _check_ignored_rows_zero(g, target)


def test_ce_extreme_logits_underflowing_target(ce_path):
    """p_y below the float32 range: the loss comes from the row max, not from log(p_y)."""
    N, C = 6, 500
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(N, C, generator=gen)
    target = torch.randint(0, C, (N,), generator=gen)
    logits[torch.arange(N), target] = -150.0
    logits[0, 7] = 80.0
    go = torch.tensor(1.0)
    ref_loss, ref_g = _ref_ce(logits, target, go, reduction="sum")
    loss, g = _run_ce(logits, target, go, reduction="sum")
    assert torch.isfinite(loss)
    assert rel_l2(loss.double(), ref_loss) < 1e-6
    assert worst_row_err(g.double(), ref_g) < 1e-5


@pytest.mark.parametrize("dtype,offset", [(torch.float32, 200.0), (torch.float64, 1000.0)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ce_shifted_exp_guard(dtype, offset, eps, ce_path):
    """Row maxima beyond exp's range (both signs): the chunk falls back to exp(x - max)."""
    gen = torch.Generator().manual_seed(16)
    N, C = 24, 300
    logits = 3 * torch.randn(N, C, generator=gen, dtype=torch.float64)
    logits[:8] += offset
    logits[8:16] -= offset
    logits = logits.to(dtype)
    target = torch.randint(0, C, (N,), generator=gen)
    go = torch.randn(N, generator=gen).to(dtype)
    ref_loss, ref_g = _ref_ce(logits, target, go, reduction="none", label_smoothing=eps)
    for rows in (4, 8, 24):  # chunks entirely shifted, mixed, or all rows together
        loss, g = _run_ce(logits, target, go, reduction="none", label_smoothing=eps, chunk_rows=rows)
        # smoothing's sum_c x_c term carries the offset: relative error scales with it
        tol = TOL[dtype] * (offset if eps else 1.0)
        assert worst_row_err(loss.double(), ref_loss) < tol
        assert worst_row_err(g.double(), ref_g) < TOL[dtype]
    # the linear path, whose logits buffer is overwritten in place: the max is read first
    h = torch.eye(N, dtype=dtype)[:, :N]
    w = logits.t().contiguous()  # [C, N]: h @ w.T reproduces the logits
    ref_loss, ref_grads = _ref_linear_ce(h, w, None, target, go, reduction="none", label_smoothing=eps)
    loss, grads = _run_linear_ce(h, w, None, target, go, reduction="none", label_smoothing=eps, chunk_size=8)
    assert worst_row_err(loss.double(), ref_loss) < TOL[dtype] * (offset if eps else 1.0)
    assert rel_l2(grads[1].double(), ref_grads[1]) < TOL[dtype]


# --- confident rows ---------------------------------------------------------------------------------
def _peaked_logits(N, C, gen):
    """True-class softmax drawn from U(0.9, 0.9999): z_y = log(p / (1 - p)) + logsumexp(others)."""
    logits = torch.randn(N, C, generator=gen, dtype=torch.float64)
    target = torch.randint(0, C, (N,), generator=gen)
    p = 0.9 + 0.0999 * torch.rand(N, generator=gen, dtype=torch.float64)
    others = logits.scatter(1, target.unsqueeze(1), -math.inf).logsumexp(1)
    logits[torch.arange(N), target] = torch.log(p / (1 - p)) + others
    return logits, target


@pytest.mark.parametrize("dtype,factor", [(torch.float32, 8.0), (torch.bfloat16, 2.0)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ce_peaked_rows_near_rounding_floor(dtype, factor, reduction, ce_path):
    gen = torch.Generator().manual_seed(4)
    N, C = 16, 32000
    logits64, target = _peaked_logits(N, C, gen)
    logits = logits64.to(dtype)  # the reference sees exactly the rounded logits
    go = _grad_output(reduction, N, dtype, gen)
    ref_loss, ref_g = _ref_ce(logits, target, go, reduction=reduction)
    loss, g = _run_ce(logits, target, go, reduction=reduction)
    floor_g = worst_row_err(ref_g.to(dtype).double(), ref_g)
    floor_l = max(rel_l2(ref_loss.to(dtype).double(), ref_loss), worst_row_err(ref_loss.to(dtype).double(), ref_loss))
    err_g = worst_row_err(g.double(), ref_g)
    assert err_g <= factor * floor_g, (err_g, floor_g)
    if reduction == "none":
        # every row's loss (about 1 - p_y, down to 1e-4) within the factor of its own rounding floor
        rel = ((loss.double() - ref_loss).abs() / ref_loss.abs()).max().item()
        floor_rows = ((ref_loss.to(dtype).double() - ref_loss).abs() / ref_loss.abs()).max().item()
        assert rel <= factor * max(floor_rows, torch.finfo(dtype).eps / 2), (rel, floor_rows)
    else:
        assert rel_l2(loss.double(), ref_loss) <= factor * max(floor_l, torch.finfo(dtype).eps / 2)


# --- gradcheck --------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps,weighted", [(0.0, False), (0.2, True)])
def test_ce_gradcheck(reduction, eps, weighted, ce_path):
    gen = torch.Generator().manual_seed(5)
    N, C = 6, 9
    x = torch.randn(N, C, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, C, (N,), generator=gen)
    target[1] = -100
    w = (0.5 + torch.rand(C, generator=gen, dtype=torch.float64)) if weighted else None
    fn = lambda z: cross_entropy(z, target, weight=w, reduction=reduction, label_smoothing=eps, chunk_rows=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_gradcheck(reduction, log_target):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(5, 7, generator=gen, dtype=torch.float64), 1)
    t = t.log() if log_target else t
    assert torch.autograd.gradcheck(lambda z: kl_div(z, t, reduction=reduction, log_target=log_target), (x,))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_ce_gradcheck(reduction, bias):
    gen = torch.Generator().manual_seed(7)
    N, H, V = 5, 4, 11
    h = torch.randn(N, H, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    target = torch.randint(0, V, (N,), generator=gen)
    target[2] = -100
    args = (h, w) + ((b,) if bias else ())

    def fn(hh, ww, bb=None):
        return linear_cross_entropy(hh, ww, target, bias=bb, reduction=reduction, label_smoothing=0.1, chunk_size=2)

    assert torch.autograd.gradcheck(fn, args)


# --- backward semantics -----------------------------------------------------------------------------
def test_ce_retain_graph_and_no_copy(ce_path):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(20, 300, generator=gen, requires_grad=True)
    target = torch.randint(0, 300, (20,), generator=gen)
    loss = cross_entropy(x, target)
    loss.backward(torch.tensor(2.0), retain_graph=True)
    first = x.grad.clone()
    loss.backward(torch.tensor(2.0))
    assert torch.allclose(x.grad, 2 * first)
    _, ref_g = _ref_ce(x, target, torch.tensor(2.0))
    assert rel_l2(first.double(), ref_g) < 1e-6
    # without retain_graph the stored buffer becomes x.grad itself (no copy); a second backward raises
    x.grad = None
    loss = cross_entropy(x, target)
    loss.backward()
    with pytest.raises(RuntimeError):
        loss.backward()


def test_no_grad_forward_matches(ce_path):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(40, 700, generator=gen)
    target = torch.randint(0, 700, (40,), generator=gen)
    ref_loss, _ = _ref_ce(x, target, torch.ones(40), reduction="none", label_smoothing=0.1)
    with torch.no_grad():
        loss = cross_entropy(x, target, reduction="none", label_smoothing=0.1)
    assert rel_l2(loss.double(), ref_loss) < 1e-5


# --- kl_div -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("layout", ["2d", "3d", "noncontig"])
def test_kl_grid(dtype, reduction, log_target, layout):
    gen = torch.Generator().manual_seed(10)
    shape = (7, 3, 50) if layout == "3d" else (33, 1000)
    x = torch.log_softmax(torch.randn(shape, generator=gen), -1)
    t = torch.softmax(2 * torch.randn(shape, generator=gen), -1)
    t[..., :5] = 0.0  # xlogy convention: zero targets contribute nothing
    if log_target:
        t = torch.log_softmax(2 * torch.randn(shape, generator=gen), -1)
    x, t = x.to(dtype), t.to(dtype)
    if layout == "noncontig":
        x, t = x.t().contiguous().t(), t.t().contiguous().t()
    go = (torch.randn(shape, generator=gen) if reduction == "none" else torch.tensor(0.7)).to(dtype)
    xr = x.clone().requires_grad_(True)
    loss = kl_div(xr, t, reduction=reduction, log_target=log_target)
    loss.backward(go)
    x64 = x.double().requires_grad_(True)
    ref = reference.definition("kl")(x64, t.double(), reduction=reduction, log_target=log_target)
    (g,) = torch.autograd.grad(ref, x64, go.double())
    tol = 2e-2 if dtype in LOW else TOL[dtype]
    assert loss.dtype == dtype and xr.grad.dtype == dtype and xr.grad.shape == x.shape
    assert rel_l2(loss.double(), ref.detach()) < tol
    assert rel_l2(xr.grad.double(), g) < tol


# --- linear_cross_entropy ---------------------------------------------------------------------------
def _ref_linear_ce(h, w, b, target, go, **kw):
    leaves = [t.detach().double().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
    logits = leaves[0] @ leaves[1].T + (leaves[2] if b is not None else 0)
    loss = reference.definition("ce")(logits, target, ignore_index=-100, **kw)
    return loss.detach(), torch.autograd.grad(loss, leaves, go.double())


def _run_linear_ce(h, w, b, target, go, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
    loss = linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2] if b is not None else None, **kw)
    loss.backward(go)
    return loss.detach(), [t.grad for t in leaves]


def _linear_inputs(N, H, V, dtype, bias, ignore_frac, gen):
    h = torch.randn(N, H, generator=gen).to(dtype)
    w = (torch.randn(V, H, generator=gen) / math.sqrt(H) * 2).to(dtype)
    b = (0.1 * torch.randn(V, generator=gen)).to(dtype) if bias else None
    target = _ignored(torch.randint(0, V, (N,), generator=gen), ignore_frac, gen)
    return h, w, b, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ignore_frac,eps", [(0.0, 0.0), (0.3, 0.1), (1.0, 0.0)])
def test_linear_ce_grid(dtype, reduction, bias, ignore_frac, eps):
    gen = torch.Generator().manual_seed(11)
    N, H, V = 29, 32, 1000
    h, w, b, target = _linear_inputs(N, H, V, dtype, bias, ignore_frac, gen)
    go = _grad_output(reduction, N, dtype, gen)
    ref_loss, ref_grads = _ref_linear_ce(h, w, b, target, go, reduction=reduction, label_smoothing=eps)
    loss, grads = _run_linear_ce(h, w, b, target, go, reduction=reduction, label_smoothing=eps, chunk_size=8)
    assert loss.dtype == dtype and all(g.dtype == dtype for g in grads)
    if reduction == "mean" and ignore_frac == 1.0:
        assert math.isnan(loss.item())
        assert all(bool((g == 0).all()) for g in grads)
        return
    tol = 3e-2 if dtype in LOW else 1e-5
    assert rel_l2(loss.double(), ref_loss) < tol
    for g, r in zip(grads, ref_grads):
        assert rel_l2(g.double(), r) < tol
    _check_ignored_rows_zero(grads[0], target)


@pytest.mark.parametrize("chunks", [1, 2, 7])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_ce_chunk_counts(chunks, reduction):
    gen = torch.Generator().manual_seed(12)
    N, H, V = 70, 24, 4099
    h, w, b, target = _linear_inputs(N, H, V, torch.float32, True, 0.2, gen)
    go = _grad_output(reduction, N, torch.float32, gen)
    ref_loss, ref_grads = _ref_linear_ce(h, w, b, target, go, reduction=reduction, label_smoothing=0.1)
    loss, grads = _run_linear_ce(h, w, b, target, go, reduction=reduction, label_smoothing=0.1,
                                 chunk_size=math.ceil(N / chunks))
    assert rel_l2(loss.double(), ref_loss) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_l2(g.double(), r) < 1e-5
    assert worst_row_err(grads[0].double(), ref_grads[0]) < 1e-4


def test_linear_ce_noncontiguous_and_default_chunks():
    gen = torch.Generator().manual_seed(13)
    N, H, V = 40, 16, 1000
    h, w, b, target = _linear_inputs(N, H, V, torch.float32, True, 0.3, gen)
    h, w = h.t().contiguous().t(), w.t().contiguous().t()
    go = torch.tensor(1.3)
    ref_loss, ref_grads = _ref_linear_ce(h, w, b, target, go, reduction="mean")
    loss, grads = _run_linear_ce(h, w, b, target, go, reduction="mean")
    assert rel_l2(loss.double(), ref_loss) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_l2(g.double(), r) < 1e-5


def test_linear_ce_peaked_rows():
    """Confident rows (p_y up to 0.9999) through the chunked path: worst-row grad of hidden near floor."""
    gen = torch.Generator().manual_seed(14)
    N, H, V = 12, 64, 8000
    h = torch.randn(N, H, generator=gen, dtype=torch.float64)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64) / math.sqrt(H)
    target = torch.randint(0, V, (N,), generator=gen)
    logits = h @ w.T
    p = 0.9 + 0.0999 * torch.rand(N, generator=gen, dtype=torch.float64)
    want = torch.log(p / (1 - p)) + logits.scatter(1, target.unsqueeze(1), -math.inf).logsumexp(1)
    wy = w[target]
    h = h + ((want - logits.gather(1, target.unsqueeze(1)).squeeze(1)) / (wy * wy).sum(1)).unsqueeze(1) * wy
    h, w = h.float(), w.float()
    go = torch.ones(N)
    ref_loss, ref_grads = _ref_linear_ce(h, w, None, target, go, reduction="none")
    loss, grads = _run_linear_ce(h, w, None, target, go, reduction="none", chunk_size=5)
    assert ((loss.double() - ref_loss).abs() / ref_loss).max() < 1e-3  # logits rounding dominates
    assert worst_row_err(grads[0].double(), ref_grads[0]) < 1e-3


# --- unsupported and immutability -------------------------------------------------------------------
def test_unsupported_raise_not_implemented():
    x = torch.randn(4, 5, 3)
    with pytest.raises(NotImplementedError):
        cross_entropy(x, torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(NotImplementedError):
        cross_entropy(torch.randn(4, 5), torch.softmax(torch.randn(4, 5), 1))
    with pytest.raises(NotImplementedError):
        linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.softmax(torch.randn(4, 5), 1))
    with pytest.raises(NotImplementedError):
        kl_div(torch.randn(4, 5), torch.rand(1, 5))


def test_inputs_not_modified():
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(30, 500, generator=gen)
    target = _ignored(torch.randint(0, 500, (30,), generator=gen), 0.3, gen)
    weight = torch.rand(500, generator=gen) + 0.5
    saved = [t.clone() for t in (x, target, weight)]
    xr = x.requires_grad_(True)
    cross_entropy(xr, target, weight=weight, label_smoothing=0.1).backward(torch.tensor(1.5))
    assert all(torch.equal(a, b) for a, b in zip((x.detach(), target, weight), saved))

    t = torch.softmax(torch.randn(30, 500, generator=gen), 1)
    xk = torch.randn(30, 500, generator=gen)
    saved = [xk.clone(), t.clone()]
    kl_div(xk.requires_grad_(True), t).backward(torch.tensor(0.5))
    assert torch.equal(xk.detach(), saved[0]) and torch.equal(t, saved[1])

    h, w, b, target = _linear_inputs(30, 16, 500, torch.float32, True, 0.3, gen)
    saved = [a.clone() for a in (h, w, b, target)]
    loss = linear_cross_entropy(h.requires_grad_(True), w.requires_grad_(True), target,
                                bias=b.requires_grad_(True), chunk_size=7)
    loss.backward(torch.tensor(0.8))
    assert all(torch.equal(a.detach(), s) for a, s in zip((h, w, b, target), saved))
