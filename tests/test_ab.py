"""`lossbench ab`: paired rounds (runners/pairing.py), the verdicts (report/ab.py), the sides, and real
runs of two commits of a plugin in a throw-away repository (the calibration plugin of lossbench.ab.calibrate,
its head made slower). Each check is shown to fail on a wrong input or a broken part."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lossbench.ab import calibrate
from lossbench.ab.session import rows_by_side
from lossbench.cli import main
from lossbench.report import ab as ab_report
from lossbench.runners import pairing

ROOT = Path(__file__).resolve().parent.parent


# --- paired rounds ------------------------------------------------------------------------------------
class _Machine:
    """A host whose speed drifts (a slow ramp plus bursts) under two sides; side B `factor` times slower."""

    def __init__(self, factor=1.0, seed=0):
        self.t, self.factor = 0, factor
        self.rng = np.random.default_rng(seed)

    def speed(self):
        self.t += 1
        burst = 2.0 if (self.t // 40) % 3 == 0 else 1.0  # a third of the time, everything 2x slower
        return (1 + self.t / 200) * burst * float(np.exp(self.rng.normal(0, 0.01)))

    def a(self):
        return 5.0 * self.speed(), 1.0

    def b(self):
        return 5.0 * self.factor * self.speed(), 1.0


def test_abba_rounds_cancel_the_machines_drift():
    m = _Machine(factor=1.10)
    p = pairing.abba(m.a, m.b, rng=np.random.default_rng(1), rounds=40)
    s = pairing.summarize(p.log_ratios())
    assert len(p.a_ms) == len(p.b_ms) == 80 and set(p.orders) == {"ABBA", "BAAB"}
    assert p.a_round[:2] == p.b_round[:2] == [0, 0]
    assert s.ratio == pytest.approx(1.10, rel=0.01) and s.ci_low < 1.10 < s.ci_high and s.p < 1e-4
    # The same samples compared unpaired (medians of each side) are thrown off by the bursts ...
    unpaired = np.median(p.b_ms) / np.median(p.a_ms)
    # ... and sampling all of A, then all of B (no interleaving) measures the drift, not the change.
    m2 = _Machine(factor=1.10)
    a = [m2.a()[0] for _ in range(80)]
    b = [m2.b()[0] for _ in range(80)]
    assert abs(np.median(b) / np.median(a) - 1.10) > 0.1
    assert abs(unpaired - 1.10) > abs(s.ratio - 1.10)


def test_log_ratios_pair_samples_by_round():
    d = pairing.log_ratios([1, 1, 2, 2], [0, 0, 1, 1], [1.1, 1.1, 2.2, 2.2], [0, 0, 1, 1])
    assert np.allclose(d, np.log(1.1))
    # Rounds shuffled against their samples: the pairing is wrong, and so is the ratio.
    d_wrong = pairing.log_ratios([1, 1, 2, 2], [0, 1, 0, 1], [1.1, 1.1, 2.2, 2.2], [0, 0, 1, 1])
    assert not np.allclose(d_wrong, np.log(1.1))


def test_equal_sides_are_not_significant():
    m = _Machine(factor=1.0, seed=3)
    p = pairing.abba(m.a, m.b, rng=np.random.default_rng(2), rounds=40)
    s = pairing.summarize(p.log_ratios())
    assert s.p > 0.01 and s.ratio == pytest.approx(1.0, abs=0.01)


# --- verdicts -----------------------------------------------------------------------------------------
def _ab_file(tmp_path, slow=None, blocks=5, rounds_per_block=4, sd=0.03, placement=0.02, seed=0, with_blocks=True,
             passes=1, process=0.0, with_passes=True):
    """An ab run file: 20 rows x 2 sides; head's rows of impl `slow` (name, factor) slower. Every round
    shares the machine's speed (+-30%) on both sides; each block of rounds has each side's inputs at a new
    place, which moves that side's time by `placement` (sd) for the block; each pass (`blocks` blocks) is
    a new process of each side, which moves its time by `process` (sd); each sample has noise `sd`."""
    rng = np.random.default_rng(seed)
    rows = []
    rounds = blocks * rounds_per_block * passes
    for i in range(20):
        impl = "slowed" if i % 2 else "steady"
        speeds = np.exp(rng.normal(0, 0.3, rounds))
        for side in ("base", "head"):
            f = slow[1] if slow and slow[0] == impl and side == "head" else 1.0
            placed = np.exp(rng.normal(0, placement, blocks * passes))
            proc = np.exp(rng.normal(0, process, passes))
            raw = [float(5 * sp * f * placed[r // rounds_per_block] * proc[r // (rounds_per_block * blocks)]
                         * np.exp(rng.normal(0, sd))) for r, sp in enumerate(speeds) for _ in range(2)]
            pair_round = [r for r in range(rounds) for _ in range(2)]
            rows.append({"run_id": "ab1", "side": side, "device": "cpu", "device_name": "Test CPU", "git_sha": side * 4,
                         "torch_version": "2.13.0", "triton_version": None, "cuda_version": None, "threads": 2,
                         "family": "ce", "impl": impl, "n": 100 + i, "c": 10, "h": None, "dtype": "float32",
                         "mode": "fwd_bwd", "options": "{}", "input_dist": "normal", "label": f"{100 + i}x10",
                         "status": "ok", "error": None, "raw_ms": raw, "pair_round": pair_round,
                         "pair_block": [r // rounds_per_block for r in pair_round] if with_blocks else None,
                         "pair_pass": [r // (rounds_per_block * blocks) for r in pair_round] if with_passes else None,
                         "time_median_ms": float(np.median(raw)), "extra_mem_bytes": 4096.0, "extra_mem_max_bytes": None,
                         "accuracy_ok": True, "grad_row_err_max": 1e-7, "loss_rel_err": 1e-8})
    path = tmp_path / "ab1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _time(cmp):
    v = cmp.verdicts
    return v[v["metric"] == "time"]


def test_a_slower_implementation_is_regressed_and_nothing_else(tmp_path):
    cmp = ab_report.verdicts(_ab_file(tmp_path, slow=("slowed", 1.10)), 0.05)
    t = _time(cmp)
    assert (t[t["impl"] == "slowed"]["verdict"] == "regressed").all()
    assert t[t["impl"] == "steady"]["verdict"].isin(["unchanged", "inconclusive"]).all()
    assert cmp.exit_code() == 1
    # A 10% faster head is improved, and exits 0.
    cmp = ab_report.verdicts(_ab_file(tmp_path, slow=("steady", 0.9)), 0.05)
    t = _time(cmp)
    assert (t[t["impl"] == "steady"]["verdict"] == "improved").all() and cmp.exit_code() == 0


def test_equal_sides_stay_quiet_and_a_wrong_pairing_would_not(tmp_path):
    cmp = ab_report.verdicts(_ab_file(tmp_path), 0.05)
    assert cmp.exit_code() == 0 and set(_time(cmp)["verdict"]) <= {"unchanged", "inconclusive"}
    # Rounds assigned at random (no pairing): the machine's drift is in every ratio, and rows get flagged.
    path = tmp_path / "ab1.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rng = np.random.default_rng(0)
    for r in rows:
        if r["side"] == "head":
            r["pair_round"] = rng.permutation(r["pair_round"]).tolist()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    broken = ab_report.verdicts(path, 0.05)
    assert not (_time(broken)["verdict"] == "unchanged").all()


def test_judging_over_blocks_absorbs_where_the_inputs_landed(tmp_path):
    """Each block's placement moves a side's time by 4% (sd): judged over blocks, equal sides stay quiet at
    a 3% threshold; the same samples judged on their rounds alone (one block) raise false alarms."""
    blocks = _time(ab_report.verdicts(_ab_file(tmp_path, sd=0.01, placement=0.04, seed=3), 0.03))
    assert not blocks["verdict"].isin(["regressed", "improved"]).any()
    assert blocks["note"].str.contains("in 5 blocks").all()
    rounds = _time(ab_report.verdicts(_ab_file(tmp_path, sd=0.01, placement=0.04, seed=3, with_blocks=False), 0.03))
    assert rounds["verdict"].isin(["regressed", "improved"]).sum() >= 2


def test_passes_absorb_each_processs_own_offset(tmp_path):
    """Each pass (a fresh process per side) moves a side's time by 4% (sd), its blocks by 1%: judged over
    3 passes, equal sides stay quiet at a 3% threshold and a 15% slower implementation is caught; the same
    samples judged as one pass (blocks alone, which share their process's offset) raise false alarms."""
    kw = dict(passes=3, blocks=3, process=0.04, placement=0.01, sd=0.01, seed=3)
    quiet = _time(ab_report.verdicts(_ab_file(tmp_path, **kw), 0.03))
    assert not quiet["verdict"].isin(["regressed", "improved"]).any()
    assert quiet["note"].str.contains("over 3 passes").all()
    caught = _time(ab_report.verdicts(_ab_file(tmp_path, slow=("slowed", 1.15), **kw), 0.03))
    assert (caught[caught["impl"] == "slowed"]["verdict"] == "regressed").mean() >= 0.8
    one = _time(ab_report.verdicts(_ab_file(tmp_path, with_passes=False, **kw), 0.03))
    assert one["verdict"].isin(["regressed", "improved"]).sum() >= 2


def test_a_change_below_the_threshold_is_not_regressed(tmp_path):
    t = _time(ab_report.verdicts(_ab_file(tmp_path, slow=("slowed", 1.02)), 0.05))
    assert not (t["verdict"] == "regressed").any()


# --- real runs ----------------------------------------------------------------------------------------
def _repo(tmp_path, factor):
    return calibrate.make_repo(tmp_path, factor)


def _ab(repo, *args, results):
    cmd = [sys.executable, "-m", "lossbench", "ab", *args, "--plugin", "kernels.py", "--family", "ce",
           "--impl", "torch_functional,calibrated", "--shape", "256x1000", "--dtype", "float32",
           "--passes", "2", "--budget", "0.1", "--results", str(results)]
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600)


