"""`lossbench nightly`: three real nights (no baseline, clean, a wrong gradient); a slower night and
the flow's other exits on synthetic runs."""
import json
from pathlib import Path

import pytest

from lossbench import run
from lossbench.cli import main
from lossbench import nightly
from test_compare import _rows

PLUGIN = str(Path(__file__).with_name("adjustable_impl.py"))
SELECTION = ["--family", "ce", "--impl", "torch_module,torch_functional,torch_composed,adjustable",
             "--shape", "256x300", "--dtype", "float32", "--mode", "fwd_bwd", "--budget", "0.05", "--device", "cpu",
             "--plugin", PLUGIN]


def _pointer(results):
    (entry,) = json.loads((results / "baseline.json").read_text())["baselines"].values()
    return entry["run_id"]


@pytest.mark.slow
def test_three_real_nights(tmp_path, monkeypatch, capsys):
    """No baseline (4), clean (0, the baseline moves), a wrong gradient (1, the baseline stays). The
    exit-1 night is an accuracy regression: deterministic, where a timing one depends on how loaded
    the machine is (on a host loaded enough, between-run noise hides even a 3x slowdown, and the
    verdict is rightly inconclusive). The slowdown nights are test_a_slower_night_* below."""
    results = tmp_path / "results"
    argv = ["nightly", *SELECTION, "--results", str(results), "--threshold", "50"]
    assert main(argv) == 4  # no baseline yet: this run becomes it
    first = _pointer(results)
    assert main(argv) == 0  # clean: the baseline moves
    second = _pointer(results)
    assert second != first
    capsys.readouterr()

    monkeypatch.setenv("LOSSBENCH_TEST_WRONG_GRAD", "1")
    md, js = tmp_path / "night.md", tmp_path / "night.json"
    assert main(argv + ["--markdown", str(md), "--json", str(js)]) == 1
    assert _pointer(results) == second  # a regression does not become the baseline
    out = capsys.readouterr().out
    assert "regressed" in out and "adjustable" in out and "baseline kept" in out
    (cmp,) = json.loads(js.read_text())["comparisons"].values()
    acc = [r for r in cmp["rows"] if r["verdict"] == "regressed" and r["metric"] == "accuracy"]
    assert acc and {r["impl"] for r in acc} == {"adjustable"}
    assert "| regressed" in md.read_text()
    assert len(list(results.glob("*.jsonl"))) == 3  # every night's rows kept


def test_a_slower_night_keeps_the_baseline(tmp_path, monkeypatch, capsys):
    execute, _ = _fake_execute([_rows(seed=1, between=0.03), _rows(seed=2, between=0.03),
                                _rows(seed=3, between=0.03, slow={"fused": 1.3})])
    monkeypatch.setattr(run, "execute", execute)
    js = tmp_path / "night.json"
    assert [main(["nightly", "--results", str(tmp_path), "--json", str(js)]) for _ in range(3)] == [4, 0, 1]
    assert _pointer(tmp_path) == "night1"
    (cmp,) = json.loads(js.read_text())["comparisons"].values()
    assert {r["impl"] for r in cmp["rows"] if r["verdict"] == "regressed"} == {"fused"}
    assert "fused: slower" in capsys.readouterr().out


# --- the flow on synthetic runs -----------------------------------------------------------------------
def _fake_execute(rows_by_call):
    """run.execute replaced: each call writes the next synthetic run into the results folder."""
    calls = []

    def execute(spec, out, **kw):
        rows = rows_by_call[len(calls)]
        run_id = f"night{len(calls)}"
        path = Path(out) / f"{run_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({**r, "run_id": run_id}) + "\n" for r in rows))
        calls.append(run_id)
        return run.RunOutcome(run_id, path, "complete", len(rows), 1.0)

    return execute, calls


def test_a_row_that_stops_running_is_a_regression_and_keeps_the_baseline(tmp_path, monkeypatch):
    execute, calls = _fake_execute([_rows(n_cases=4, seed=1), _rows(n_cases=4, seed=2, status={"fused": "crash"})])
    monkeypatch.setattr(run, "execute", execute)
    assert main(["nightly", "--results", str(tmp_path)]) == 4
    assert main(["nightly", "--results", str(tmp_path)]) == 1  # ok -> crash: a status regression
    assert _pointer(tmp_path) == "night0"


def test_rows_failing_in_both_nights_exit_3(tmp_path, monkeypatch):
    execute, _ = _fake_execute([_rows(n_cases=4, seed=1, status={"fused": "oom"}),
                                _rows(n_cases=4, seed=1, status={"fused": "oom"})])
    monkeypatch.setattr(run, "execute", execute)
    assert main(["nightly", "--results", str(tmp_path)]) == 3  # not clean: no baseline is set
    assert not (tmp_path / "baseline.json").exists()
    assert main(["nightly", "--results", str(tmp_path)]) == 3


@pytest.mark.parametrize("content, message", [
    ("{not json", "is corrupt"),
    ('{"baselines": {"cpu: X": {"run_id": "gone"}}}', "run gone, is not in"),
    ('["a list"]', "not a lossbench baseline pointer"),
])
def test_a_bad_pointer_is_refused_before_running(tmp_path, monkeypatch, capsys, content, message):
    (tmp_path / "baseline.json").write_text(content)
    monkeypatch.setattr(run, "execute", lambda *a, **k: pytest.fail("ran despite a bad pointer"))
    assert main(["nightly", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_pointer_is_per_device_name(tmp_path, monkeypatch):
    gpu = [{**r, "device": "cuda:0", "device_name": "NVIDIA H100"} for r in _rows(n_cases=4, seed=3)]
    execute, _ = _fake_execute([_rows(n_cases=4, seed=1), gpu])
    monkeypatch.setattr(run, "execute", execute)
    assert main(["nightly", "--results", str(tmp_path)]) == 4
    assert main(["nightly", "--results", str(tmp_path)]) == 4  # a new device: its own first night
    assert json.loads((tmp_path / "baseline.json").read_text())["baselines"].keys() == {"cpu: Test CPU", "NVIDIA H100"}
    assert nightly.read_pointer(tmp_path)["baselines"]["NVIDIA H100"]["run_id"] == "night1"


def test_a_new_torch_is_refused_and_tonights_run_kept(tmp_path, monkeypatch, capsys):
    execute, _ = _fake_execute([_rows(n_cases=4, seed=1), _rows(n_cases=4, seed=2, torch_version="2.14.0")])
    monkeypatch.setattr(run, "execute", execute)
    assert main(["nightly", "--results", str(tmp_path)]) == 4
    capsys.readouterr()
    assert main(["nightly", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "torch_version" in err and "night1 is kept" in err
    assert (tmp_path / "night1.jsonl").is_file() and _pointer(tmp_path) == "night0"
