"""One bad implementation costs its own rows, never the sweep; a killed run resumes to completion."""
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lossbench import load_results
from lossbench.cli import main
from lossbench.records import key_of

FAULTS = textwrap.dedent('''
    import os, time
    import torch, torch.nn.functional as F
    import lossbench

    @lossbench.register(family="ce", name="fault_raise")
    def fault_raise(logits, target, **kw):
        raise RuntimeError("kernel launch failed")

    @lossbench.register(family="ce", name="fault_memory")
    def fault_memory(logits, target, **kw):
        raise MemoryError()

    @lossbench.register(family="ce", name="fault_hang")
    def fault_hang(logits, target, **kw):
        time.sleep(3600)

    @lossbench.register(family="ce", name="fault_abort")
    def fault_abort(logits, target, **kw):
        os.abort()

    @lossbench.register(family="ce", name="fault_nan")
    def fault_nan(logits, target, **kw):
        return F.cross_entropy(logits, target, **kw) * float("nan")

    @lossbench.register(family="ce", name="slow_ce")
    def slow_ce(logits, target, **kw):
        time.sleep(0.05)
        return F.cross_entropy(logits, target, **kw)
''')
TINY = ["--shape", "64x10,32x7", "--dtype", "float32", "--budget", "0.01", "--family", "ce"]


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "faults.py"
    path.write_text(FAULTS)
    return str(path)


@pytest.mark.slow
def test_each_fault_gets_its_status_and_the_sweep_goes_on(tmp_path, plugin):
    out = tmp_path / "res"
    impls = "torch_functional,fault_raise,fault_memory,fault_hang,fault_abort,fault_nan"
    rc = main(["run", "--out", str(out), *TINY, "--mode", "fwd_bwd,fwd", "--timeout", "5",
               "--plugin", plugin, "--impl", impls])
    assert rc == 1
    df = load_results(out)
    assert len(df) == 2 * 6 * 2  # cases x impls x modes: every row present, none twice
    assert df.groupby(["label", "impl", "mode"]).size().eq(1).all()
    status = df.groupby("impl")["status"].agg(set)
    assert status["torch_functional"] == {"ok"}  # healthy rows before and after every fault
    assert status["fault_raise"] == {"error"}
    assert status["fault_memory"] == {"oom"}
    assert status["fault_hang"] == {"timeout"}
    assert status["fault_abort"] == {"crash"}
    assert status["fault_nan"] == {"ok"}  # it ran: its numbers are wrong, which accuracy says
    errors = df.groupby("impl")["error"].first()
    assert "kernel launch failed" in errors["fault_raise"]
    assert "--timeout 5" in errors["fault_hang"]
    assert "SIGABRT" in errors["fault_abort"]
    nan_rows = df[df["impl"] == "fault_nan"]
    assert not nan_rows["accuracy_ok"].any() and (nan_rows["loss_rel_err"] == math.inf).all()
    assert nan_rows["accuracy_note"].str.contains("NaN").all()


def _rows_in(out):
    files = list(out.glob("*.jsonl"))
    return sum(1 for _ in open(files[0])) if files else 0