def test_worker_prepares_samples_and_refreshes_in_process():
    """One side's worker, driven in this process (the fast tier's cover of worker.py; the end-to-end tests
    run it as a child): its own rows, timed samples, fresh input copies per block, torch's objects frozen
    so that the collection before every block is cheap."""
    import gc

    from lossbench.ab import worker

    spec = {"budget": None, "devices": ["cpu"], "dtype": "float32", "family": "ce", "impl": "torch_functional",
            "input_dist": None, "mode": "fwd,fwd_bwd", "plugins": [], "shape": "64x50", "suite": None, "threads": 1}
    side = worker._Side({"spec": spec, "run_id": "t", "side": "base", "git_sha": "0" * 40})
    (unit,) = side.describe()["units"]
    rows = side.prepare(unit)["rows"]
    assert {r["mode"]: r["status"] for r in rows} == {"fwd": "ok", "fwd_bwd": "ok"}
    assert all(r["git_sha"] == "0" * 40 for r in rows)
    assert gc.get_freeze_count() > 0
    for mode in ("fwd", "fwd_bwd"):
        s = side.sample(mode)
        assert s["ms"] > 0 and s["evict_ms"] >= 0
    side.refresh()
    after = {m: c.inputs.args[0].data_ptr() for m, (c, _) in side.calls.items()}
    # Rebuilt calls (the block's fresh copies). Not asserted: new addresses. The old copies are freed
    # first and the allocator hands the same buffers back (ce 64x50: the same data_ptr every block); a
    # refresh that keeps the old ones alive fixes that, but changes what the calibration measured.
    assert set(after) == {"fwd", "fwd_bwd"} and all(after[m] != 0 for m in after)
    gc.unfreeze()


