"""`lossbench compare`: verdicts on synthetic runs whose truth is known, and the CLI's exits.

Synthetic runs: each row's raw samples are drawn around a known median, with within-run noise,
a per-row between-run shift, and (optionally) a burst that slows consecutive rows, as measured on
the shared machines (report/compare.py). Each check is also shown to fail without the part of the
design it relies on (false-discovery control, the between-run term, the drift).
"""
import json

import numpy as np
import pandas as pd
import pytest

from lossbench.cli import main
from lossbench.report import compare, runs, statistics
from lossbench.report.runs import Run

IMPLS = ["torch_module", "torch_functional", "torch_composed", "torch_compile", "fused"]


def _rows(n_cases=40, seed=0, within=0.02, between=0.0, slow=None, burst=None, samples=15, torch_version="2.13.0",
          mem=None, acc=None, status=None):
    """A run's rows: n_cases cases x IMPLS, fwd_bwd. slow: {impl: factor}; burst: (first, last, factor)
    over row positions; mem / acc / status: {impl: value} overrides."""
    rng = np.random.default_rng(seed)
    base_rng = np.random.default_rng(12345)  # the true medians: the same in every run
    rows = []
    for i in range(n_cases):
        for impl in IMPLS:
            pos = len(rows)
            true = base_rng.uniform(0.5, 20)
            factor = (slow or {}).get(impl, 1.0) * float(np.exp(rng.normal(0, between)))
            if burst and burst[0] <= pos <= burst[1]:
                factor *= burst[2]
            raw = (true * factor * np.exp(rng.normal(0, within, samples))).tolist()
            rows.append({
                "run_id": f"run{seed}", "device": "cpu", "device_name": "cpu: Test CPU", "torch_version": torch_version,
                "triton_version": "3.9.0", "cuda_version": None, "threads": 2, "git_sha": f"sha{seed}",
                "family": "ce", "impl": impl, "n": 1000 + i, "c": 100, "h": None, "dtype": "float32",
                "mode": "fwd_bwd", "options": "{}", "input_dist": "normal", "label": f"{1000 + i}x100 float32",
                "status": (status or {}).get(impl, "ok"), "error": None,
                "raw_ms": raw, "time_median_ms": float(np.median(raw)),
                "extra_mem_bytes": (mem or {}).get(impl, 8_192_000), "extra_mem_max_bytes": None,
                "accuracy_ok": (acc or {}).get(impl, (True, 1e-6))[0],
                "grad_row_err_max": (acc or {}).get(impl, (True, 1e-6))[1], "loss_rel_err": 1e-7,
            })
    return rows


def _run(rows, name="r"):
    return Run(name, rows[0]["run_id"], pd.DataFrame(rows))


def _verdicts(cmp, metric="time"):
    v = cmp.verdicts
    return v[v["metric"] == metric]


# --- time ---------------------------------------------------------------------------------------------
def test_unchanged_code_stays_quiet():
    cmp = compare.compare(_run(_rows(seed=1, between=0.03)), _run(_rows(seed=2, between=0.03)))
    t = _verdicts(cmp)
    assert len(t) == 200
    assert not cmp.regressed() and cmp.exit_code() == 0
    assert (t["verdict"] == "improved").sum() == 0


def test_one_implementation_30_percent_slower_is_named():
    cmp = compare.compare(_run(_rows(seed=1, between=0.03)), _run(_rows(seed=2, between=0.03, slow={"fused": 1.3})))
    t = _verdicts(cmp)
    reg = t[t["verdict"] == "regressed"]
    assert cmp.exit_code() == 1
    assert set(reg["impl"]) == {"fused"}
    assert len(reg) >= 0.85 * 40
    assert reg["change"].between(1.15, 1.5).all()


def test_improvement_is_not_a_regression():
    cmp = compare.compare(_run(_rows(seed=1)), _run(_rows(seed=2, slow={"fused": 0.7})))
    t = _verdicts(cmp)
    assert set(t[t["verdict"] == "improved"]["impl"]) == {"fused"}
    assert cmp.exit_code() == 0


