"""Peer adapters (liger_kernel, cut_cross_entropy) against the float64 reference.

Each peer's tests skip when the peer is not installed. Without a GPU, liger's Triton kernels run
under the Triton interpreter, which `triton.jit` picks when liger's modules are imported: so
TRITON_INTERPRET=1 goes into the environment here, before anything imports liger_kernel (it is
left alone where CUDA is available, where the kernels compile and the tests run on the GPU).
With a CUDA device every case is made on it, the peers' compiled kernels run (cut_cross_entropy's
impl="cce" rather than its CPU torch.compile path), and the module is marked `cuda`
(`make gpu-check`); the tests of interpreter limitations and of the CPU guard skip there.
Shapes are small: the interpreter runs every Triton program in Python.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lossbench.impls.peers as peers  # noqa: E402
from lossbench import reference, registry  # noqa: E402
from lossbench.cases import Case, make_inputs  # noqa: E402
from lossbench.runners import accuracy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_CPU = DEVICE == "cpu"
PEERS_DIR = Path(peers.__file__).parent

if not ON_CPU:  # the peers' compiled kernels on the GPU: part of `pytest -m cuda`
    pytestmark = pytest.mark.cuda


# --- helpers --------------------------------------------------------------------------------------
def _case(family, n, c, dtype="float32", dist="normal", h=None, **opts):
    return Case.make(family, n, c, dtype, DEVICE, dist, opts, h=h)


def _measure(name, case):
    impl = registry.get(case.family, name)
    assert impl.why_unsupported(case) is None, impl.why_unsupported(case)
    inputs = make_inputs(case)
    return accuracy.measure(impl.fn, inputs, reference.compute(case.family, inputs), case.dtype)


def _call(name, case):
    inputs = make_inputs(case)
    return registry.get(case.family, name).fn(*inputs.args, **inputs.kwargs)


@pytest.fixture(scope="module")
def liger():
    pytest.importorskip("liger_kernel")
    assert peers.liger.IMPORT_ERROR is None, f"liger_kernel is installed but failed: {peers.liger.IMPORT_ERROR}"
    kernel = peers.liger._ce_ops.liger_cross_entropy_kernel
    if ON_CPU:
        assert peers.liger._interpreted(kernel) is not False, (
            "liger_kernel was imported before TRITON_INTERPRET=1 was set, so its kernels were built for a "
            "GPU: set TRITON_INTERPRET=1 earlier (e.g. in conftest.py) when there is no CUDA device")
    else:  # the interpreter also takes CUDA tensors (through host copies): it would test nothing compiled
        assert peers.liger._interpreted(kernel) is not True, (
            "a CUDA device is present but liger_kernel's kernels were built for the Triton interpreter: "
            "unset TRITON_INTERPRET")
    return peers.liger


@pytest.fixture(scope="module")
def cce():
    pytest.importorskip("cut_cross_entropy")
    assert peers.cce.IMPORT_ERROR is None, f"cut_cross_entropy is installed but failed: {peers.cce.IMPORT_ERROR}"
    return peers.cce


def _interpreter_wraps_floats() -> bool:
    from triton.runtime import interpreter

    return not isinstance(interpreter._implicit_cvt(1.0), float)


@pytest.fixture
def float_args(monkeypatch):
    """The Triton interpreter (3.9) passes a float kernel argument to the kernel as a Python float
    (ints and bools become scalar tensors), so liger's KL kernel (eps.to(tl.float32)) and its
    weighted cross-entropy (weight sums .to(tl.float32)) cannot run under it; compiled Triton passes
    such an argument as an fp32 scalar. This wraps floats the same way, so that those kernels'
    semantics can be checked on the CPU. Nothing to do on CUDA."""
    if not ON_CPU:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return original(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", implicit_cvt)


# --- registration and import safety --------------------------------------------------------------
def test_liger_is_registered_with_its_capabilities(liger):
    ce = registry.get("ce", "liger")
    assert ce.fn is liger.liger_ce
    assert set(ce.unsupported) == {"target=prob", "spatial"}
    assert ce.mutates_inputs and ce.grad_in_forward and ce.devices == ("cuda", "cpu")
    kl = registry.get("kl", "liger")
    assert kl.unsupported == () and not kl.mutates_inputs and not kl.grad_in_forward
    assert "eps" in kl.description
    lce = registry.get("linear_ce", "liger")
    assert lce.unsupported == () and lce.grad_in_forward and not lce.mutates_inputs


def test_cce_is_registered_with_its_capabilities(cce):
    impl = registry.get("linear_ce", "cce")
    assert impl.fn is cce.cce_linear_ce
    assert set(impl.unsupported) == {"bias", "label_smoothing"}
    assert impl.devices == ("cuda", "cpu") and not impl.mutates_inputs
    assert cce.IMPLS == {"cuda": "cce", "cpu": "torch_compile"}


class _Exploding(types.ModuleType):
    """A module whose every attribute lookup fails the way a broken peer might."""

    def __init__(self, name, exc):
        super().__init__(name)
        self._exc = exc

    def __getattr__(self, attr):
        raise self._exc


@pytest.mark.parametrize("module, peer_modules", [
    ("liger", ("liger_kernel", "liger_kernel.ops", "liger_kernel.transformers",
               "liger_kernel.transformers.functional")),
    ("cce", ("cut_cross_entropy",)),
])
@pytest.mark.parametrize("failure", ["missing", "RuntimeError", "SystemExit"])
def test_adapter_imports_cleanly_and_registers_nothing_when_its_peer_fails(monkeypatch, module, peer_modules,
                                                                           failure):
    before = [(i.family, i.name) for i in registry.implementations()]
    for name in list(sys.modules):
        if name.split(".")[0] == peer_modules[0].split(".")[0]:
            monkeypatch.delitem(sys.modules, name)
    for name in peer_modules:
        broken = None if failure == "missing" else _Exploding(name, RuntimeError("boom") if failure == "RuntimeError"
                                                              else SystemExit(3))
        monkeypatch.setitem(sys.modules, name, broken)
    # A fresh copy of the adapter module, under another name, so the registered one stays as it is.
    probe = f"lossbench.impls.peers._probe_{module}"
    spec = importlib.util.spec_from_file_location(probe, PEERS_DIR / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, probe, mod)
    spec.loader.exec_module(mod)
    assert mod.IMPORT_ERROR and mod.IMPORT_ERROR.split(":")[0] in ("ImportError", "ModuleNotFoundError",
                                                                  "RuntimeError", "SystemExit")
    assert [(i.family, i.name) for i in registry.implementations()] == before


# --- liger: cross-entropy --------------------------------------------------------------------------
CE_VARIANTS = [
    dict(),
    dict(ignore_frac=0.25),
    dict(reduction="sum"),
    dict(reduction="none", ignore_frac=0.25),
    dict(label_smoothing=0.1, ignore_frac=0.25),
    dict(label_smoothing=0.1, ignore_frac=0.25, reduction="sum"),
]


@pytest.mark.parametrize("dist", ["normal", "peaked"])
@pytest.mark.parametrize("opts", CE_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_liger_ce_matches_the_reference(liger, dist, opts):
    r = _measure("liger", _case("ce", 16, 1000, dist=dist, **opts))
    assert r.accuracy_ok, r
    assert r.mutates_inputs  # liger writes the gradient over its input logits in forward


@pytest.mark.parametrize("opts", [dict(weight=True, ignore_frac=0.25),
                                  dict(weight=True, label_smoothing=0.1, ignore_frac=0.25, reduction="none"),
                                  dict(weight=True, label_smoothing=0.2, reduction="sum")],
                         ids=["weight", "weight,smoothing,none", "weight,smoothing,sum"])
# liger's smoothing term multiplies masked-off lanes (-inf logits by the padding weights) before a
# tl.where drops them; numpy, under the interpreter, warns about those discarded lanes.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_liger_ce_class_weights_match_the_reference(liger, float_args, opts):
    r = _measure("liger", _case("ce", 16, 1000, dist="peaked", **opts))
    assert r.accuracy_ok, r
    assert r.mutates_inputs


@pytest.mark.skipif(not ON_CPU, reason="a Triton interpreter limitation")
def test_liger_ce_class_weights_cannot_run_under_the_interpreter(liger):
    if _interpreter_wraps_floats():
        pytest.skip("this triton's interpreter passes float arguments as scalars")
    with pytest.raises(NotImplementedError, match="interpreter"):
        _call("liger", _case("ce", 16, 100, weight=True))


def test_liger_ce_declares_probability_targets_and_spatial_unsupported(liger):
    impl = registry.get("ce", "liger")
    assert impl.why_unsupported(_case("ce", 4, 10, target="prob"))
    assert impl.why_unsupported(_case("ce", 4, 10, spatial=3))


@pytest.mark.parametrize("weight", [False, True])
def test_liger_ce_refuses_a_mean_over_no_targets(liger, weight):
    # torch: NaN with a zero gradient; liger: 0. The adapter raises rather than return liger's 0.
    with pytest.raises(NotImplementedError, match="zero contributing"):
        _call("liger", _case("ce", 8, 50, ignore_frac=1.0, weight=weight))


def test_liger_ce_all_ignored_sum_and_none_are_torchs(liger):
    for reduction in ("sum", "none"):
        r = _measure("liger", _case("ce", 8, 50, ignore_frac=1.0, reduction=reduction))
        assert r.accuracy_ok and r.loss_rel_err == 0 and r.grad_rel_err == 0


def test_liger_ce_non_contiguous_logits_get_the_logits_as_their_gradient(liger):
    """Measured liger behaviour, kept as it is: for logits whose class dimension is strided, liger
    copies them to a contiguous tensor inside its autograd Function, where the copy no longer
    requires grad; its kernel then computes no gradient, and backward returns the logits themselves
    (times grad_output). Wrong gradients, silently; the forward loss is right."""
    case = _case("ce", 16, 1000, noncontig=True)
    r = _measure("liger", case)
    assert not r.accuracy_ok
    assert r.loss_rel_err < 1e-6
    assert r.grad_rel_err > 100  # measured ~5e2
    assert not r.mutates_inputs  # liger worked on its own contiguous copy
    inputs = make_inputs(case)
    logits = inputs.args[0].clone().requires_grad_(True)
    registry.get("ce", "liger").fn(logits, *inputs.args[1:], **inputs.kwargs).backward(inputs.grad_output)
    torch.testing.assert_close(logits.grad, inputs.args[0] * inputs.grad_output)


def test_liger_ce_float64_is_float32_accurate(liger):
    """Measured: liger computes in float32 whatever the input dtype, so float64 rows are ~1e-8
    accurate and fail the float64 budget (1e-10)."""
    r = _measure("liger", _case("ce", 16, 1000, "float64", ignore_frac=0.25))
    assert not r.accuracy_ok
    assert 1e-10 < r.grad_row_err_max < 1e-6 and r.loss_rel_err < 1e-6


@pytest.mark.skipif(not ON_CPU, reason="a Triton interpreter limitation")
def test_liger_ce_bfloat16_mean_cannot_run_under_the_interpreter(liger):
    # The interpreter keeps bfloat16 as raw uint16 and multiplies the bits (liger's backward scales
    # the bf16 gradient by the bf16 grad_output): the adapter refuses rather than report garbage.
    with pytest.raises(NotImplementedError, match="bfloat16"):
        _call("liger", _case("ce", 8, 50, "bfloat16"))


@pytest.mark.cuda  # the counterpart of the test above: compiled, liger's bfloat16 backward is measured
@pytest.mark.parametrize("dist", ["normal", "peaked"])
@pytest.mark.parametrize("opts", [dict(), dict(reduction="sum", ignore_frac=0.25),
                                  dict(label_smoothing=0.1, ignore_frac=0.25)],
                         ids=["mean", "sum,ignore", "smoothing,ignore"])
def test_liger_ce_bfloat16_matches_the_reference_on_cuda(liger, dist, opts):
    r = _measure("liger", _case("ce", 16, 1000, "bfloat16", dist, **opts))
    assert r.accuracy_ok, r


@pytest.mark.skipif(not ON_CPU, reason="checks the CPU guard")
def test_liger_needs_the_interpreter_on_cpu(liger, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for case in (_case("ce", 4, 10), _case("kl", 4, 10), _case("linear_ce", 4, 10, h=8)):
        with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
            _call("liger", case)


# --- liger: KL divergence --------------------------------------------------------------------------
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_liger_kl_matches_the_reference(liger, float_args, log_target, reduction):
    r = _measure("liger", _case("kl", 16, 1000, log_target=log_target, reduction=reduction))
    assert r.accuracy_ok, r
    assert not r.mutates_inputs


@pytest.mark.parametrize("opts", [dict(spatial=3), dict(spatial=3, reduction="none"), dict(noncontig=True),
                                  dict(noncontig=True, reduction="mean", log_target=True)],
                         ids=["spatial", "spatial,none", "noncontig", "noncontig,mean,log_target"])
def test_liger_kl_layouts_match_the_reference(liger, float_args, opts):
    # liger takes 2-d (rows, columns); the adapter folds (N, C, d) into (N, C*d), exact for KL.
    r = _measure("liger", _case("kl", 4, 100, **opts))
    assert r.accuracy_ok, r


def test_liger_kl_bfloat16_returns_the_input_dtype(liger, float_args):
    case = _case("kl", 16, 1000, "bfloat16")
    assert _measure("liger", case).accuracy_ok
    assert _call("liger", case).dtype == torch.bfloat16  # liger's own loss is float32


def test_liger_kl_eps_keeps_torchs_values_for_tiny_and_zero_targets(liger, float_args):
    """liger computes target * log(max(target, eps)). With its default eps=1e-10 a target of 1e-12
    loses ~17% of its pointwise term; the adapter's eps (smallest normal float32) keeps torch's
    values, and 0 * log 0 = 0."""
    from liger_kernel.transformers.functional import liger_kl_div

    gen = torch.Generator().manual_seed(0)
    log_q = F.log_softmax(torch.randn(4, 64, generator=gen), 1)
    target = F.softmax(torch.randn(4, 64, generator=gen), 1)
    target[:, :8] = 1e-12
    target[:, 8:16] = 0.0
    log_q, target = log_q.to(DEVICE), target.to(DEVICE)
    want = F.kl_div(log_q, target, reduction="none")
    got = registry.get("kl", "liger").fn(log_q, target, reduction="none")
    torch.testing.assert_close(got[:, :16], want[:, :16], rtol=1e-5, atol=0)
    assert (got[:, 8:16] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)  # t log t - t x cancels where log t ~ x
    default = liger_kl_div(log_q, target, reduction="none")
    assert ((default[:, :8] - want[:, :8]).abs() / want[:, :8].abs()).min() > 0.1


@pytest.mark.skipif(not ON_CPU, reason="a Triton interpreter limitation")
def test_liger_kl_cannot_run_under_the_interpreter(liger):
    if _interpreter_wraps_floats():
        pytest.skip("this triton's interpreter passes float arguments as scalars")
    with pytest.raises(NotImplementedError, match="interpreter"):
        _call("liger", _case("kl", 4, 10))


# --- liger: fused linear + cross-entropy ---------------------------------------------------------
# N=16, H=128, V=512: liger splits the rows into 4 chunks (V / H = 4), so chunking is exercised.
LCE_VARIANTS = [
    dict(),
    dict(bias=True),
    dict(bias=True, ignore_frac=0.25, label_smoothing=0.1),
    dict(bias=True, reduction="sum"),
    dict(reduction="none", ignore_frac=0.25, bias=True),
]


@pytest.mark.parametrize("opts", LCE_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_liger_linear_ce_matches_the_reference(liger, opts):
    r = _measure("liger", _case("linear_ce", 16, 512, h=128, **opts))
    assert r.accuracy_ok, r
    assert not r.mutates_inputs


def test_liger_linear_ce_peaked_and_loss_dtype(liger):
    assert _measure("liger", _case("linear_ce", 16, 512, "float32", "peaked", h=128, ignore_frac=0.25)).accuracy_ok
    assert _call("liger", _case("linear_ce", 4, 64, "bfloat16", h=32)).dtype == torch.bfloat16


def test_liger_linear_ce_refuses_a_mean_over_no_targets(liger):
    with pytest.raises(NotImplementedError, match="zero contributing"):
        _call("liger", _case("linear_ce", 8, 64, h=16, ignore_frac=1.0))


# --- jsd ------------------------------------------------------------------------------------------
JSD_VARIANTS = [dict(), dict(beta=0.0), dict(beta=1.0), dict(beta=0.1, ignore_frac=0.25)]


@pytest.mark.parametrize("dist", ["normal", "peaked"])
@pytest.mark.parametrize("opts", JSD_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_liger_jsd_matches_the_reference(liger, dist, opts):
    r = _measure("liger", _case("jsd", 16, 1000, dist=dist, **opts))
    assert r.accuracy_ok, r
    assert not r.mutates_inputs  # liger's forward writes its gradient into a clone of the input


def test_liger_jsd_declares_its_one_reduction_and_refuses_an_empty_mean(liger):
    impl = registry.get("jsd", "liger")
    assert impl.grad_in_forward and set(impl.unsupported) == {"reduction=none", "reduction=sum"}
    assert impl.why_unsupported(_case("jsd", 4, 8, reduction="sum"))
    with pytest.raises(NotImplementedError, match="zero contributing"):
        _call("liger", _case("jsd", 8, 64, ignore_frac=1.0))


# --- cut cross-entropy -----------------------------------------------------------------------------
CCE_VARIANTS = [
    dict(),
    dict(ignore_frac=0.25),
    dict(reduction="sum", ignore_frac=0.25),
    dict(reduction="none", ignore_frac=0.25),
]


@pytest.mark.parametrize("opts", CCE_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.slow  # cut_cross_entropy's torch.compile on the CPU: inductor's cold start
def test_cce_matches_the_reference(cce, opts):
    r = _measure("cce", _case("linear_ce", 16, 512, h=128, **opts))
    assert r.accuracy_ok, r
    assert not r.mutates_inputs


@pytest.mark.slow  # cut_cross_entropy's torch.compile on the CPU: inductor's cold start
def test_cce_peaked_and_bfloat16(cce):
    assert _measure("cce", _case("linear_ce", 16, 512, "float32", "peaked", h=128)).accuracy_ok
    case = _case("linear_ce", 16, 512, "bfloat16", h=128)
    assert _measure("cce", case).accuracy_ok
    assert _call("cce", case).dtype == torch.bfloat16  # cut_cross_entropy's own loss is float32


def test_cce_declares_bias_and_label_smoothing_unsupported(cce):
    impl = registry.get("linear_ce", "cce")
    assert impl.why_unsupported(_case("linear_ce", 4, 10, h=8, bias=True))
    assert impl.why_unsupported(_case("linear_ce", 4, 10, h=8, label_smoothing=0.1))


@pytest.mark.slow  # cut_cross_entropy's torch.compile on the CPU: inductor's cold start
def test_cce_mean_over_no_targets(cce):
    case = _case("linear_ce", 8, 64, h=16, ignore_frac=1.0)
    if ON_CPU:  # torch_compile: F.cross_entropy over zero rows, torch's NaN and zero gradient
        r = _measure("cce", case)
        assert r.accuracy_ok and math.isnan(_call("cce", case).item())
    else:  # impl="cce": NaN forward, then ZeroDivisionError in its backward
        with pytest.raises(NotImplementedError, match="every target is ignored"):
            _call("cce", case)


def test_liger_kl_rows_record_the_clamp():
    from lossbench import registry
    from lossbench.cases import Case
    from lossbench.sweep import Unit, UnitRunner

    pytest.importorskip("liger_kernel")
    assert "eps=" in registry.get("kl", "liger").convention
    rows = []
    UnitRunner(lambda d: {}, budget_s=0.01).run(Unit(Case.make("kl", 8, 16, "float32", DEVICE), "liger", ("fwd",)),
                                                rows.append)
    assert "eps=" in rows[0]["convention"]
