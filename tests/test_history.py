"""`lossbench history`: change points on synthetic histories whose truth is known, and the CLI's exits.

The runs are copies of a committed nightly run (264 rows, 200 ok on the 2-core CPU) with new run ids,
times and commits, each run's times multiplied by a run-wide factor (3%) and each row's by its own (2%),
memory by 1%, seeded: the noise of a quiet machine between runs (the shared one shows ~10% per row), so
that the planted steps are the only truth; six seeds give the same table. Each rule is also shown to
matter: without persistence the single-run outlier is reported; without pooling most of the slowed
rows are missed; a step below the minimum effect, inside the noise or within an allocator block is not
reported.
"""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lossbench.cli import main
from lossbench.report import change_points, history, history_render, statistics
from lossbench.report.change_points import Metric, find_steps

BASE = Path(__file__).resolve().parent.parent / "results" / "20261201T141457Z-3f63ca"
N_RUNS = 8
RUN_NOISE, ROW_NOISE = 0.03, 0.02  # log-normal: every row of a run, and each row on its own


def run_id(i: int) -> str:
    return f"20270101T{i:02d}0000Z-{i:06x}"


def sha(i: int) -> str:
    return hashlib.sha1(f"commit {i}".encode()).hexdigest()


def write_history(folder: Path, n_runs=N_RUNS, seed=0, edit=None) -> None:
    """n_runs copies of BASE with noise; edit(i, row) changes row (a dict) of run i in place (the plants)."""
    rows = [json.loads(line) for line in BASE.with_suffix(".jsonl").read_text().splitlines()]
    meta = json.loads(BASE.with_suffix(".meta.json").read_text())
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_runs):
        run_factor = float(np.exp(rng.normal(0, RUN_NOISE)))
        out = []
        for r in rows:
            r = dict(r, run_id=run_id(i), git_sha=sha(i), timestamp=f"2027-01-01T{i:02d}:00:00+00:00")
            f = run_factor * float(np.exp(rng.normal(0, ROW_NOISE)))
            _scale_time(r, f)
            _scale_memory(r, float(np.exp(rng.normal(0, 0.01))))
            if edit:
                edit(i, r)
            out.append(json.dumps(r))
        (folder / f"{run_id(i)}.jsonl").write_text("\n".join(out) + "\n")
        m = dict(meta, run_id=run_id(i))
        m["provenance"] = {"cpu": dict(meta["provenance"]["cpu"], run_id=run_id(i), git_sha=sha(i))}
        (folder / f"{run_id(i)}.meta.json").write_text(json.dumps(m))


def _scale_memory(r: dict, f: float) -> None:
    """Both ends of the row's range over its repeated calls (the smallest and the largest)."""
    for col in ("extra_mem_bytes", "extra_mem_max_bytes"):
        if r[col] is not None:
            r[col] = int(r[col] * f)


def _scale_time(r: dict, f: float) -> None:
    if r["time_median_ms"] is not None:
        r["time_median_ms"] *= f
        r["raw_ms"] = [x * f for x in r["raw_ms"]]


def plants(i: int, r: dict) -> None:
    """From the fourth run (i=3) on: ce torch_composed 20% slower, ce torch_module's memory doubled; from
    the fifth (i=4) on: kl torch_composed's errors 10x. Single-run outliers in the sixth run (i=5): kl
    torch_module 30% slower, kl torch_functional's memory doubled."""
    fam, impl = r["family"], r["impl"]
    if i >= 3 and (fam, impl) == ("ce", "torch_composed"):
        _scale_time(r, 1.2)
    if i >= 3 and (fam, impl) == ("ce", "torch_module"):
        _scale_memory(r, 2.0)
    if i >= 4 and (fam, impl) == ("kl", "torch_composed"):
        for col in ("grad_row_err_max", "loss_rel_err"):
            if r[col] is not None:
                r[col] *= 10
    if i == 5 and (fam, impl) == ("kl", "torch_module"):
        _scale_time(r, 1.3)
    if i == 5 and (fam, impl) == ("kl", "torch_functional"):
        _scale_memory(r, 2.0)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("history") / "results"
    write_history(folder, edit=plants)
    return folder, history.analyse(folder)


def ok_rows(family, impl):
    rows = [json.loads(line) for line in BASE.with_suffix(".jsonl").read_text().splitlines()]
    return sum(r["family"] == family and r["impl"] == impl and r["status"] == "ok" for r in rows)