def test_false_discovery_control_keeps_400_rows_quiet(monkeypatch):
    """Within-run noise only, 400 rows of unchanged code: quiet with false-discovery control; the
    same data without it (every row tested at 5%, the between-run term off) raises alarms."""
    base, head = _run(_rows(n_cases=80, seed=3, within=0.08, samples=8)), _run(_rows(n_cases=80, seed=4, within=0.08, samples=8))
    assert not compare.compare(base, head).regressed()
    monkeypatch.setattr(compare, "DEFAULT_NOISE", 0.0)
    monkeypatch.setattr(compare, "MIN_ROWS_FOR_NOISE", 10**9)
    monkeypatch.setattr(compare.stats, "false_discovery_control", lambda p, method: p)
    assert compare.compare(base, head).regressed()


def test_between_run_noise_is_not_a_regression(monkeypatch):
    """Tight samples within each run, rows shifted by 10% (sd) between runs: within-run statistics
    alone cry wolf; with the between-run term the comparison stays quiet."""
    base, head = _run(_rows(seed=5, within=0.005, between=0.10)), _run(_rows(seed=6, within=0.005, between=0.10))
    cmp = compare.compare(base, head)
    assert not cmp.regressed()
    assert cmp.noise["cpu"]["between_run_noise_pct"] > 8
    monkeypatch.setattr(compare, "MIN_ROWS_FOR_NOISE", 10**9)
    monkeypatch.setattr(compare, "DEFAULT_NOISE", 0.0)
    assert compare.compare(base, head).regressed()


def test_a_burst_slowing_neighbouring_rows_is_not_a_regression(monkeypatch):
    base = _run(_rows(seed=7))
    head = _run(_rows(seed=8, burst=(60, 90, 1.8)))  # 31 consecutive rows 1.8x slower
    cmp = compare.compare(base, head)
    assert not cmp.regressed()
    monkeypatch.setattr(statistics, "DRIFT_WINDOW", 0)  # no neighbours: each row on its own
    assert compare.compare(base, head).regressed()


def test_inconclusive_when_the_data_cannot_tell():
    cmp = compare.compare(_run(_rows(n_cases=3, seed=9, within=0.3, samples=5)),
                          _run(_rows(n_cases=3, seed=10, within=0.3, samples=5, slow={"fused": 1.1})))
    t = _verdicts(cmp)
    assert (t["verdict"] == "inconclusive").any()
    assert "larger --budget" in t[t["verdict"] == "inconclusive"]["note"].iloc[0]


# --- memory, accuracy, status, rows ---------------------------------------------------------------------
def test_memory_growth_beyond_threshold_and_block():
    base = _run(_rows(n_cases=2, seed=1))
    grown = _run(_rows(n_cases=2, seed=2, mem={"fused": 8_192_000 * 1.2, "torch_compile": 8_192_000 + 900_000}))
    m = _verdicts(compare.compare(base, grown), "memory").set_index("impl")["verdict"]
    assert (m.loc["fused"] == "regressed").all()
    assert (m.loc["torch_compile"] == "unchanged").all()  # 11% more, but under one CPU allocator block
    assert (m.loc["torch_module"] == "unchanged").all()


def test_memory_within_the_base_range_is_unchanged():
    rows = _rows(n_cases=2, seed=1)
    for r in rows:
        r["extra_mem_max_bytes"] = 40_960_000  # the base's calls peaked anywhere in 8-41 MB
    head = _rows(n_cases=2, seed=2, mem={"fused": 32_768_000})
    m = _verdicts(compare.compare(_run(rows), _run(head)), "memory")
    assert (m["verdict"] == "unchanged").all()
    m = _verdicts(compare.compare(_run(_rows(n_cases=2, seed=1)), _run(head)), "memory")  # no range: 4x
    assert set(m[m["impl"] == "fused"]["verdict"]) == {"regressed"}


def test_accuracy_turning_false_or_growing_2x():
    base = _run(_rows(n_cases=2, seed=1))
    head = _run(_rows(n_cases=2, seed=2, acc={"fused": (False, 1e-3), "torch_compile": (True, 3e-6),
                                              "torch_module": (True, 1.5e-6)}))
    cmp = compare.compare(base, head)
    a = _verdicts(cmp, "accuracy").set_index("impl")
    assert set(a.loc["fused", "verdict"]) == {"regressed"} and "turned false" in a.loc["fused", "note"].iloc[0]
    assert set(a.loc["torch_compile", "verdict"]) == {"regressed"}
    assert set(a.loc["torch_module", "verdict"]) == {"unchanged"}
    assert cmp.exit_code() == 1
    assert cmp.verdicts.iloc[0]["verdict"] == "regressed"  # sorted by severity