@pytest.mark.slow
def test_ab_catches_a_slower_commit_of_a_plugin(tmp_path):
    repo = _repo(tmp_path, 2.0)
    res = tmp_path / "res"
    proc = _ab(repo, "HEAD~1", "HEAD", "--mode", "fwd_bwd", "--budget", "0.3", "--json", str(tmp_path / "v.json"),
               results=res)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["threshold_pct"] == 3.0  # ab's own default, below compare's 5
    t = {r["impl"]: r for r in v["rows"] if r["metric"] == "time"}
    assert t["calibrated"]["verdict"] == "regressed" and 1.5 < t["calibrated"]["change"] < 2.5
    assert t["torch_functional"]["verdict"] != "regressed"
    (run_file,) = (res / "ab").glob("*.jsonl")
    df = pd.read_json(run_file, lines=True)
    assert sorted(set(zip(df["side"], df["impl"]))) == [("base", "calibrated"), ("base", "torch_functional"),
                                                         ("head", "calibrated"), ("head", "torch_functional")]
    shas = subprocess.run(["git", "rev-parse", "HEAD~1", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.split()
    assert set(df[df["side"] == "base"]["git_sha"]) == {shas[0]} and set(df[df["side"] == "head"]["git_sha"]) == {shas[1]}
    base, head = rows_by_side(run_file)
    for _, r in pd.concat([base, head]).iterrows():  # the last version of each row: all passes
        assert len(r["pair_round"]) == len(r["pair_block"]) == len(r["pair_pass"]) == len(r["raw_ms"]) == r["samples"]
        assert r["samples"] >= 2 * 3 * 4 * 2  # passes x blocks x rounds x samples
        assert sorted(set(r["pair_block"])) == list(range(max(r["pair_block"]) + 1))
        assert set(r["pair_pass"]) == {0, 1}
    # the temporary worktrees are gone
    listed = subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout
    assert len(listed.strip().splitlines()) == 1


@pytest.mark.slow
def test_ab_of_a_commit_against_itself_is_clean(tmp_path):
    repo = _repo(tmp_path, 1.5)
    proc = _ab(repo, "HEAD", "HEAD", "--mode", "fwd", "--threshold", "20", results=tmp_path / "res")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "regressed" not in proc.stdout.split("threshold")[1].split("\n")[0]


@pytest.mark.parametrize("args, message", [
    (["nosuchref", "HEAD"], "base 'nosuchref': no such directory, and not a commit of"),
    (["HEAD", "HEAD", "--head-python", "/no/python"], "--head-python '/no/python': no such python"),
    (["HEAD"], "ab needs BASE and HEAD"),
    (["HEAD", "HEAD", "--plugin", "missing.py"], "plugin 'missing.py' does not exist in base 'HEAD'"),
    (["HEAD", "HEAD", "--resume", "x"], "--resume continues the run's own BASE and HEAD"),
    (["--resume", "nosuchrun"], "no run 'nosuchrun'"),
    (["HEAD", "HEAD", "--family", "nope"], "unknown family 'nope'"),
    (["HEAD", "HEAD", "--impl", "nope"], "unknown implementation 'nope'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    repo = _repo(tmp_path, 1.0)
    monkeypatch.chdir(repo)
    assert main(["ab", *args, "--results", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lossbench: error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "res" / "ab").exists() or not list((tmp_path / "res" / "ab").glob("*.jsonl"))


def test_a_dirty_checkout_is_refused(tmp_path, monkeypatch, capsys):
    repo = _repo(tmp_path, 1.0)
    (repo / "kernels.py").write_text((repo / "kernels.py").read_text() + "\n# edited\n")
    monkeypatch.chdir(tmp_path)
    assert main(["ab", str(repo), "HEAD", "--results", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert "has uncommitted changes" in err and "kernels.py" in err


@pytest.mark.slow
def test_a_killed_ab_run_resumes_to_every_unit_once(tmp_path):
    repo = _repo(tmp_path, 1.2)
    res = tmp_path / "res"
    cmd = [sys.executable, "-m", "lossbench", "ab", "HEAD~1", "HEAD", "--plugin", "kernels.py", "--family", "ce",
           "--impl", "torch_functional,calibrated", "--shape", "128x100,256x100,512x100", "--dtype", "float32",
           "--mode", "fwd", "--passes", "2", "--budget", "0.05", "--results", str(res)]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        files = list((res / "ab").glob("*.jsonl")) if (res / "ab").exists() else []
        if files and len(files[0].read_text().splitlines()) >= 4:  # two units' first pass written
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (run_file,) = files
    written = len(run_file.read_text().splitlines())
    assert 4 <= written < 24  # 6 units x 2 sides x 2 passes
    run_id = run_file.name.removesuffix(".jsonl")
    done = subprocess.run([sys.executable, "-m", "lossbench", "ab", "--resume", run_id, "--results", str(res)],
                          cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), done.stderr
    assert "already done" in done.stderr
    base, head = rows_by_side(run_file)
    assert len(base) == len(head) == 6
    for _, r in pd.concat([base, head]).iterrows():  # every row complete: all passes
        assert set(r["pair_pass"]) == {0, 1}


# --- nightly --ab ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_nightly_ab_measures_the_baselines_commit_against_head(tmp_path):
    """In a clone of this repository (lossbench itself at both sides), with a plugin committed in it: night 1
    is a plain run (no baseline: exit 4); a commit makes the plugin 2x slower; night 2 with --ab measures
    the baseline's commit and HEAD side by side: exit 1, the plugin's row regressed, the baseline kept."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                      text=True).stdout.strip():
        pytest.skip("the checkout has uncommitted changes: the clone would test the last commit, not them")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    (clone / "kernels.py").write_text(calibrate.PLUGIN.format(factor=1.0))
    subprocess.run([*git, "add", "kernels.py"], cwd=clone, check=True)
    subprocess.run([*git, "commit", "-qm", "kernel"], cwd=clone, check=True)
    args = [sys.executable, "-m", "lossbench", "nightly", "--plugin", "kernels.py", "--family", "ce",
            "--impl", "torch_functional,calibrated", "--shape", "256x1000", "--dtype", "float32", "--mode", "fwd",
            "--device", "cpu", "--budget", "0.2", "--results", "res", "--json", "night.json"]
    env = {**os.environ, "PYTHONPATH": str(clone)}
    first = subprocess.run(args + ["--ab"], cwd=clone, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 4, first.stderr
    assert "no baseline yet" in first.stderr
    pointer = json.loads((clone / "res" / "baseline.json").read_text())
    (entry,) = pointer["baselines"].values()
    (clone / "kernels.py").write_text(calibrate.PLUGIN.format(factor=2.0))
    subprocess.run([*git, "commit", "-qam", "slower kernel"], cwd=clone, check=True)
    second = subprocess.run(args + ["--ab"], cwd=clone, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 1, second.stdout + second.stderr
    assert "Traceback" not in second.stderr and "baseline kept" in second.stdout
    night = json.loads((clone / "night.json").read_text())
    assert night["exit_code"] == 1
    (cmp,) = night["comparisons"].values()
    t = {r["impl"]: r for r in cmp["rows"] if r["metric"] == "time"}
    assert t["calibrated"]["verdict"] == "regressed" and t["torch_functional"]["verdict"] != "regressed"
    assert json.loads((clone / "res" / "baseline.json").read_text()) == pointer  # kept
    # tonight's HEAD rows are a run of the results folder, at HEAD's commit
    tonight = pd.read_json(clone / "res" / f"{night['run_id']}.jsonl", lines=True)
    head_sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    assert set(tonight["git_sha"]) == {head_sha} and entry["git_sha"] != head_sha
    assert (clone / "res" / "ab" / f"{night['ab_run']}.jsonl").is_file()


# --- paired rounds within a plain run ---------------------------------------------------------------------
def test_a_runs_speedup_is_paired_with_torch_functional(tmp_path, monkeypatch, capsys):
    """The test plugin made 2x slower: its speedup over torch_functional, from the paired rounds, is about
    0.5 with a CI around it, and the table shows it; torch_functional's own row has none."""
    monkeypatch.setenv("LOSSBENCH_TEST_SLOWDOWN", "2")
    code = main(["run", "--family", "ce", "--impl", "torch_functional,adjustable", "--plugin",
                 str(ROOT / "tests" / "adjustable_impl.py"), "--shape", "512x1000", "--dtype", "float32",
                 "--mode", "fwd_bwd", "--budget", "0.3", "--in-process", "--out", str(tmp_path)])
    assert code == 0
    df = pd.concat([pd.read_json(f, lines=True) for f in tmp_path.glob("*.jsonl")])
    adj = df[df["impl"] == "adjustable"].iloc[0]
    assert 0.4 < adj["speedup_vs_torch"] < 0.65, adj["speedup_vs_torch"]
    assert adj["speedup_ci_low"] <= adj["speedup_vs_torch"] <= adj["speedup_ci_high"] < 0.8
    assert adj["samples"] >= 2 * 3 and len(adj["raw_ms"]) == adj["samples"]
    assert pd.isna(df[df["impl"] == "torch_functional"].iloc[0]["speedup_vs_torch"])
    out = capsys.readouterr().out
    assert f"{adj['speedup_vs_torch']:.2f}× [{adj['speedup_ci_low']:.2f}, {adj['speedup_ci_high']:.2f}]" in out
