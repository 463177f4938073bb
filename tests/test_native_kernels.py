"""Native (C++) CPU kernels: the loader (build cache, fallbacks, concurrent builds), the vectorised exp's
ulp error, and the cross-entropy kernel against the float64 reference (the shared accuracy grid lives in
tests/test_cpu_fused.py, parametrized over the native and the Python path)."""
import ctypes
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from lossbench.kernels import native


def _native_or_skip(name):
    reason = native.unavailable_reason(name)
    if reason is not None:
        pytest.skip(reason)
    return native.load(name)


# --- loader --------------------------------------------------------------------------------------
def test_loader_builds_and_caches():
    lib = _native_or_skip("vec_exp")
    assert native.load("vec_exp") is lib  # one build per process
    assert lib.lb_num_threads() == torch.get_num_threads()  # torch's own OpenMP pool
    d = native.build_dir("vec_exp")
    assert d.name.startswith("vec_exp-") and any(d.glob("*.so"))


def test_loader_disabled_by_env(monkeypatch):
    monkeypatch.setenv("LOSSBENCH_NATIVE", "0")
    with pytest.raises(native.NativeUnavailable, match="LOSSBENCH_NATIVE=0"):
        native.load("vec_exp")
    assert "LOSSBENCH_NATIVE=0" in native.unavailable_reason("vec_exp")
    assert "\n" not in native.fallback_note("vec_exp")


def test_loader_no_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setattr(native, "_cache", {})
    monkeypatch.setenv("LOSSBENCH_NATIVE_DIR", str(tmp_path))
    assert native.unavailable_reason("vec_exp") == "no C++ compiler (g++ / $CXX) found"


def test_loader_compile_error_is_one_line(monkeypatch, tmp_path):
    if native._compiler() is None:
        pytest.skip("no compiler")
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.cpp").write_text('extern "C" int f() { return undefined_name; }\n')
    monkeypatch.setattr(native, "SRC_DIR", src)
    monkeypatch.setattr(native, "_cache", {})
    monkeypatch.setenv("LOSSBENCH_NATIVE_DIR", str(tmp_path / "build"))
    reason = native.unavailable_reason("broken")
    assert reason.startswith("broken.cpp did not build:") and "undefined_name" in reason and "\n" not in reason
    assert native.unavailable_reason("nonexistent") == "no native source nonexistent.cpp"


def test_build_key_follows_source_and_headers(monkeypatch, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "k.cpp").write_text("int a;\n")
    monkeypatch.setattr(native, "SRC_DIR", src)
    monkeypatch.setenv("LOSSBENCH_NATIVE_DIR", str(tmp_path / "b"))
    d0 = native.build_dir("k")
    (src / "h.h").write_text("// header\n")
    d1 = native.build_dir("k")
    (src / "k.cpp").write_text("int b;\n")
    d2 = native.build_dir("k")
    assert len({d0, d1, d2}) == 3 and d0.parent == tmp_path / "b"