def test_status_and_rows_in_one_run():
    base_rows = _rows(n_cases=2, seed=1)
    head_rows = _rows(n_cases=2, seed=2, status={"fused": "error"})
    head_rows = [r for r in head_rows if not (r["impl"] == "torch_module" and r["n"] == 1000)]
    head_rows.append({**head_rows[0], "impl": "new_kernel"})
    cmp = compare.compare(_run(base_rows), _run(head_rows))
    v = cmp.verdicts
    assert set(v[(v["metric"] == "status")]["impl"]) == {"fused"}
    assert set(v[v["metric"] == "status"]["verdict"]) == {"regressed"}
    assert list(v[v["verdict"] == "missing"]["impl"]) == ["torch_module"]
    assert list(v[v["verdict"] == "added"]["impl"]) == ["new_kernel"]


def test_incompatible_runs_are_refused():
    base, head = _run(_rows(n_cases=2, seed=1)), _run(_rows(n_cases=2, seed=2, torch_version="2.14.0"))
    with pytest.raises(compare.UsageError, match="torch_version is 2.13.0 in r, 2.14.0 in r"):
        compare.compare(base, head)
    assert compare.compare(base, head, force=True).exit_code() == 0


# --- the command --------------------------------------------------------------------------------------
def _write(tmp_path, rows, run_id):
    path = tmp_path / f"{run_id}.jsonl"
    path.write_text("".join(json.dumps({**r, "run_id": run_id}) + "\n" for r in rows))
    return path


