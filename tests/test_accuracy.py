"""The accuracy runner passes torch where torch is right and fails deliberately wrong implementations."""
import math

import pytest
import torch
import torch.nn.functional as F

import wrong_impls as wrong
from lossbench import reference
from lossbench.cases import make_inputs
from lossbench.runners import accuracy


def _measure(fn, case):
    inputs = make_inputs(case)
    return accuracy.measure(fn, inputs, reference.compute(case.family, inputs), case.dtype)


def test_torch_float32_normal_is_accurate(case):
    r = _measure(F.cross_entropy, case("ce", n=256, c=1000))
    assert r.accuracy_ok and r.grad_rel_err < 1e-5 and r.grad_row_err_max < 1e-4
    assert r.loss_rel_err < 1e-6
    assert 0.5 < r.err_vs_floor < 50  # the floor is the float32 rounding of the reference itself
    assert not r.mutates_inputs


def test_gradient_ignoring_ignore_index_fails(case):
    c = case("ce", n=64, c=50, ignore_frac=0.25)
    assert _measure(F.cross_entropy, c).accuracy_ok
    r = _measure(wrong.ignores_ignore_index, c)
    assert not r.accuracy_ok
    assert r.grad_row_err_max == math.inf  # an ignored row must be exactly zero
    assert r.loss_rel_err < 1e-6  # the forward is right: only the gradient check catches it


def test_true_class_rounded_to_bf16_fails(case):
    c = case("ce", n=256, c=1000, dist="peaked")
    r = _measure(wrong.rounds_true_class, c)
    assert not r.accuracy_ok
    assert r.grad_row_err_max > 1e-2  # p_y ~ 0.99: a 2^-9 rounding of p_y is percents of 1 - p_y
    assert r.err_vs_floor > 1e4


def test_worst_row_catches_what_the_global_norm_hides(case):
    # On normal inputs p_y ~ 1/C, so the bf16 rounding of p_y is invisible in the global norm...
    r = _measure(wrong.rounds_true_class, case("ce", n=256, c=1000, dist="normal"))
    assert r.grad_rel_err < 1e-4
    # ...and on a mixed batch the confident rows are hidden by the unsure ones in the global norm,
    # but not in the worst row.
    c = case("ce", n=256, c=1000, dist="peaked")
    inputs = make_inputs(c)
    logits = inputs.args[0]
    logits[: 240] = torch.randn(240, 1000)  # 240 unsure rows, 16 confident ones
    ref = reference.compute("ce", inputs)
    mixed = accuracy.measure(wrong.rounds_true_class, inputs, ref, "float32")
    assert mixed.grad_row_err_max > 30 * mixed.grad_rel_err
    assert not mixed.accuracy_ok


def test_per_row_grad_output_bug_fails(case):
    c = case("ce", n=64, c=50, reduction="none")
    assert _measure(F.cross_entropy, c).accuracy_ok
    r = _measure(wrong.scales_by_first, c)
    assert not r.accuracy_ok and r.grad_rel_err > 0.1


def test_nan_where_reference_is_finite_fails(case):
    r = _measure(wrong.returns_nan, case("ce"))
    assert r.loss_rel_err == math.inf and not r.accuracy_ok


def test_all_ignored_matches_torchs_nan_convention(case):
    r = _measure(F.cross_entropy, case("ce", ignore_frac=1.0))
    assert r.loss_rel_err == 0 and r.grad_row_err_max == 0 and r.accuracy_ok


def test_wrong_output_shape_is_a_fault(case):
    with pytest.raises(accuracy.ImplementationFault, match="shape"):
        _measure(lambda x, t, **kw: F.cross_entropy(x, t, reduction="none"), case("ce"))


def test_torch_confident_rows_are_reported_not_hidden(case):
    # DESIGN.md: torch's CPU float32 gradient loses digits on confident rows. We report it as measured.
    r = _measure(F.cross_entropy, case("ce", n=256, c=1000, dist="peaked"))
    assert r.err_vs_floor > 100
    assert math.isfinite(r.grad_row_err_max)


def test_metric_helpers():
    ref = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([[3.0, 4.5], [0.0, 0.0]], dtype=torch.float64)
    assert accuracy.rel_l2(x, ref) == pytest.approx(0.1)
    assert accuracy.worst_row_err(x, ref) == pytest.approx(0.1)
    assert accuracy.worst_row_err(x + torch.tensor([[0.0, 0.0], [1e-30, 0.0]], dtype=torch.float64), ref) == math.inf
    assert accuracy.max_abs_err(x, ref) == pytest.approx(0.5)
    assert accuracy.ratio(0.0, 0.0) != accuracy.ratio(0.0, 0.0)  # NaN
    assert accuracy.ratio(1.0, 0.0) == math.inf


