"""Native (C++) CPU kernels: the loader (build cache, fallbacks, concurrent builds), the vectorised exp's
ulp error, and the cross-entropy kernel against the float64 reference (the shared accuracy grid lives in
tests/test_cpu_fused.py, parametrized over the native and the Python path)."""
import ctypes
import os
import subprocess
import sys
import textwrap

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