def test_cli_exit_codes_and_outputs(tmp_path, capsys):
    _write(tmp_path, _rows(seed=1), "base")
    _write(tmp_path, _rows(seed=2), "same")
    _write(tmp_path, _rows(seed=2, slow={"fused": 1.3}), "slow")
    _write(tmp_path, _rows(seed=2, torch_version="2.14.0"), "other")
    assert main(["compare", "base", "same", "--results", str(tmp_path)]) == 0
    md, js = tmp_path / "c.md", tmp_path / "c.json"
    assert main(["compare", "base", "slow", "--results", str(tmp_path), "--markdown", str(md), "--json", str(js)]) == 1
    out = capsys.readouterr().out
    assert "regressed" in out and "fused" in out
    assert "| regressed" in md.read_text()
    data = json.loads(js.read_text())
    assert data["threshold_pct"] == 5.0  # compare's default (ab's is 3)
    assert data["regressed"] and {r["impl"] for r in data["rows"] if r["verdict"] == "regressed"} == {"fused"}
    assert main(["compare", str(tmp_path / "base.jsonl"), str(tmp_path / "slow.jsonl")]) == 1  # run files
    capsys.readouterr()
    assert main(["compare", "base", "other", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "torch_version" in err
    assert main(["compare", "base", "other", "--results", str(tmp_path), "--force"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["compare", "base", "nope"], "no run 'nope'"),
    (["compare", "base", "garbage"], "holds no result rows"),
    (["compare", "base", "base", "--threshold", "0"], "--threshold must be a percentage"),
    (["compare", "base", "base", "--threshold", "150"], "--threshold must be a percentage"),
    (["compare", "base", "disjoint"], "no row in common"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    _write(tmp_path, _rows(n_cases=2, seed=1), "base")
    (tmp_path / "garbage.jsonl").write_text("not json\n{}\n")
    _write(tmp_path, [{**r, "family": "kl"} for r in _rows(n_cases=2, seed=1)], "disjoint")
    assert main(argv + ["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("lossbench: error")]) == 1
    assert message in err[-1]


def test_an_implementation_slower_on_all_its_rows_stands_out_from_the_noise(monkeypatch):
    """Rows shifted by 10% (sd) between runs: one row's 30% drowns in it, the implementation's 40 rows
    together do not. Without the implementation-wide test most of them are missed."""
    base = _run(_rows(seed=11, within=0.01, between=0.10))
    head = _run(_rows(seed=12, within=0.01, between=0.10, slow={"fused": 1.3}))
    t = _verdicts(compare.compare(base, head))
    reg = t[t["verdict"] == "regressed"]
    assert set(reg["impl"]) == {"fused"} and len(reg) >= 0.7 * 40
    assert reg["note"].str.contains("with its implementation").any()
    monkeypatch.setattr(compare, "MIN_GROUP_ROWS", 10**9)
    t = _verdicts(compare.compare(base, head))
    assert (t["verdict"] == "regressed").sum() < 0.5 * 40


def test_a_row_that_varies_from_run_to_run_is_judged_by_its_history(monkeypatch):
    """One row 1.7x slower in the head run, as a noisy row can be between runs of the same code. Without
    history it is a regression; with earlier runs in which that row moved as much, it is not."""
    def noisy(seed, factor):
        rows = _rows(seed=seed, within=0.01, between=0.02)
        rows[7]["raw_ms"] = [x * factor for x in rows[7]["raw_ms"]]
        rows[7]["time_median_ms"] *= factor
        return _run(rows)

    base, head = noisy(20, 1.0), noisy(21, 1.7)
    assert compare.compare(base, head).regressed()
    history = [noisy(22, 0.6), noisy(23, 1.6), noisy(24, 1.0), base]
    assert not compare.compare(base, head, history=history).regressed()
    quiet = [noisy(25, 1.0), noisy(26, 1.02), noisy(27, 0.98), base]  # a history in which the row held still
    assert compare.compare(base, head, history=quiet).regressed()


def test_history_comes_from_earlier_comparable_runs(tmp_path):
    for i, torch_version in enumerate(["2.13.0", "2.13.0", "2.14.0", "2.13.0", "2.13.0"]):
        _write(tmp_path, _rows(n_cases=2, seed=i, torch_version=torch_version), f"2026010{i}T000000Z-aaaaaa")
    (tmp_path / "20260100T000000Z-broken.jsonl").write_text("garbage\n")
    base = runs.load_run("20260101T000000Z-aaaaaa", tmp_path)
    head = runs.load_run("20260103T000000Z-aaaaaa", tmp_path)
    ids = {r.run_id for r in runs.history_for(base, head, tmp_path)}
    assert ids == {"20260100T000000Z-aaaaaa", "20260101T000000Z-aaaaaa"}  # earlier, same torch; no later run


def test_memory_seen_by_earlier_runs_is_not_a_regression():
    """The CPU peak varies between processes too: a head above the base's whole range, but within
    what earlier runs of that row saw, is not a regression; above all of it, it is."""
    base = _run(_rows(n_cases=2, seed=1))
    head = _run(_rows(n_cases=2, seed=2, mem={"fused": 16_384_000}))
    assert set(_verdicts(compare.compare(base, head), "memory").query("impl == 'fused'")["verdict"]) == {"regressed"}
    earlier = _run(_rows(n_cases=2, seed=3, mem={"fused": 16_384_000}))
    m = _verdicts(compare.compare(base, head, history=[earlier, base]), "memory")
    assert (m["verdict"] == "unchanged").all()
    bigger = _run(_rows(n_cases=2, seed=2, mem={"fused": 24_576_000}))
    m = _verdicts(compare.compare(base, bigger, history=[earlier, base]), "memory")
    assert set(m.query("impl == 'fused'")["verdict"]) == {"regressed"}


def _paced_rows(seed, machine=None, slow=None, within=0.01):
    """Rows with eviction times: `machine` {row position: factor} slows a row's samples and its
    evictions alike (the host got slower while it was measured); `slow` {position: factor} slows the
    samples only (the code got slower)."""
    rows = _rows(seed=seed, within=within, between=0.0)
    rng = np.random.default_rng(seed + 100)
    for pos, r in enumerate(rows):
        m = (machine or {}).get(pos, 1.0)
        evict = 12.0 * m * np.exp(rng.normal(0, 0.01, len(r["raw_ms"])))
        r["raw_ms"] = [x * m * (slow or {}).get(pos, 1.0) for x in r["raw_ms"]]
        r["evict_ms"] = evict.tolist()
        r["time_median_ms"] = float(np.median(r["raw_ms"]))
    return rows


def test_a_row_measured_while_the_host_slowed_is_paced_by_its_evictions(monkeypatch):
    """Row 52 measured while the host ran 40% slower (its evictions too): compared in units of its
    evictions it is unchanged; compared raw (PACE off) it is a false alarm. A row whose code got 40%
    slower (evictions as usual) is still regressed: pacing does not hide a real change."""
    base = _run(_paced_rows(1))
    head = _run(_paced_rows(2, machine={52: 1.4}, slow={117: 1.4}))
    t = _verdicts(compare.compare(base, head)).reset_index(drop=True)
    reg = t[t["verdict"] == "regressed"]
    assert list(reg["case"]) == [head.rows["label"][117]] and list(reg["impl"]) == [head.rows["impl"][117]]
    monkeypatch.setattr(statistics, "PACE", False)
    t = _verdicts(compare.compare(base, head))
    assert head.rows["label"][52] in set(t[t["verdict"] == "regressed"]["case"])


def test_only_rows_paced_in_both_runs_are_paced():
    """A base without eviction times (an older run) is compared raw: no row mixes units."""
    base_rows = _paced_rows(1)
    for r in base_rows:
        r.pop("evict_ms")
    t = _verdicts(compare.compare(_run(base_rows), _run(_paced_rows(2))))
    assert (t["verdict"] != "regressed").all() and t["change"].between(0.9, 1.1).all()


def test_an_implementation_moved_alike_on_every_row_carries_each_row(monkeypatch):
    """10% slower on all 40 rows, each row with 4% run-to-run noise (and a quiet history: without one an
    implementation is assumed to move by 5% between runs): a row's own change is often under
    the 5% threshold, the implementation's is not. With each row judged on its own change (no
    shrinkage to the implementation's), a third of the rows are missed. A row that did not move the
    implementation's way itself is never called (4 of 40 here)."""
    base = _run(_rows(seed=31, within=0.01, between=0.04))
    head = _run(_rows(seed=32, within=0.01, between=0.04, slow={"fused": 1.10}))
    history = [_run(_rows(seed=s, within=0.01, between=0.04)) for s in (33, 34, 35)] + [base]
    reg = _verdicts(compare.compare(base, head, history=history)).query("verdict == 'regressed'")
    assert set(reg["impl"]) == {"fused"} and len(reg) >= 34 and (reg["change"] > 1).all()
    monkeypatch.setattr(compare, "_shrunk", lambda x, g: float(x["adj"]))
    own = _verdicts(compare.compare(base, head, history=history)).query("verdict == 'regressed'")
    assert len(reg) > len(own) + 5, (len(reg), len(own))


def test_an_implementation_that_moved_in_earlier_runs_is_judged_by_them(monkeypatch):
    """fused 15% slower on all rows in the head: an implementation-wide regression, unless fused moved
    as a whole by as much between earlier runs of the same code (its history), as whole implementations
    do between processes on a shared host."""
    def run(seed, fused=1.0):
        return _run(_rows(seed=seed, within=0.01, between=0.03, slow={"fused": fused}))

    base, head = run(41), run(42, 1.15)
    quiet = [run(43), run(44), run(45), base]
    assert compare.compare(base, head, history=quiet).regressed()
    moving = [run(46, 0.85), run(47, 1.15), run(48, 0.9), base]
    t = _verdicts(compare.compare(base, head, history=moving))
    assert (t["verdict"] != "regressed").all()
    held_still = compare.implementation_history_noise(compare.history_logs(quiet))
    monkeypatch.setattr(compare, "implementation_history_noise", lambda logs: held_still)
    assert compare.compare(base, head, history=moving).regressed()  # the rows' own history alone lets it through


def test_a_large_pacing_correction_is_less_sure(monkeypatch):
    """Row 52 measured while the host ran its evictions 3x slower and the row 4.5x slower (rows do not all
    slow in proportion): paced, 1.5x. The size of the correction widens the row's interval, so it is not
    a regression; trusting the correction fully (PACE_SLOPE_SD 0), it is."""
    base = _run(_paced_rows(1))
    rows = _paced_rows(2, machine={52: 3.0})
    rows[52]["raw_ms"] = [x * 1.5 for x in rows[52]["raw_ms"]]  # 4.5x raw against evictions 3x: 1.5x paced
    rows[52]["time_median_ms"] *= 1.5
    head = _run(rows)
    case = head.rows["label"][52]
    assert case not in set(_verdicts(compare.compare(base, head)).query("verdict == 'regressed'")["case"])
    monkeypatch.setattr(compare, "PACE_SLOPE_SD", 0.0)
    assert case in set(_verdicts(compare.compare(base, head)).query("verdict == 'regressed'")["case"])