def test_exactly_the_planted_changes_between_the_right_runs(planted):
    _, h = planted
    t = history_render.change_table(h.changes)
    got = {(r["metric"], r["change"], r["family"], r["impl"], r["last run before"], r["first run after"])
           for _, r in t.iterrows()}
    step3 = (f"{run_id(2)} ({sha(2)[:7]})", f"{run_id(3)} ({sha(3)[:7]})")
    step4 = (f"{run_id(3)} ({sha(3)[:7]})", f"{run_id(4)} ({sha(4)[:7]})")
    assert got == {("time", "regressed", "ce", "torch_composed", *step3),
                   ("memory", "regressed", "ce", "torch_module", *step3),
                   ("accuracy", "regressed", "kl", "torch_composed", *step4)}
    # The slowed implementation's rows moved about 1.2x, nearly all of them found (one row of the twelve has
    # a run after the step that noise kept near the old level). Pooling the rows' steps is what finds them:
    # each row alone, with three runs before the step, is too weak for false-discovery control over 200.
    ch = h.changes
    slow = ch[(ch["metric"] == "time") & (ch["impl"] == "torch_composed")]
    assert slow["ratio"].between(1.1, 1.3).all()
    assert ok_rows("ce", "torch_composed") == 12 and len(slow) >= 11
    alone = history.changes(history.all_series(h.points, h.levels), pool=False)
    assert len(alone[alone["metric"] == "time"]) <= 8
    mem = ch[ch["metric"] == "memory"]
    assert len(mem) == 12 and mem["ratio"].between(1.9, 2.1).all()
    acc = ch[ch["metric"] == "accuracy"]
    assert acc["ratio"].between(9, 11).all() and len(acc) >= 6


def test_single_run_outliers_are_not_changes(planted):
    _, h = planted
    assert not ((h.changes["family"] == "kl") & h.changes["impl"].isin(["torch_module", "torch_functional"])).any()
    # ... although the outlier run is there to be seen.
    kl = h.points[(h.points["family"] == "kl") & (h.points["impl"] == "torch_module")]
    by_run = kl.groupby("pos")["time"].median()
    assert by_run[5] / by_run.drop(5).median() > 1.2


def _series(values, seed=1, noise=0.02):
    rng = np.random.default_rng(seed)
    return np.asarray(values, dtype=float) * np.exp(rng.normal(0, noise, len(values)))


def test_persistence_is_what_keeps_an_outlier_out():
    outlier = _series([1, 1, 1, 1, 1, 1.3, 1, 1])
    assert find_steps(outlier, "time", noise=0.02) == []
    one_run = find_steps(outlier, "time", noise=0.02, persist=1)
    assert [s.at for s in one_run] == [5, 6]  # up into the outlier, down out of it
    step = _series([1, 1, 1, 1.2, 1.2, 1.2, 1.2, 1.2])
    assert [s.at for s in find_steps(step, "time", noise=0.02)] == [3]


def test_a_step_must_clear_the_minimum_effect(monkeypatch):
    small = _series([1, 1, 1, 1, 1.035, 1.035, 1.035, 1.035], noise=0.002)
    assert find_steps(small, "time", noise=0.002) == []
    monkeypatch.setitem(change_points.METRICS, "time", Metric("time", "", 1.02))
    assert [s.at for s in find_steps(small, "time", noise=0.002)] == [4]


def test_a_step_must_stand_out_from_the_series_noise():
    step = np.array([1, 1, 1, 1.08, 1.08, 1.08])
    assert [s.at for s in find_steps(step, "time", noise=0.01)] == [3]
    assert find_steps(step, "time", noise=0.08) == []  # a row that moves 8% from run to run


def test_memory_step_must_exceed_an_allocator_block():
    tiny = np.array([1000, 1000, 1000, 3000, 3000, 3000], dtype=float)  # 3x, but 2 kB: glibc's doing on a CPU
    assert find_steps(tiny, "memory", noise=0.0, block=change_points.block_of("cpu", "memory")) == []
    assert [s.at for s in find_steps(tiny, "memory", noise=0.0, block=change_points.block_of("cuda:0", "memory"))] == [3]


def test_everything_slower_is_one_run_wide_change(tmp_path):
    def everything(i, r):
        if i >= 3:
            _scale_time(r, 1.2)
    write_history(tmp_path, n_runs=6, seed=3, edit=everything)
    t = history_render.change_table(history.analyse(tmp_path).changes)
    assert len(t) == 1, t
    r = t.iloc[0]
    assert (r["metric"], r["impl"], r["change"]) == ("time", history.RUN_WIDE, "regressed")
    assert r["first run after"].startswith(run_id(3)) and r["last run before"].startswith(run_id(2))


def test_runs_that_are_not_comparable_never_share_a_series(tmp_path):
    def upgrade(i, r):  # a torch upgrade with the fourth run, and a slower implementation with it
        if i >= 3:
            r["torch_version"] = "2.14.0+cpu"
            if (r["family"], r["impl"]) == ("ce", "torch_composed"):
                _scale_time(r, 1.2)
    write_history(tmp_path, n_runs=6, seed=4, edit=upgrade)
    h = history.analyse(tmp_path)
    assert h.runs["group"].nunique() == 2
    assert h.changes.empty  # three runs on each side, in separate series: nothing to compare across


