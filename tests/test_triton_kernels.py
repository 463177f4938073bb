"""Triton kernels (lossbench.kernels.triton) against the float64 references, on the device they run on.

With a CUDA device the kernels compile and run on the GPU: inputs are made on the CPU (the same numbers
as without one), moved to the GPU for the kernel, and the results come back to the CPU for the float64
comparisons; the module is marked `cuda` (`make gpu-check`). Without one they run on CPU tensors under
the Triton interpreter, and the module skips when the interpreter is off. Same checks, same
tolerances, same shapes on both.
Small shapes only: the interpreter runs every program in Python.
"""
import importlib
import math
import os
import zlib

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_CUDA = DEVICE == "cuda"
if not ON_CUDA:  # before any kernel is jit-wrapped (they are wrapped lazily); left alone on a GPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from lossbench import reference  # noqa: E402
from lossbench.kernels import triton as tk  # noqa: E402
from lossbench.runners.accuracy import rel_l2, worst_row_err  # noqa: E402

# The package exports functions under the modules' names: fetch the module itself by path.
ce_mod = importlib.import_module("lossbench.kernels.triton.cross_entropy")

if ON_CUDA:
    pytestmark = pytest.mark.cuda
elif not tk.available("cpu"):
    pytest.skip("TRITON_INTERPRET is not 1 in this process", allow_module_level=True)

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


def _dev(t):
    """A tensor made on the CPU, on the device the kernels run on (None stays None)."""
    return None if t is None else t.to(DEVICE)


