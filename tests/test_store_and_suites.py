"""Result files load whole or torn; suites expand as documented."""
import json

import pytest

from lossbench import load_results
from lossbench.errors import UsageError
from lossbench.records import COLUMNS
from lossbench.suites import build_plan, load_suite


def test_torn_last_line_is_skipped_with_a_warning(tmp_path):
    rows = [{"run_id": "a", "family": "ce", "impl": "x", "time_median_ms": 1.0},
            {"run_id": "a", "family": "ce", "impl": "y", "time_median_ms": float("inf")}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"run_id": "a", "impl": "z", "time_med'
    (tmp_path / "a.jsonl").write_text(text)
    (tmp_path / "b.jsonl").write_text(json.dumps({"run_id": "b", "family": "kl", "impl": "x"}) + "\n")
    (tmp_path / "a.meta.json").write_text("{}")  # not a row file: ignored
    with pytest.warns(UserWarning, match="line 3 is not a complete row"):
        df = load_results(tmp_path)
    assert list(df["impl"]) == ["x", "y", "x"]
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    assert df["time_median_ms"].iloc[1] == float("inf")


def test_missing_results_path():
    with pytest.raises(UsageError, match="no results"):
        load_results("/nonexistent/results")


def test_quick_suite_covers_defaults_in_both_dists_and_every_dtype():
    name, suite = load_suite("quick")
    plan = build_plan(suite, devices=["cpu"], name=name)
    cases = [c for c, _ in plan.items]
    dtypes = {c.dtype for c in cases}
    for family in ("nll", "ce", "kl"):
        for dtype in dtypes:
            dists = {c.input_dist for c in cases if c.family == family and c.dtype == dtype and not c.non_default_options}
            assert dists == {"normal", "peaked"}, (family, dtype)
    # variants: every reduction, weights, ignore (some and all), smoothing with ignore, prob targets, log_target, layout
    opts = [c.non_default_options for c in cases]
    for want in ({"reduction": "none"}, {"reduction": "sum"}, {"ignore_frac": 1.0, "label_smoothing": 0.1},
                 {"target": "prob"}, {"log_target": True}):
        assert any(want.items() <= o.items() for o in opts), want
    assert any(o.get("spatial") and o.get("noncontig") for o in opts)
    linear = [c for c in cases if c.family == "linear_ce"]
    assert {c.options["reduction"] for c in linear} == {"none", "mean", "sum"}
    assert any(c.options["ignore_frac"] and c.options["label_smoothing"] for c in linear)


def test_filters_and_shape_override():
    name, suite = load_suite("quick")
    plan = build_plan(suite, devices=["cpu"], families=["kl"], dtypes=["bfloat16"], modes=["fwd"], shapes=["8x16"])
    assert {(c.family, c.dtype, c.n, c.c) for c, _ in plan.items} == {("kl", "bfloat16", 8, 16)}
    assert all(m == ("fwd",) for _, m in plan.items)
    with pytest.raises(UsageError, match="nothing to run"):
        build_plan(suite, devices=["cpu"], dtypes=["float64"])
    peaked = build_plan(suite, devices=["cpu"], input_dists=["peaked"])
    assert {c.input_dist for c, _ in peaked.items} == {"peaked"}
    assert {c.input_dist for c, _ in build_plan(None, devices=["cpu"], input_dists=["peaked"]).items} == {"peaked"}
    with pytest.raises(UsageError, match="unknown input_dist 'spiky'"):
        build_plan(suite, devices=["cpu"], input_dists=["spiky"])


def test_default_plan_is_each_familys_torch_default():
    plan = build_plan(None, devices=["cpu"], shapes=["32x8", "16x4x100"])
    assert sorted((c.family, c.shape) for c, _ in plan.items) == [
        ("ce", "32x8"), ("jsd", "32x8"), ("kl", "32x8"), ("linear_ce", "16x4x100"), ("nll", "32x8")]
    assert all(not c.non_default_options and m == ("fwd", "fwd_bwd", "bwd") for c, m in plan.items)
    # In a mixed list each family takes the shapes of its own form; none of its form, no cases.
    assert "linear_ce" not in {c.family for c, _ in build_plan(None, devices=["cpu"], shapes=["32x8"]).items}
    with pytest.raises(UsageError, match="NxHxV for linear_ce"):
        build_plan(None, devices=["cpu"], families=["linear_ce"], shapes=["32x8"])
    with pytest.raises(UsageError, match="malformed shape"):
        build_plan(None, devices=["cpu"], shapes=["32x8x9x10"])


def test_bad_suite_file(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text("[[group]]\nfamilies = ['ce']\nsmoothing = 0.1\n")
    name, suite = load_suite(str(bad))
    with pytest.raises(UsageError, match="no option 'smoothing'"):
        build_plan(suite, devices=["cpu"], name=name)
    bad.write_text("[[group]\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_suite(str(bad))