@pytest.mark.parametrize("impl", ["torch_functional", "torch_module", "torch_composed"])
@pytest.mark.parametrize("options", [dict(ignore_frac=1.0), dict(ignore_frac=1.0, label_smoothing=0.1, weight=True),
                                     dict(ignore_frac=0.5, reduction="none"), dict(target="prob", label_smoothing=0.2)])
def test_torch_implementations_on_ignore_variants(case, impl, options):
    from lossbench.registry import get

    r = _measure(get("ce", impl).fn, case("ce", **options))
    assert r.accuracy_ok and r.grad_rel_err < 1e-5, (impl, options)


def test_fwd_rows_are_judged_on_the_no_grad_call(case):
    """Each mode's accuracy describes the call it times: the fwd row catches a wrong no-grad path,
    which the forward + backward call never takes."""
    from lossbench.registry import Implementation
    from lossbench.sweep import Unit, UnitRunner
    import lossbench.registry as registry

    impl = Implementation("ce", "wrong_without_grad", wrong.wrong_without_grad)
    registry._REGISTRY[("ce", impl.name)] = impl
    try:
        rows = []
        UnitRunner(lambda d: {}, budget_s=0.01).run(Unit(case("ce", n=64, c=50), impl.name, ("fwd", "fwd_bwd")),
                                                    rows.append)
    finally:
        del registry._REGISTRY[("ce", impl.name)]
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["fwd_bwd"]["accuracy_ok"] and by_mode["fwd_bwd"]["loss_rel_err"] < 1e-6
    fwd = by_mode["fwd"]
    assert not fwd["accuracy_ok"] and fwd["loss_rel_err"] == pytest.approx(0.01, rel=1e-3)
    assert fwd["grad_row_err_max"] is None and fwd["grad_rel_err"] is None  # no gradient in that call


def test_measure_forward_passes_torch_and_catches_nan(case):
    c = case("ce", n=64, c=50)
    inputs = make_inputs(c)
    ref = reference.compute("ce", inputs)
    good = accuracy.measure_forward(F.cross_entropy, inputs, ref, "float32")
    assert good.accuracy_ok and good.loss_rel_err < 1e-6 and good.grad_row_err_max is None
    bad = accuracy.measure_forward(wrong.returns_nan, inputs, ref, "float32")
    assert not bad.accuracy_ok and bad.loss_rel_err == math.inf and "NaN" in bad.note


def test_chunked_gradient_metrics_equal_the_whole_ones(case, monkeypatch):
    """Gradients are compared in row slices (no whole float64 copy): same numbers as in one piece."""
    c = case("ce", n=200, c=300, dist="peaked", ignore_frac=0.1)
    inputs = make_inputs(c)
    ref = reference.compute("ce", inputs)
    whole = accuracy.measure(wrong.rounds_true_class, inputs, ref, "float32")
    monkeypatch.setattr(accuracy, "COMPARE_CHUNK_BYTES", 7 * 300 * 8)  # 7 rows per slice
    sliced = accuracy.measure(wrong.rounds_true_class, inputs, ref, "float32")
    for field in ("grad_rel_err", "grad_row_err_max", "grad_max_abs_err", "err_vs_floor"):
        assert getattr(sliced, field) == pytest.approx(getattr(whole, field), rel=1e-9), field


def test_err_vs_floor_where_the_dtype_holds_the_exact_gradient(case):
    """NLL's gradient (-w/N at the target) is exact in float32 and bfloat16: the floor is 0. An exact
    implementation is then at the floor (1), a slightly wrong one infinitely above it, never NaN."""
    for dtype in ("float32", "bfloat16"):
        c = case("nll", n=256, c=100, dtype=dtype)
        assert _measure(F.nll_loss, c).err_vs_floor == 1.0

        def off_by_a_ulp(x, t, **kw):
            return F.nll_loss(x, t, **kw) * (1 + torch.finfo(x.dtype).eps)

        assert _measure(off_by_a_ulp, c).err_vs_floor == math.inf
    assert math.isnan(_measure(F.nll_loss, case("nll", n=64, c=10, dtype="float64")).err_vs_floor)