@pytest.mark.slow
def test_concurrent_builds_and_direct_compiler_path(tmp_path):
    """Two processes building the same key at once both get a working library (one waits on the
    other's flock); a killed builder's stale torch lock does not hang the next one; and without ninja
    the direct compiler call builds it too."""
    if native._compiler() is None:
        pytest.skip("no compiler")
    prog = textwrap.dedent("""
        import sys, ctypes, torch
        from lossbench.kernels import native
        if sys.argv[1] == "noninja":
            from torch.utils import cpp_extension
            cpp_extension.is_ninja_available = lambda: False
        lib = native.load("vec_exp")
        x = torch.tensor([0.0, 1.0]); y = torch.empty(2)
        lib.lb_exp_f32(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(2))
        assert abs(y[1].item() - 2.718281828) < 1e-6, y
        print("ok", native.build_dir("vec_exp"))
    """)
    env = dict(os.environ, LOSSBENCH_NATIVE_DIR=str(tmp_path / "a"))
    procs = [subprocess.Popen([sys.executable, "-c", prog, "ninja"], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and all(o.startswith("ok") for o in outs), outs
    # a stale torch baton (builder killed mid-build) is cleared under our flock
    d = native.build_dir("vec_exp").__class__(outs[0].split()[1])
    for f in d.glob("*.so"):
        f.unlink()
    (d / "lock").write_text("")
    r = subprocess.run([sys.executable, "-c", prog, "ninja"], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, LOSSBENCH_NATIVE_DIR=str(tmp_path / "b"))
    r = subprocess.run([sys.executable, "-c", prog, "noninja"], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr


# --- the vectorised exp ----------------------------------------------------------------------------
def _exp(lib, x):
    y = torch.empty_like(x)
    lib.lb_exp_f32(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(x.numel()))
    return y


def _ulp_err(y, x):
    """|y - exp(x)| in units of the float32 ulp at exp(x) (subnormal spacing below the normal range)."""
    r = torch.exp(x.double())
    r32 = r.float()
    ulp = (torch.nextafter(r32, torch.tensor(float("inf"))) - r32).double()
    fin = torch.isfinite(r32) & (r32 > 0)
    return ((y.double() - r).abs() / ulp)[fin]


def test_exp_ulp_dense_range_and_specials():
    lib = _native_or_skip("vec_exp")
    # dense over the whole finite range, both ends included, plus every float in [-0.5, 0.5] sampled
    x = torch.cat([torch.linspace(-105.0, 90.0, 3_000_001), torch.linspace(-0.35, 0.35, 1_000_001),
                   torch.linspace(86.0, 88.72283, 200_001), torch.linspace(-104.0, -86.0, 200_001)])
    err = _ulp_err(_exp(lib, x), x)
    assert err.max().item() <= 1.5, err.max().item()  # measured 1.04
    assert err.mean().item() < 0.4
    inf, nan = float("inf"), float("nan")
    sp = torch.tensor([nan, inf, -inf, 0.0, -0.0, 88.72283, 88.7229, 89.5, 1e30, -103.972, -104.5, -1e30,
                       -87.33655, 1e-30])
    got = _exp(lib, sp)
    want = torch.exp(sp)
    assert torch.isnan(got[0])
    assert torch.equal(got[1:], want[1:]), (got, want)


# --- the run-time convention note ------------------------------------------------------------------
def _fused_ce():
    from lossbench import registry

    return next(i for i in registry.implementations("ce") if i.name == "fused")


def test_fused_rows_note_the_fallback(monkeypatch):
    from lossbench import records, sweep
    from lossbench.cases import Case

    impl = _fused_ce()
    case = Case.make("ce", 8, 16, "float32", "cpu")
    monkeypatch.setenv("LOSSBENCH_NATIVE", "0")
    rows = list(sweep.impl_rows({}, case, impl, ["fwd", "fwd_bwd"], status="ok"))
    assert all(r["convention"] == "native kernel unavailable, Python fallback (native kernels disabled "
               "(LOSSBENCH_NATIVE=0))" for r in rows)
    assert set(rows[0]) == set(records.COLUMNS)
    # not on CUDA (the Triton kernel runs there), and a static convention is kept in front of the note
    assert impl.convention_for(Case.make("ce", 8, 16, "float32", "cuda")) is None
    import dataclasses
    both = dataclasses.replace(impl, convention="clamps at 1e-10")
    assert both.convention_for(case).startswith("clamps at 1e-10; native kernel unavailable")
    broken = dataclasses.replace(impl, note=lambda c: 1 / 0)
    assert broken.convention_for(case) == "note unavailable: ZeroDivisionError"
    monkeypatch.setenv("LOSSBENCH_NATIVE", "1")
    if native.unavailable_reason("cross_entropy") is None:
        assert impl.convention_for(case) is None
        assert all(r["convention"] is None for r in sweep.impl_rows({}, case, impl, ["fwd"], status="ok"))


# --- the cross-entropy kernel ------------------------------------------------------------------------
from lossbench import reference  # noqa: E402
from lossbench.kernels.cpu import cross_entropy  # noqa: E402
from lossbench.runners.accuracy import rel_l2, worst_row_err  # noqa: E402

ce_mod = sys.modules["lossbench.kernels.cpu.cross_entropy"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# float64: the reference's own gradient (autograd's softmax - onehot) loses eps64 / (1 - p_y) to the
# cancellation in p_y - 1; _peaked's rows go to p_y = 0.9999, so about 1.1e-12, and 4x that is the bound.
# Over 40 seeds both the kernel and the Python path reached 1.86e-12 (the same inputs, the same error).
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 4.5e-12}


@pytest.fixture
def lib():
    lib = ce_mod.native_lib()
    if lib is None:
        pytest.skip(native.unavailable_reason("cross_entropy") or "stale build")
    return lib


def _ref(x, target, go, weight=None, **kw):
    x64 = x.detach().double().requires_grad_(True)
    w64 = None if weight is None else weight.double()
    loss = reference.definition("ce")(x64, target, weight=w64, ignore_index=-100, **kw)
    (g,) = torch.autograd.grad(loss, x64, go.double())
    return loss.detach(), g


def _run(x, target, go, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = cross_entropy(x, target, **kw)
    loss.backward(go)
    return loss.detach(), x.grad


def _peaked(N, C, gen, lo=0.9, hi=0.9999):
    x = torch.randn(N, C, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=gen)
    p = lo + (hi - lo) * torch.rand(N, generator=gen, dtype=torch.float64)
    others = x.scatter(1, y.unsqueeze(1), -math.inf).logsumexp(1)
    x[torch.arange(N), y] = torch.log(p / (1 - p)) + others
    return x, y


import math  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted,eps,ignore", [(False, 0.0, 0.0), (True, 0.0, 0.3), (False, 0.1, 0.3),
                                                  (True, 0.2, 0.0)])
@pytest.mark.parametrize("unit_go", [True, False])
def test_ce_kernel_every_option(lib, dtype, reduction, weighted, eps, ignore, unit_go):
    """grad_output 1 (the gradient the forward wrote, returned as is) and any other (the rescaling
    pass), on every option and dtype, peaked rows included, against the float64 definition."""
    # zlib.crc32, not hash(): str hashes change with every process (PYTHONHASHSEED), and so did the inputs
    gen = torch.Generator().manual_seed(zlib.crc32(repr((reduction, weighted, eps, ignore)).encode()))
    N, C = 40, 1537
    x64, y = _peaked(N, C, gen)
    x64[::2] = 3 * torch.randn(N // 2, C, generator=gen, dtype=torch.float64)  # half the rows unsure
    x = x64.to(dtype)
    y[torch.rand(N, generator=gen) < ignore] = -100
    w = (0.5 + torch.rand(C, generator=gen)).to(dtype) if weighted else None
    if unit_go:
        go = torch.ones(N) if reduction == "none" else torch.tensor(1.0)
    else:
        go = torch.randn(N, generator=gen) if reduction == "none" else torch.tensor(1.7)
    go = go.to(dtype)
    kw = dict(weight=w, reduction=reduction, label_smoothing=eps)
    ref_loss, ref_g = _ref(x, y, go, **kw)
    loss, g = _run(x, y, go, **kw)
    assert loss.dtype == dtype and g.dtype == dtype and g.shape == x.shape and g.is_contiguous()
    floor_g = worst_row_err(ref_g.to(dtype).double(), ref_g)
    assert worst_row_err(g.double(), ref_g) <= max(4 * floor_g, TOL[dtype] if dtype != torch.bfloat16 else 0), \
        (worst_row_err(g.double(), ref_g), floor_g)
    floor_l = worst_row_err(ref_loss.to(dtype).double().reshape(-1, 1), ref_loss.reshape(-1, 1))
    assert worst_row_err(loss.double().reshape(-1, 1), ref_loss.reshape(-1, 1)) <= max(2 * floor_l, TOL[dtype])
    ign = y == -100
    assert bool((g[ign] == 0).all()) and (reduction != "none" or bool((loss[ign] == 0).all()))


def test_ce_kernel_unit_grad_output_adopts_the_buffer(lib, monkeypatch):
    """grad_output 1: backward returns the forward's buffer itself (no copy, no pass); any other
    grad_output scales it in place; retain_graph keeps the stored gradient intact."""
    made = []
    real = native.grad_buffer
    def record(*a):
        t = real(*a)
        made.append(t.data_ptr())  # the address only: a held reference would make autograd copy
        return t

    monkeypatch.setattr(native, "grad_buffer", record)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 300, generator=gen).requires_grad_(True)
    y = torch.randint(0, 300, (64,), generator=gen)
    cross_entropy(x, y).backward()
    assert x.grad.data_ptr() == made[-1]
    g1 = x.grad
    x.grad = None
    cross_entropy(x, y).backward(torch.tensor(3.0))
    assert x.grad.data_ptr() == made[-1]
    assert torch.allclose(x.grad, 3 * g1, rtol=1e-6, atol=0)
    small = torch.randn(8, 50, generator=gen, requires_grad=True)
    for go in (1.0, 2.5):
        small.grad = None
        loss = cross_entropy(small, y[:8] % 50, reduction="sum")
        loss.backward(torch.tensor(go), retain_graph=True)
        first = small.grad.clone()
        loss.backward(torch.tensor(go))  # the same graph again: the stored gradient was not handed out
        assert torch.allclose(small.grad, 2 * first)


def test_grad_buffer_huge_page_advice():
    t = native.grad_buffer((3, 5), torch.bfloat16)
    assert t.shape == (3, 5) and t.dtype == torch.bfloat16 and t.is_contiguous()
    big = native.grad_buffer((1024, 32768), torch.float32)  # 128 MiB: advised
    big.fill_(1.0)
    assert big.is_contiguous() and float(big[-1, -1]) == 1.0


def test_ce_kernel_errors_are_one_line(lib):
    x = torch.randn(4, 10)
    with pytest.raises(IndexError, match=r"^Target 10 is out of bounds\.$"):
        cross_entropy(x, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(IndexError, match="Target -3"):
        cross_entropy(x, torch.tensor([0, -3, 1, 2]))
    with pytest.raises(ValueError, match=r"weight must have shape \(10,\)"):
        cross_entropy(x, torch.tensor([0, 1, 2, 3]), weight=torch.ones(9))
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        cross_entropy(x, torch.tensor([0, 1, 2, 3]), reduction="avg")
    with pytest.raises(NotImplementedError, match="2-D"):
        cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    # out-of-range targets on ignored rows are fine; -100 is ignore_index by default
    out = cross_entropy(x, torch.tensor([0, -100, 1, 2]), ignore_index=-100)
    assert torch.isfinite(out)


def test_ce_kernel_specials(lib):
    """Non-finite logits behave as torch's; a mean over zero total weight is NaN with a zero gradient;
    extreme but finite rows stay exact (shifted exp, underflowing p_y)."""
    x = torch.randn(5, 300)
    x[0, 3] = float("nan")
    x[1, 4] = float("inf")
    x[2, 5] = -float("inf")
    x[3] += 1e4
    x[4] -= 1e4
    y = torch.tensor([1, 4, 6, 7, 8])
    got = cross_entropy(x, y, reduction="none")
    want = torch.nn.functional.cross_entropy(x.double(), y, reduction="none")
    assert torch.isnan(got[0]) and torch.isnan(want[0])
    assert torch.allclose(got[2:].double(), want[2:], rtol=1e-6) and torch.isnan(got[1]) == torch.isnan(want[1])
    w = torch.zeros(300)
    xx = torch.randn(5, 300, requires_grad=True)
    out = cross_entropy(xx, y, weight=w)
    out.backward()
    assert torch.isnan(out) and bool((xx.grad == 0).all())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ce_kernel_large_vocab_peaked(lib, dtype):
    """The benchmark's class count, confident rows (p_y up to 1 - 1e-6): every row's target entry
    -(1 - p_y) and its loss stay within a small multiple of the dtype's rounding floor."""
    gen = torch.Generator().manual_seed(11)
    N, C = 24, 32768
    x64, y = _peaked(N, C, gen, 0.99, 0.999999)
    x = x64.to(dtype)
    go = torch.randn(N, generator=gen).to(dtype)
    ref_loss, ref_g = _ref(x, y, go, reduction="none")
    loss, g = _run(x, y, go, reduction="none")
    floor_g = worst_row_err(ref_g.to(dtype).double(), ref_g)
    assert worst_row_err(g.double(), ref_g) <= 4 * floor_g
    rel = ((loss.double() - ref_loss).abs() / ref_loss.abs()).max().item()
    assert rel <= 2 * torch.finfo(dtype).eps


def test_ce_kernel_threads_and_noncontiguous(lib):
    """The same numbers on 1 and 2 threads (rows are independent: no cross-row sums in the kernel),
    and for a non-contiguous input (row stride, or transposed). 1400 rows of 777 float32 are 4.4 MB of
    gradient: three of the kernel's 2 MiB grabs, the last one short, so both threads take rows."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(1400, 777, generator=gen)
    y = torch.randint(0, 777, (1400,), generator=gen)
    n0 = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        l1, g1 = _run(x, y, torch.tensor(0.7), label_smoothing=0.1)
        torch.set_num_threads(2)
        l2, g2 = _run(x, y, torch.tensor(0.7), label_smoothing=0.1)
    finally:
        torch.set_num_threads(n0)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    x64 = x.double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(x64, y, label_smoothing=0.1)
    ref.backward(torch.tensor(0.7, dtype=torch.float64))
    assert abs(float(l1) - float(ref)) <= 1e-6 * abs(float(ref))  # every row (and grab) counted
    assert torch.allclose(g1.double(), x64.grad, rtol=1e-5, atol=1e-10)
    wide = torch.randn(1400, 1000, generator=gen)[:, :777]
    wide.copy_(x)
    lt, gt = _run(x.t().contiguous().t(), y, torch.tensor(0.7), label_smoothing=0.1)
    lw, gw = _run(wide, y, torch.tensor(0.7), label_smoothing=0.1)
    assert torch.equal(lt, l1) and torch.equal(gt, g1) and torch.equal(lw, l1) and torch.equal(gw, g1)


def test_ce_no_grad_forward_computes_no_gradient(monkeypatch, ce_path_any):
    """Under no_grad (the harness's `fwd` mode) neither path writes a gradient: autograd's
    needs_input_grad is True there too, so the kernels are told by the caller."""
    calls = []
    monkeypatch.setattr(native, "grad_buffer", lambda *a: calls.append(a))
    monkeypatch.setattr(ce_mod, "alloc_like_rows", lambda *a: calls.append(a))
    x = torch.randn(6, 40, requires_grad=True)
    y = torch.randint(0, 40, (6,))
    with torch.no_grad():
        loss = cross_entropy(x, y, label_smoothing=0.1)
    want = torch.nn.functional.cross_entropy(x.detach().double(), y, label_smoothing=0.1)
    assert abs(loss.item() - want.item()) < 1e-6 and calls == []


@pytest.fixture(params=["native", "python"])
def ce_path_any(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setenv("LOSSBENCH_NATIVE", "0")
    elif ce_mod.native_lib() is None:
        pytest.skip("no native kernel here")
    return request.param
