"""Fused JSD kernels (lossbench.kernels.cpu.jsd, lossbench.kernels.triton.jsd) against a float64 autograd
reference written here from the definition (Liger-Kernel's generalised JSD). The Triton kernel runs on
CPU tensors under the Triton interpreter (TRITON_INTERPRET set before triton is imported, as in
test_triton_kernels.py), or compiled on a GPU when there is one. Small shapes: the interpreter is slow."""
import math
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # before anything imports triton: it fixes its mode at import
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LOSSBENCH_CHECK_LAUNCHES", "1")

import pytest  # noqa: E402

from lossbench.kernels import cpu as ck  # noqa: E402

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
TOL = {F32: 8e-6, BF16: 3e-2, F64: 1e-13}  # relative L2, a few units of each dtype's epsilon


def _kernels():
    ks = [pytest.param(ck.jsd, "cpu", id="cpu")]
    try:
        from lossbench.kernels import triton as tk
        ok = tk.available(DEVICE)
    except ImportError:
        ok = False
    ks.append(pytest.param(tk.jsd if ok else None, DEVICE, id="triton",
                           marks=pytest.mark.skipif(not ok, reason="triton kernels unavailable here")))
    return ks


KERNELS = _kernels()


def reference(x, y, label=None, beta=0.5, ignore_index=-100, reduction="batchmean"):
    """float64 loss by the definition; autograd gives the reference gradient."""
    x, y = x.double(), y.double()
    q, p = x.exp(), y.exp()
    if beta == 0:
        pw = p * (y - x)
    elif beta == 1:
        pw = q * (x - y)
    else:
        log_m = torch.logaddexp(y + math.log(beta), x + math.log(1 - beta))
        pw = beta * p * (y - log_m) + (1 - beta) * q * (x - log_m)
    rows = pw.sum(1)
    keep = torch.ones_like(rows, dtype=torch.bool) if label is None else label != ignore_index
    rows = torch.where(keep, rows, 0.0)
    if reduction == "none":
        return rows
    return rows.sum() / keep.sum() if reduction == "batchmean" else rows.sum()


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def inputs(n, v, dtype, peaked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = 12.0 if peaked else 1.0  # peaked: confident rows, probability ~1 on one class
    x = (torch.randn(n, v, generator=g, dtype=F64) * s).log_softmax(-1).to(dtype)
    y = (torch.randn(n, v, generator=g, dtype=F64) * s).log_softmax(-1).to(dtype)
    return x, y


def run(kernel, device, x, y, go=None, **kw):
    xd = x.detach().clone().to(device).requires_grad_()  # never the caller's x
    kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    loss = kernel(xd, y.to(device), **kw)
    loss.backward(None if go is None else go.to(device=device, dtype=loss.dtype))
    return loss.detach().cpu(), xd.grad.cpu()


def check(kernel, device, dtype, n, v, beta, reduction, label=None, peaked=False, seed=0):
    x, y = inputs(n, v, dtype, peaked, seed)
    go = None
    if reduction == "none":  # non-uniform per-row grad_output
        go = torch.linspace(-1.5, 2.0, n, dtype=F64)
    loss, grad = run(kernel, device, x, y, go=None if go is None else go.to(dtype), label=label, beta=beta,
                     reduction=reduction)
    xr = x.detach().double().requires_grad_()
    ref = reference(xr, y, label, beta, reduction=reduction)
    ref.backward(None if go is None else go.to(dtype).double())
    assert loss.dtype == dtype and grad.dtype == dtype and grad.shape == x.shape
    e_loss, e_grad = rel(loss, ref.detach()), rel(grad, xr.grad)
    assert e_loss <= TOL[dtype], f"loss rel err {e_loss:.3g}"
    assert e_grad <= TOL[dtype], f"grad rel err {e_grad:.3g}"
    return e_loss, e_grad


@pytest.mark.parametrize("kernel,device", KERNELS)
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=["f32", "bf16", "f64"])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_matches_reference(kernel, device, dtype, beta, reduction):
    # V = 2100: not a multiple of the Triton BLOCK (2048), two column blocks
    check(kernel, device, dtype, 6, 2100, beta, reduction)


@pytest.mark.parametrize("kernel,device", KERNELS)
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=["f32", "bf16", "f64"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_ignored_rows_and_peaked(kernel, device, dtype, beta, reduction):
    label = torch.tensor([3, -100, 0, -100, 7, 1])
    x, y = inputs(6, 300, dtype, peaked=True, seed=1)
    check(kernel, device, dtype, 6, 300, beta, reduction, label=label, peaked=True, seed=1)
    # ignored rows: exactly zero gradient (and zero row loss for "none")
    loss, grad = run(kernel, device, x, y, go=torch.ones(6) if reduction == "none" else None, label=label,
                     beta=beta, reduction=reduction)
    assert torch.all(grad[label == -100] == 0)
    if reduction == "none":
        assert torch.all(loss[label == -100] == 0)


@pytest.mark.parametrize("kernel,device", KERNELS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_all_rows_ignored(kernel, device, reduction):
    x, y = inputs(3, 50, F32)
    loss, grad = run(kernel, device, x, y, go=torch.ones(3) if reduction == "none" else None,
                     label=torch.full((3,), -100), reduction=reduction)
    if reduction == "batchmean":
        assert torch.isnan(loss)  # torch's empty mean
    else:
        assert torch.all(loss == 0)
    assert torch.all(grad == 0)


def _gradcheck_grid():
    """Every kernel x reduction x beta; under Triton's interpreter a gradcheck takes ~3 s, so the fast
    tier keeps one of the interpreted ones (the general beta, batchmean) and the slow tier the rest."""
    for k in KERNELS:
        for reduction in ("batchmean", "sum", "none"):
            for beta in (0.0, 0.3, 1.0):
                marks = list(k.marks)
                if k.id == "triton" and (reduction, beta) != ("batchmean", 0.3):
                    marks.append(pytest.mark.slow)
                yield pytest.param(*k.values, beta, reduction, marks=marks, id=f"{reduction}-{beta}-{k.id}")


@pytest.mark.parametrize("kernel,device,beta,reduction", list(_gradcheck_grid()))
def test_gradcheck_float64(kernel, device, beta, reduction):
    x, y = inputs(4, 37, F64, seed=2)
    label = torch.tensor([1, -100, 2, 0], device=device)
    xd = x.to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: kernel(a, y.to(device), label=label, beta=beta, reduction=reduction),
                                    (xd,))


@pytest.mark.parametrize("kernel,device", KERNELS)
def test_errors(kernel, device):
    x, y = (t.to(device) for t in inputs(2, 8, F32))
    with pytest.raises(ValueError):
        kernel(x, y, reduction="mean")
    with pytest.raises(NotImplementedError):
        kernel(x, y.clone().requires_grad_())
    with pytest.raises(NotImplementedError):
        kernel(x.view(2, 2, 4), y.view(2, 2, 4))
    with pytest.raises(NotImplementedError):
        kernel(x, y[:, :4])