def _dev_kw(kw):
    return {k: _dev(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


@pytest.fixture(autouse=True, scope="module")
def _compiled_on_cuda():
    """With a CUDA device these tests are about the compiled kernels. A TRITON_INTERPRET=1 in the
    environment (the interpreter also takes CUDA tensors, through host copies) or triton imported in
    the other mode would test something else, silently: fail instead."""
    if ON_CUDA:
        assert tk.available("cuda") and not tk._interpreting(), (
            "a CUDA device is present but triton is not in compiled mode: unset TRITON_INTERPRET "
            f"(it is {os.environ.get('TRITON_INTERPRET')!r}) before anything imports triton")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _targets(n, c, ignore, g):
    y = torch.randint(0, c, (n,), generator=g)
    if ignore >= 1.0:
        return torch.full_like(y, -100)
    k = int(round(ignore * n))
    y[torch.randperm(n, generator=g)[:k]] = -100
    return y


def _grad_output(reduction, n, dtype, g):
    if reduction == "none":  # non-uniform per-row weights
        return (torch.rand(n, generator=g, dtype=F64) + 0.5).to(dtype)
    return torch.tensor(1.0, dtype=dtype)


def _ref_ce(x64, y, w64, reduction, eps, z, go):
    """float64 loss and d loss / d logits; the z-loss term is added from its definition."""
    x64 = x64.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if z == 0.0:
            loss = reference.definition("ce")(x64, y, weight=w64, ignore_index=-100, reduction=reduction, label_smoothing=eps)
        else:
            keep = y != -100
            rows = reference.definition("ce")(x64, y, weight=w64, ignore_index=-100, reduction="none", label_smoothing=eps)
            rows = rows + z * torch.logsumexp(x64, 1) ** 2 * keep
            den = (w64[torch.where(keep, y, 0)] * keep).sum() if w64 is not None else keep.sum().double()
            loss = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / den}[reduction]
        (grad,) = torch.autograd.grad(loss, x64, go.double())
    return loss.detach(), grad


def _floor(ref_grad, dtype):
    """Worst-row error of the float64 reference rounded once to `dtype`: the best achievable."""
    return worst_row_err(ref_grad.to(dtype).double(), ref_grad)


def _run_ce(x, y, go, **kw):
    """The kernel on DEVICE; loss and gradient back on the CPU, in float64."""
    x = _dev(x).detach().clone().requires_grad_(True)
    loss = tk.cross_entropy(x, _dev(y), **_dev_kw(kw))
    loss.backward(_dev(go))
    return loss.detach().cpu().double(), x.grad.cpu().double()


# --- cross-entropy: the variant grid ---------------------------------------------------------------
def _ce_grid():
    for dtype in (F32, BF16):
        for c, block in ((1000, 256), (4099, 4096)):  # 4 blocks per row; 2 blocks, the last one 3 wide
            for reduction in ("none", "mean", "sum"):
                for weighted in (False, True):
                    for ignore in (0.0, 0.3, 1.0):
                        for eps, z in ((0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)):
                            if ignore == 1.0 and (z or weighted or dtype == BF16):
                                continue  # all-ignored: the plain float32 variants suffice
                            name = (f"{str(dtype)[6:]}-C{c}-{reduction}{'-w' if weighted else ''}-ign{ignore}"
                                    f"-ls{eps}-z{z}")
                            # the fast tier: every option on float32 with 4 blocks per row, and one
                            # bfloat16 / block-tail variant with every option at once; the rest is slow
                            everything = (dtype, c, reduction, weighted, ignore, eps) == (BF16, 4099, "mean", True,
                                                                                         0.3, 0.2)
                            marks = () if (dtype, c) == (F32, 1000) or everything else (pytest.mark.slow,)
                            yield pytest.param(dtype, c, block, reduction, weighted, ignore, eps, z, id=name,
                                               marks=marks)


@pytest.mark.parametrize("dtype,c,block,reduction,weighted,ignore,eps,z", list(_ce_grid()))
def test_ce_matches_reference(monkeypatch, dtype, c, block, reduction, weighted, ignore, eps, z):
    monkeypatch.setattr(ce_mod, "MAX_BLOCK", block)
    n = 10
    g = _gen(zlib.crc32(repr((c, reduction, weighted, ignore, eps, z)).encode()))
    x = (torch.randn(n, c, generator=g, dtype=F64) * 3).to(dtype)
    y = _targets(n, c, ignore, g)
    w = (torch.rand(c, generator=g, dtype=F64) + 0.5).to(dtype) if weighted else None
    go = _grad_output(reduction, n, dtype, g)
    loss, grad = _run_ce(x, y, go, weight=w, reduction=reduction, label_smoothing=eps, lse_square_scale=z)
    ref_loss, ref_grad = _ref_ce(x.double(), y, None if w is None else w.double(), reduction, eps, z, go)

    if ignore == 1.0 and reduction == "mean":
        assert math.isnan(loss.item())  # torch's 0/0
    assert (grad[y == -100] == 0).all()
    floor = _floor(ref_grad, dtype)
    if dtype == F32:
        assert rel_l2(loss, ref_loss) < 1e-6
        assert worst_row_err(grad, ref_grad) < 1e-5
    else:
        assert rel_l2(loss, ref_loss) < 2 ** -8
        # per-row grad_output is applied to the stored bf16 gradient: a second rounding
        assert worst_row_err(grad, ref_grad) <= (2.5 if reduction == "none" else 1.5) * floor + 1e-12


# --- cross-entropy: confident rows ----------------------------------------------------------------
def _peaked_logits(n, c, g):
    """Rows whose true-class probability runs from 0.9 to 0.9999 (log-spaced in 1 - p)."""
    x = torch.randn(n, c, generator=g, dtype=F64)
    y = torch.randint(0, c, (n,), generator=g)
    p = 1 - torch.logspace(-1, -4, n, dtype=F64)
    others = x.scatter(1, y[:, None], float("-inf")).logsumexp(1)
    x[torch.arange(n), y] = torch.log(p / (1 - p)) + others
    return x, y


def _row_rel(x, ref):
    return ((x - ref).abs() / ref.abs()).max().item()


PEAKED_RATIO = {F32: 8.0, BF16: 2.0}
measured = {}  # printed by test_report_peaked_ratios (pytest -s)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ce_peaked_rows_within_floor(dtype, reduction):
    n, c = 12, 16000
    x64, y = _peaked_logits(n, c, _gen(1))
    x = x64.to(dtype)
    go = torch.ones(n, dtype=dtype) if reduction == "none" else torch.tensor(1.0, dtype=dtype)
    loss, grad = _run_ce(x, y, go, reduction=reduction)
    ref_loss, ref_grad = _ref_ce(x.double(), y, None, reduction, 0.0, 0.0, go)
    g_ratio = worst_row_err(grad, ref_grad) / _floor(ref_grad, dtype)
    if reduction == "none":
        l_ratio = _row_rel(loss, ref_loss) / _row_rel(ref_loss.to(dtype).double(), ref_loss)
    else:
        l_ratio = rel_l2(loss, ref_loss) / max(rel_l2(ref_loss.to(dtype).double(), ref_loss), 2.0 ** -60)
    measured[("ce", dtype, reduction)] = (g_ratio, l_ratio)
    assert g_ratio <= PEAKED_RATIO[dtype]
    if reduction == "none" or dtype == BF16:  # a mean's rounding floor can be exactly 0
        assert l_ratio <= PEAKED_RATIO[dtype]
    else:
        assert rel_l2(loss, ref_loss) < 1e-6


# --- cross-entropy: mechanics ---------------------------------------------------------------------
def test_ce_inplace_grad_mutates_and_matches():
    g = _gen(3)
    x0 = torch.randn(6, 777, generator=g)
    y = _targets(6, 777, 0.3, g)
    x0, y = _dev(x0), _dev(y)
    x = x0.clone().requires_grad_(True)
    tk.cross_entropy(x, y).backward()
    assert torch.equal(x.detach(), x0)  # default: the input is left alone
    leaf = x0.clone().requires_grad_(True)
    tk.cross_entropy(leaf, y, inplace_grad=True).backward()
    assert not torch.equal(leaf.detach(), x0)  # inplace: the logits now hold the gradient
    torch.testing.assert_close(leaf.grad, x.grad, rtol=0, atol=0)


def test_ce_inplace_grad_per_row_grad_output_bf16():
    g = _gen(4)
    x0 = torch.randn(5, 300, generator=g).to(BF16)
    y = _targets(5, 300, 0.0, g)
    go = (torch.rand(5, generator=g) + 0.5).to(BF16)
    x0, y, go = _dev(x0), _dev(y), _dev(go)
    grads = []
    for inplace in (False, True):
        x = x0.clone().requires_grad_(True)
        tk.cross_entropy(x, y, reduction="none", inplace_grad=inplace).backward(go)
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def test_ce_non_contiguous_inputs():
    g = _gen(5)
    wide = torch.randn(6, 900, generator=g)
    y = _targets(6, 800, 0.0, g)
    ref_loss, ref_grad = _ref_ce(wide[:, :800].double(), y, None, "mean", 0.0, 0.0, torch.tensor(1.0))
    wide = _dev(wide)
    for view in (wide[:, :800], wide.t().contiguous().t()[:, :800]):  # row stride only / column stride
        x = view.detach().requires_grad_(True)
        loss = tk.cross_entropy(x, _dev(y))
        loss.backward()
        assert rel_l2(loss.cpu().double(), ref_loss) < 1e-6 and rel_l2(x.grad.cpu().double(), ref_grad) < 1e-6


def test_ce_without_grad_and_huge_vocab_mask():
    g = _gen(6)
    x = torch.randn(2, 70001, generator=g)  # not a multiple of the block
    y = torch.tensor([70000, 5])
    with torch.no_grad():
        loss = tk.cross_entropy(_dev(x), _dev(y), reduction="none")
    ref = reference.definition("ce")(x.double(), y, reduction="none")
    assert rel_l2(loss.cpu().double(), ref) < 1e-6


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_ce_gradcheck(reduction):
    g = _gen(7)
    x = _dev(torch.randn(4, 7, generator=g, dtype=F64)).requires_grad_(True)
    y = _dev(torch.tensor([1, -100, 6, 0]))
    w = _dev(torch.rand(7, generator=g, dtype=F64) + 0.5)
    fn = lambda t: tk.cross_entropy(t, y, weight=w, reduction=reduction, label_smoothing=0.1,  # noqa: E731
                                    lse_square_scale=0.01)
    assert torch.autograd.gradcheck(fn, (x,))


def test_ce_unsupported(monkeypatch):
    x = _dev(torch.randn(4, 5)).requires_grad_(True)
    with pytest.raises(NotImplementedError):
        tk.cross_entropy(x, _dev(torch.rand(4, 5)))  # class probabilities
    with pytest.raises(NotImplementedError):
        tk.cross_entropy(_dev(torch.randn(2, 5, 3)), _dev(torch.zeros(2, 3, dtype=torch.long)))
    # CPU tensors without the interpreter are refused, not crashed: on a GPU host the interpreter is
    # off already (compiled mode); without one it is turned off here for the calls.
    if not ON_CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
    x = x.detach().cpu().requires_grad_(True)
    assert not tk.available("cpu")
    for call in (lambda: tk.cross_entropy(x, torch.zeros(4, dtype=torch.long)),
                 lambda: tk.kl_div(x, torch.rand(4, 5)),
                 lambda: tk.linear_cross_entropy(x, torch.randn(3, 5), torch.zeros(4, dtype=torch.long))):
        with pytest.raises(NotImplementedError):
            call()
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert tk.available("cpu")
    else:
        assert tk.available("cuda")


# --- KL divergence --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_matches_reference(dtype, reduction, log_target):
    g = _gen(11)
    shape = (3, 5000)  # 15000 elements: several blocks, the last one partial
    x = torch.randn(shape, generator=g, dtype=F64).log_softmax(1).to(dtype)
    t = torch.rand(shape, generator=g, dtype=F64).softmax(1)
    if log_target:
        t = t.log()
    else:
        t[torch.rand(shape, generator=g) < 0.2] = 0.0  # zero targets: 0 * log 0 = 0
    t = t.to(dtype)
    go = ((torch.rand(shape, generator=g, dtype=F64) + 0.5).to(dtype) if reduction == "none"
          else torch.tensor(1.0, dtype=dtype))
    xr = _dev(x).clone().requires_grad_(True)
    loss = tk.kl_div(xr, _dev(t), reduction=reduction, log_target=log_target)
    loss.backward(_dev(go))
    loss, grad = loss.detach().cpu().double(), xr.grad.cpu().double()
    x64 = x.double().requires_grad_(True)
    ref = reference.definition("kl")(x64, t.double(), reduction=reduction, log_target=log_target)
    (ref_grad,) = torch.autograd.grad(ref, x64, go.double())
    tol = 1e-6 if dtype == F32 else 2 ** -8
    assert rel_l2(loss, ref.detach()) < tol
    assert worst_row_err(grad, ref_grad) <= (1e-6 if dtype == F32 else 1.01 * _floor(ref_grad, dtype))


@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_kl_gradcheck_and_target_gets_no_grad(reduction):
    g = _gen(12)
    x = _dev(torch.randn(3, 6, generator=g, dtype=F64)).requires_grad_(True)
    t = _dev(torch.rand(3, 6, generator=g, dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: tk.kl_div(a, t.detach(), reduction=reduction), (x,))
    tk.kl_div(x, t, reduction="sum").backward()
    assert t.grad is None


def test_kl_non_contiguous():
    g = _gen(13)
    x = torch.randn(7, 4, generator=g).t()
    t = torch.rand(7, 4, generator=g).t()
    xd, td = _dev(x.t()).t(), _dev(t.t()).t()  # the same transposed views on the device
    assert xd.stride() == x.stride() and td.stride() == t.stride()
    loss = tk.kl_div(xd, td, reduction="sum")
    assert rel_l2(loss.cpu().double(), reference.definition("kl")(x.double(), t.double(), reduction="sum")) < 1e-6


# --- linear + cross-entropy -----------------------------------------------------------------------
def _ref_linear_ce(h, w, b, y, reduction, eps, go):
    leaves = [t.double().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
    with torch.enable_grad():
        logits = leaves[0] @ leaves[1].T + (leaves[2] if b is not None else 0)
        loss = reference.definition("ce")(logits, y, ignore_index=-100, reduction=reduction, label_smoothing=eps)
        grads = torch.autograd.grad(loss, leaves, go.double())
    return loss.detach(), grads


def _run_linear_ce(h, w, b, y, go, **kw):
    """The kernels on DEVICE; loss and gradients back on the CPU, in float64."""
    leaves = [_dev(t).clone().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
    loss = tk.linear_cross_entropy(leaves[0], leaves[1], _dev(y), bias=leaves[2] if b is not None else None, **kw)
    loss.backward(_dev(go))
    return loss.detach().cpu().double(), [t.grad.cpu().double() for t in leaves]


def _linear_grid():
    for dtype in (F32, BF16):
        for chunk in (14, 7, 2):  # 1, 2 and 7 chunks of the 14 rows
            for reduction in ("none", "mean", "sum"):
                for bias, ignore, eps in ((True, 0.3, 0.1), (False, 0.0, 0.0), (True, 1.0, 0.0)):
                    if ignore == 1.0 and (chunk != 2 or dtype == BF16):
                        continue  # all-ignored: once is enough
                    name = f"{str(dtype)[6:]}-{14 // chunk}chunks-{reduction}-bias{bias}-ign{ignore}-ls{eps}"
                    yield pytest.param(dtype, chunk, reduction, bias, ignore, eps, id=name)


@pytest.mark.parametrize("dtype,chunk,reduction,bias,ignore,eps", list(_linear_grid()))
def test_linear_ce_matches_reference(dtype, chunk, reduction, bias, ignore, eps):
    g = _gen(21)
    n, hdim, v = 14, 32, 1500
    h = torch.randn(n, hdim, generator=g, dtype=F64).to(dtype)
    w = (torch.randn(v, hdim, generator=g, dtype=F64) * 0.5).to(dtype)
    b = torch.randn(v, generator=g, dtype=F64).to(dtype) if bias else None
    y = _targets(n, v, ignore, g)
    go = _grad_output(reduction, n, dtype, g)
    loss, grads = _run_linear_ce(h, w, b, y, go, reduction=reduction, label_smoothing=eps, chunk_size=chunk)
    ref_loss, ref_grads = _ref_linear_ce(h, w, b, y, reduction, eps, go)
    if ignore == 1.0 and reduction == "mean":
        assert math.isnan(loss.item())
    assert (grads[0][y == -100] == 0).all()
    if dtype == F32:
        assert rel_l2(loss, ref_loss) < 1e-6
        assert max(worst_row_err(a, r) for a, r in zip(grads, ref_grads)) < 1e-5
    else:
        assert rel_l2(loss, ref_loss) < 2 ** -8
        for a, r in zip(grads, ref_grads):  # the logits' gradient is rounded to bf16 for the matmuls
            assert worst_row_err(a, r) <= 2.5 * _floor(r, dtype) + 1e-12


def _peaked_linear(n, hdim, v, g):
    """hidden rows along their target's weight row, scaled so p_y runs from 0.9 to 0.9999."""
    w = torch.randn(v, hdim, generator=g, dtype=F64) / math.sqrt(hdim)
    y = torch.randint(0, v, (n,), generator=g)
    noise = torch.randn(n, hdim, generator=g, dtype=F64) * 0.3
    want = 1 - torch.logspace(-1, -4, n, dtype=F64)
    lo, hi = torch.zeros(n, dtype=F64), torch.full((n,), 100.0, dtype=F64)
    for _ in range(60):  # bisection on the scale of w[y]
        mid = (lo + hi) / 2
        p = ((noise + mid[:, None] * w[y]) @ w.T).softmax(1)[torch.arange(n), y]
        lo, hi = torch.where(p < want, mid, lo), torch.where(p < want, hi, mid)
    return noise + lo[:, None] * w[y], w, y


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_linear_ce_peaked_rows_within_floor(dtype):
    n, hdim, v = 12, 64, 8000
    h64, w64, y = _peaked_linear(n, hdim, v, _gen(22))
    h, w = h64.to(dtype), w64.to(dtype)
    go = torch.ones(n, dtype=dtype)
    loss, grads = _run_linear_ce(h, w, None, y, go, reduction="none", chunk_size=5)
    ref_loss, ref_grads = _ref_linear_ce(h, w, None, y, "none", 0.0, go)
    floors = [_floor(r, dtype) for r in ref_grads]
    loss_floor = _row_rel(ref_loss.to(dtype).double(), ref_loss)
    if dtype == F32:
        # In float32 the logits of an float32 matmul are the limit: their absolute error moves
        # log p by as much. The floor is then the exact maths on the matmul's own logits (the
        # device's matmul: the kernels' logits come from it).
        logits = (_dev(h) @ _dev(w).T).cpu().double().requires_grad_(True)
        rows = reference.definition("ce")(logits, y, reduction="none")
        (g_logits,) = torch.autograd.grad(rows, logits, go.double())
        gemm = [g_logits @ w.double(), g_logits.T @ h.double()]
        floors = [max(f, worst_row_err(e, r)) for f, e, r in zip(floors, gemm, ref_grads)]
        loss_floor = max(loss_floor, _row_rel(rows.detach(), ref_loss))
    ratios = [worst_row_err(a, r) / f for a, r, f in zip(grads, ref_grads, floors)]
    l_ratio = _row_rel(loss, ref_loss) / loss_floor
    measured[("linear_ce", dtype, "none")] = (max(ratios), l_ratio)
    assert l_ratio <= PEAKED_RATIO[dtype]
    assert ratios[0] <= PEAKED_RATIO[dtype]  # grad_hidden
    # grad_weight in bf16: each of its rows sums many rounded entries of the logits' gradient (no
    # dominant one to correct as for grad_hidden), then is rounded itself: up to twice the floor.
    assert ratios[1] <= (PEAKED_RATIO[dtype] if dtype == F32 else 2.5)


def test_linear_ce_gradcheck():
    g = _gen(23)
    h = _dev(torch.randn(5, 3, generator=g, dtype=F64)).requires_grad_(True)
    w = _dev(torch.randn(6, 3, generator=g, dtype=F64)).requires_grad_(True)
    b = _dev(torch.randn(6, generator=g, dtype=F64)).requires_grad_(True)
    y = _dev(torch.tensor([0, 5, -100, 2, 3]))
    for reduction in ("mean", "none"):
        fn = lambda a, c, d: tk.linear_cross_entropy(a, c, y, bias=d, reduction=reduction,  # noqa: E731
                                                     label_smoothing=0.1, chunk_size=2)
        assert torch.autograd.gradcheck(fn, (h, w, b))


def test_linear_ce_default_chunk_and_partial_grads():
    g = _gen(24)
    h = torch.randn(9, 8, generator=g)
    w = torch.randn(50, 8, generator=g)
    y = _targets(9, 50, 0.0, g)
    wd = _dev(w).requires_grad_(True)  # hidden needs no gradient
    loss = tk.linear_cross_entropy(_dev(h), wd, _dev(y))
    loss.backward()
    ref_loss, (_, ref_gw) = _ref_linear_ce(h, w, None, y, "mean", 0.0, torch.tensor(1.0))
    assert rel_l2(loss.cpu().double(), ref_loss) < 1e-6 and rel_l2(wd.grad.cpu().double(), ref_gw) < 1e-5
    from lossbench.kernels.triton.linear_cross_entropy import default_chunk_size
    assert default_chunk_size(10**6, 128256, torch.device("cuda")) * 128256 * 4 <= 256 << 20


def test_report_peaked_ratios():
    """Prints the measured error/floor ratios (run with -s); order-independent, asserts nothing new."""
    for key, (g_ratio, l_ratio) in sorted(measured.items(), key=str):
        print(f"peaked {key[0]} {str(key[1])[6:]} {key[2]}: grad {g_ratio:.2f}x floor, loss {l_ratio:.2f}x floor")


def _run_python(code, env):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(ON_CUDA, reason="about CPU tensors under the interpreter; on a GPU host "
                                    "test_triton_imported_in_interpreter_mode_is_refused_on_cuda is its counterpart")
def test_triton_imported_in_compiled_mode_is_refused_not_crashed():
    """triton.language fixes interpret/compile for its own library when first imported: setting
    TRITON_INTERPRET afterwards must give NotImplementedError (an `unsupported` row), not a crash."""
    code = ("import os, torch, triton\n"
            "from lossbench.kernels import triton as tk\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "assert not tk.available('cpu')\n"
            "try:\n"
            "    tk.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))\n"
            "except NotImplementedError:\n"
            "    print('refused')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = _run_python(code, env)
    assert out.stdout.strip() == "refused", out.stderr[-2000:]


@pytest.mark.cuda
def test_triton_imported_in_interpreter_mode_is_refused_on_cuda():
    """The other way round, on a GPU host: triton imported under TRITON_INTERPRET=1, which is unset
    afterwards, cannot compile; CUDA tensors must give NotImplementedError, not a crash or an
    interpreted run."""
    code = ("import os\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "import torch, triton\n"
            "from lossbench.kernels import triton as tk\n"
            "del os.environ['TRITON_INTERPRET']\n"
            "assert not tk.available('cuda')\n"
            "try:\n"
            "    tk.cross_entropy(torch.randn(2, 3, device='cuda'), torch.tensor([0, 1], device='cuda'))\n"
            "except NotImplementedError:\n"
            "    print('refused')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = _run_python(code, env)
    assert out.stdout.strip() == "refused", out.stderr[-2000:]