def test_cli_prints_the_table_and_writes_the_report(planted, tmp_path, capsys):
    folder, _ = planted
    assert main(["history", "--results", str(folder), "--family", "ce", "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "2 changes" in out and "torch_composed" in out and run_id(3) in out and sha(3)[:7] in out
    md = (tmp_path / "rep" / "history.md").read_text()
    assert "## Changes" in md and run_id(2) in md
    assert (tmp_path / "rep" / "history.html").is_file()
    assert len(list((tmp_path / "rep").glob("history-*.png"))) == 4  # run-wide level, ce time, memory, accuracy


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lossbench: error: "), err
    return err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no runs" in _error(capsys, ["history", "--results", str(empty)])
    assert "no runs" in _error(capsys, ["history", "--results", str(tmp_path / "absent")])
    folder = tmp_path / "runs"
    write_history(folder, n_runs=2)
    assert "--family nope" in _error(capsys, ["history", "--results", str(folder), "--family", "ce,nope"])
    assert "--impl nope" in _error(capsys, ["history", "--results", str(folder), "--impl", "nope"])
    shutil.copy(folder / f"{run_id(0)}.jsonl", folder / "20270102T000000Z-000000.jsonl")
    (folder / "20270102T000000Z-000000.jsonl").write_text("garbage\n{not json\n")
    assert "20270102T000000Z-000000.jsonl" in _error(capsys, ["history", "--results", str(folder)])
    (folder / "20270102T000000Z-000000.jsonl").unlink()
    (folder / f"{run_id(1)}.meta.json").write_text("{corrupt")
    assert f"{run_id(1)}.meta.json" in _error(capsys, ["history", "--results", str(folder)])


def test_a_torn_last_line_is_a_warning_not_an_error(tmp_path):
    write_history(tmp_path, n_runs=2)
    with open(tmp_path / f"{run_id(1)}.jsonl", "a") as f:
        f.write('{"run_id": "torn')
    with pytest.warns(UserWarning, match="not a complete row"):
        h = history.analyse(tmp_path)
    assert h.runs.groupby("run_id").size().tolist() == [264, 264]


def _evictions(machine, one_commit=True):
    """edit for write_history: every sample with the eviction timed before it; one commit in every run
    (else run i's own, sha(i)); machine(i, row) scales the row's samples in run i and its evictions alike
    (the host's speed while the row was measured, not the code's)."""
    rng = np.random.default_rng(7)

    def edit(i, r):
        r["git_sha"] = sha(0) if one_commit else sha(i)
        if r["time_median_ms"] is None:
            return
        m = machine(i, r)
        _scale_time(r, m)
        r["evict_ms"] = [12.0 * m * float(np.exp(rng.normal(0, 0.01))) for _ in r["raw_ms"]]
    return edit


def _composed(r):
    return (r["family"], r["impl"]) == ("ce", "torch_composed")


@pytest.mark.parametrize("one_commit", [True, False])
def test_a_slower_host_between_runs_of_one_commit_is_no_change(tmp_path, monkeypatch, one_commit):
    """From the fourth run on, the host runs 20% slower while ce torch_composed's rows are measured, their
    evictions too. In units of their evictions (as compare takes them) the runs are alike and nothing is
    reported. In plain medians the rows are 20% slower from the fourth run: with one commit throughout no
    step is placed between its runs (no code changed there); were each run its own commit, that would be
    a false step, the same as the code's own would be."""
    write_history(tmp_path, edit=_evictions(lambda i, r: 1.2 if i >= 3 and _composed(r) else 1.0, one_commit))
    h = history.analyse(tmp_path)
    assert h.points["paced"].all()
    assert h.changes.empty, history_render.change_table(h.changes)
    monkeypatch.setattr(statistics, "PACE", False)
    t = history_render.change_table(history.analyse(tmp_path).changes)
    found = set(zip(t["metric"], t["change"], t["family"], t["impl"], t["first run after"]))
    assert found == (set() if one_commit else {
        ("time", "regressed", "ce", "torch_composed", f"{run_id(3)} ({sha(3)[:7]})")})


def test_paced_times_still_show_the_codes_own_step(tmp_path):
    """Pacing takes out the host's speed, not the code's: ce torch_composed 20% slower from the fourth run
    with its evictions as usual is found; the host 20% slower over the whole sixth run is not."""
    host = _evictions(lambda i, r: 1.2 if i == 5 else 1.0, one_commit=False)  # the code changes at every run

    def edit(i, r):
        host(i, r)
        if i >= 3 and _composed(r) and r["time_median_ms"] is not None:
            _scale_time(r, 1.2)
    write_history(tmp_path, edit=edit)
    t = history_render.change_table(history.analyse(tmp_path).changes)
    found = set(zip(t["metric"], t["change"], t["family"], t["impl"]))
    assert found == {("time", "regressed", "ce", "torch_composed")}, t