@pytest.mark.slow
def test_sigkill_then_resume_measures_every_case_exactly_once(tmp_path, plugin):
    out = tmp_path / "res"
    args = ["run", "--out", str(out), *TINY, "--plugin", plugin, "--impl", "torch_functional,slow_ce,torch_composed"]
    proc = subprocess.Popen([sys.executable, "-m", "lossbench", *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _rows_in(out) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (run_file,) = out.glob("*.jsonl")
    kept = _rows_in(out)
    assert 4 <= kept < 2 * 3 * 3, "the run was meant to be killed part-way"
    with open(run_file, "a") as f:
        f.write('{"run_id": "torn')  # as if the kill had landed mid-write
    meta = json.loads(run_file.with_name(run_file.stem + ".meta.json").read_text())
    assert meta["state"] == "running"

    assert main(["run", "--resume", run_file.stem, "--out", str(out)]) == 0
    df = load_results(out)
    keys = [key_of(r) for r in df.to_dict("records")]
    assert len(keys) == len(set(keys)) == 2 * 3 * 3  # every case x impl x mode, exactly once
    assert (df["status"] == "ok").all() and df["run_id"].nunique() == 1
    meta = json.loads(run_file.with_name(run_file.stem + ".meta.json").read_text())
    assert meta["state"] == "complete" and meta["rows"] == 2 * 3 * 3
    # Resuming a finished run measures nothing and changes nothing.
    assert main(["run", "--resume", run_file.stem, "--out", str(out)]) == 0
    assert len(load_results(out)) == 2 * 3 * 3


@pytest.mark.slow
def test_two_runs_into_one_folder(tmp_path):
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "lossbench", "run", "--out", str(out), *TINY, "--impl", "torch_functional"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    df = load_results(out)
    assert df["run_id"].nunique() == 2
    assert df.groupby("run_id").size().tolist() == [2 * 3, 2 * 3]


def test_resume_refuses_a_run_still_being_written(tmp_path, plugin):
    out = tmp_path / "res"
    assert main(["run", "--out", str(out), *TINY, "--impl", "torch_functional", "--mode", "fwd"]) == 0
    (run_file,) = out.glob("*.jsonl")
    with open(run_file) as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert main(["run", "--resume", run_file.stem, "--out", str(out)]) == 2


@pytest.mark.parametrize("args,message", [
    (["--timeout", "0"], "--timeout must be a positive number of seconds"),
    (["--timeout", "nan"], "--timeout must be a positive number of seconds"),
    (["--resume", "20990101T000000Z-abcdef"], "no run '20990101T000000Z-abcdef'"),
    (["--force"], "--force goes with --resume"),
])
def test_bad_run_arguments(tmp_path, capsys, args, message):
    assert main(["run", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_corrupt_and_foreign_files_do_not_hide_good_results(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["run", "--out", str(out), *TINY, "--impl", "torch_functional", "--mode", "fwd"]) == 0
    capsys.readouterr()
    (out / "garbage.jsonl").write_bytes(os.urandom(2048))
    (out / "other-tool.jsonl").write_text('{"metric": 1}\n[1, 2]\n')
    (out / "notes.txt").write_text("not results")
    good = next(p for p in out.glob("2*.jsonl"))
    (out / "truncated.jsonl").write_text(good.read_text()[:-40])
    # a folder's report is its latest <run_id>.jsonl: the other files are named in one warning, never reported
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("lossbench: warning:")
    assert all(name in warnings[0] for name in ("garbage.jsonl", "other-tool.jsonl", "truncated.jsonl"))
    assert f"latest of 1 run in {out}/: {good.stem}" in captured.out and "torch_functional" in captured.out
    # given by name, a torn file is reported with one warning for its torn line
    assert main(["report", str(out / "truncated.jsonl"), "--out", str(tmp_path / "report")]) == 0
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "truncated.jsonl: line 2 is not a complete row" in warnings[0]
    with pytest.warns(UserWarning):
        df = load_results(out)
    assert len(df) == 2 + 1  # the good run's rows, and the truncated copy's complete first line


def _finished_then_cut(tmp_path, *extra):
    """A small finished run with its last 3 rows cut off, as if it had been killed: (out, run_id)."""
    out = tmp_path / "res"
    assert main(["run", "--out", str(out), *TINY, "--impl", "torch_functional", *extra]) == 0
    (run_file,) = out.glob("*.jsonl")
    lines = run_file.read_text().splitlines(keepends=True)
    run_file.write_text("".join(lines[:-3]))
    return out, run_file.stem


def _set_stored(out, run_id, **fields):
    meta_path = out / f"{run_id}.meta.json"
    meta = json.loads(meta_path.read_text())
    for prov in meta["provenance"].values():
        prov.update(fields)
    meta_path.write_text(json.dumps(meta))


def test_provenance_difference_names_the_first_changed_field():
    from lossbench.records import COMPARABLE, provenance, provenance_difference

    now = provenance("r", "cpu", 2)
    assert provenance_difference(dict(now), now) is None
    for field in COMPARABLE:
        assert provenance_difference({**now, field: "other"}, now) == f"{field} was other, is now {now[field]}"
    assert provenance_difference({**now, "host": "elsewhere", "timestamp": "then"}, now) is None


@pytest.mark.slow
@pytest.mark.parametrize("field,value", [("git_sha", "0123456789abcdef0123456789abcdef01234567")])
def test_resume_refuses_a_changed_world_and_force_overrides(tmp_path, capsys, field, value):
    out, run_id = _finished_then_cut(tmp_path)
    _set_stored(out, run_id, **{field: value})
    capsys.readouterr()
    assert main(["run", "--resume", run_id, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{field} was {value}" in err and "--force" in err
    assert len(load_results(out)) == 2 * 3 - 3  # nothing written, nothing lost

    assert main(["run", "--resume", run_id, "--out", str(out), "--force"]) == 0
    df = load_results(out)
    assert len(df) == 2 * 3 and df["run_id"].nunique() == 1
    from lossbench.records import provenance

    assert (df[field].iloc[3:] == provenance(run_id, "cpu", 1)[field]).all()  # new rows: their own provenance
    meta = json.loads((out / f"{run_id}.meta.json").read_text())
    assert meta["state"] == "complete" and meta["resumes"][-1]["forced"] is True


@pytest.mark.slow
def test_resume_accepts_the_same_plan_flags_and_refuses_different_ones(tmp_path, capsys):
    out, run_id = _finished_then_cut(tmp_path)
    capsys.readouterr()
    assert main(["run", "--resume", run_id, "--out", str(out), "--family", "nll"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--family nll cannot change it (the run has ce)" in err
    assert main(["run", "--resume", run_id, "--out", str(out), "--budget", "0.5"]) == 2
    # The original command line again, with --resume: accepted, and the run completes.
    assert main(["run", "--resume", run_id, "--out", str(out), *TINY, "--impl", "torch_functional",
                 "--device", "cpu"]) == 0
    assert len(load_results(out)) == 2 * 3


@pytest.mark.slow
def test_a_case_too_large_to_build_gives_oom_rows_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "res"
    t0 = time.monotonic()
    rc = main(["run", "--out", str(out), "--family", "ce", "--shape", "200000x200000,64x10", "--mode", "fwd",
               "--impl", "torch_functional,torch_compile", "--budget", "0.01"])
    assert rc == 1  # rows that failed to run
    assert time.monotonic() - t0 < 60
    df = load_results(out)
    big, small = df[df["n"] == 200000], df[df["n"] == 64]
    assert len(big) == 2 and (big["status"] == "oom").all()
    assert big["error"].str.startswith("the case's inputs cannot be built: ").all()
    assert len(small) == 2 and (small["status"] == "ok").all()


def test_a_reference_that_cannot_be_built_is_tried_once_per_case(monkeypatch):
    from lossbench import reference
    from lossbench.cases import Case
    from lossbench.sweep import Unit, UnitRunner

    calls = []

    def no_memory(family, inputs):
        calls.append(family)
        raise MemoryError()

    monkeypatch.setattr(reference, "compute", no_memory)
    runner, rows = UnitRunner(lambda d: {}, budget_s=0.01), []
    case = Case.make("ce", 64, 10, "float32", "cpu")
    for impl in ("torch_functional", "torch_module", "torch_composed"):
        runner.run(Unit(case, impl, ("fwd", "fwd_bwd")), rows.append)
    assert len(rows) == 6 and calls == ["ce"]
    assert all(r["status"] == "oom" and r["error"] == "the case's float64 reference cannot be built: MemoryError"
               for r in rows)
