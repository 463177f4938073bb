"""tests/test_benchmarks.py under pytest-benchmark, and its JSON imported as lossbench rows
(importers/pytest_benchmark.py): a real, small session in a subprocess, then hand-made files for what a
session does not produce (other modules' benchmarks, no samples, broken structure)."""
from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lossbench import devices
from lossbench.errors import UsageError
from lossbench.importers import pytest_benchmark as pb
from lossbench.records import COLUMNS

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 5
TIME = ["time_median_ms", "time_p20_ms", "time_p80_ms", "time_ci_low_ms", "time_ci_high_ms", "samples",
        "raw_ms", "evict_ms"]


def _session(out: Path, *flags: str) -> subprocess.CompletedProcess:
    """pytest on two tiny cases of tests/test_benchmarks.py, as a user would run it."""
    env = {**os.environ, "LOSSBENCH_SHAPES": "256x100", "LOSSBENCH_DTYPES": "float32",
           "LOSSBENCH_DEVICES": "cpu", "LOSSBENCH_ROUNDS": str(ROUNDS)}
    env.pop("PYTEST_ADDOPTS", None)  # e.g. a --benchmark-disable there would refuse --benchmark-only
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *flags, "--benchmark-json", str(out),
           "-k", "ce and (torch_functional or torch_module)", "tests/test_benchmarks.py"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pytest_benchmark") / "out.json"
    proc = _session(out, "--benchmark-only")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads(out.read_text())


@pytest.mark.slow
def test_session_rows(session):
    path, data = session
    df = pb.rows(path, data)
    assert list(df.columns) == COLUMNS
    assert sorted(df["impl"]) == ["torch_functional", "torch_module"]
    assert set(df["family"]) == {"ce"} and set(df["device"]) == {"cpu"} and set(df["status"]) == {"ok"}
    assert set(df["device_name"]) == {devices.device_name("cpu")}
    assert set(df["torch_version"]) == {torch.__version__}
    sha = data["commit_info"]["id"]
    assert set(df["run_id"]) == {df["run_id"][0]}
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]+", df["run_id"][0]) and df["run_id"][0].endswith("-" + sha[:6])
    assert df["git_sha"][0].startswith(sha) and df["host"][0]
    assert df["compile_ms"].isna().all() and df["converged"].isna().all()  # neither compiles; no CI criterion
    medians = {b["params"]["impl"]: b["stats"]["median"] for b in data["benchmarks"]}
    for _, r in df.iterrows():
        assert len(r["raw_ms"]) == len(r["evict_ms"]) == r["samples"] == ROUNDS
        # pytest-benchmark's own median, in seconds: catches samples scaled wrongly on the way in.
        assert r["time_median_ms"] == pytest.approx(medians[r["impl"]] * 1e3, rel=1e-6)
        assert r["time_p20_ms"] <= r["time_median_ms"] <= r["time_p80_ms"]
        assert all(e > 0 for e in r["evict_ms"])
        assert r["extra_mem_bytes"] is not None and r["extra_mem_bytes"] > 0 and r["min_mem_bytes"] > 0
        assert math.isfinite(r["err_vs_floor"]) and r["accuracy_ok"]
        assert (r["n"], r["c"], r["dtype"], r["mode"]) == (256, 100, "float32", "fwd_bwd")


@pytest.mark.slow
def test_extra_info_samples_match_pytest_benchmarks(session):
    """--benchmark-save without --benchmark-save-data keeps no stats["data"]: the rows then come from
    extra_info's raw_ms, which must be the same samples in milliseconds."""
    path, data = session
    stripped = copy.deepcopy(data)
    for b in stripped["benchmarks"]:
        del b["stats"]["data"]
    full, fallback = pb.rows(path, data), pb.rows(path, stripped)
    for a, b in zip(full["raw_ms"], fallback["raw_ms"]):
        assert a == pytest.approx(b, abs=1e-5)
    assert list(full["time_median_ms"]) == pytest.approx(list(fallback["time_median_ms"]), abs=1e-5)


@pytest.mark.slow
def test_untimed_session_writes_no_json(tmp_path):
    """--benchmark-disable (make test) records no benchmarks, and pytest-benchmark then writes no file:
    there is no such JSON to import. (test_no_samples covers one, should a later version write it.)"""
    out = tmp_path / "disabled.json"
    proc = _session(out, "--benchmark-disable")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout
    assert not out.exists()


def _doc(**info) -> dict:
    """A small pytest-benchmark file with one benchmark of ours."""
    extra = {"device": "cpu", "family": "ce", "impl": "torch_compile", "mode": "fwd_bwd", "n": 8, "c": 4,
             "h": None, "dtype": "float32", "first_call_ms": 10.0, "compiles": True, "raw_ms": [2.0, 1.0, 3.0],
             "evict_ms": [0.5, 0.6, 0.7], "extra_mem_bytes": 128, "err_vs_floor": float("nan"), **info}
    return {
        "machine_info": {"node": "node-1", "lossbench": {
            "devices": {"cpu": "CPU X"}, "host": "host-1", "torch_version": "2.9", "triton_version": None,
            "cuda_version": None, "threads": 2, "git_sha": "feed"}},
        "commit_info": {"id": "0123456789ABCDEF", "dirty": True},
        "benchmarks": [{"name": "test_fwd_bwd[x]", "extra_info": extra,
                        "stats": {"median": 0.002, "data": [0.002, 0.001, 0.003], "iterations": 1}}],
        "datetime": "2024-05-06T09:08:07.123456+02:00",
        "version": "5.3.1",
    }


def test_hand_made_file():
    r = pb.rows(Path("x.json"), _doc()).iloc[0]
    assert r["run_id"] == "20240506T070807Z-012345" and r["timestamp"] == "2024-05-06T07:08:07+00:00"
    assert r["git_sha"] == "0123456789abcdef+dirty" and r["host"] == "host-1" and r["device_name"] == "CPU X"
    assert r["raw_ms"] == [2.0, 1.0, 3.0] and r["evict_ms"] == [0.5, 0.6, 0.7] and r["time_median_ms"] == 2.0
    assert r["compile_ms"] == 8.0  # first call over the median, as sweep.py reports it
    assert pb.rows(Path("x.json"), _doc(compiles=False)).iloc[0]["compile_ms"] is None  # as sweep.py: uncompiled
    assert math.isnan(r["err_vs_floor"]) and r["converged"] is None and r["samples"] == 3


def test_without_lossbench_provenance():
    """A session run without tests/conftest.py's hook: provenance unknown, host from pytest-benchmark's,
    and a commit pytest-benchmark could not find gives 000000. Naive datetimes are UTC (before 4.0)."""
    data = _doc()
    del data["machine_info"]["lossbench"]
    data["commit_info"] = {"id": "unversioned", "dirty": False}
    data["datetime"] = "2024-05-06T07:08:07.5"
    r = pb.rows(Path("x.json"), data).iloc[0]
    assert r["run_id"] == "20240506T070807Z-000000"
    assert r["host"] == "node-1" and r["git_sha"] is None and r["device_name"] is None
    assert r["torch_version"] is None and r["time_median_ms"] == 2.0


def test_no_samples():
    """What an untimed session would give: the case, memory and accuracy, no time."""
    data = _doc(raw_ms=[], evict_ms=[])
    del data["benchmarks"][0]["stats"]["data"]
    r = pb.rows(Path("x.json"), data).iloc[0]
    assert r["status"] == "ok" and r["extra_mem_bytes"] == 128 and r["impl"] == "torch_compile"
    assert all(r[c] is None for c in TIME + ["compile_ms"]), {c: r[c] for c in TIME}


def test_foreign_benchmarks():
    data = _doc()
    foreign = {"name": "test_other", "extra_info": {}, "stats": {"median": 1.0, "data": [1.0]}}
    data["benchmarks"] += [foreign, {**foreign, "extra_info": {"family": "ce"}}]
    with pytest.warns(UserWarning, match=r"x\.json: 2 benchmarks without lossbench's extra_info") as caught:
        df = pb.rows(Path("x.json"), data)
    assert len(caught) == 1 and list(df["impl"]) == ["torch_compile"]
    data["benchmarks"] = data["benchmarks"][1:]
    with pytest.raises(UsageError, match=r"^x\.json: no lossbench benchmarks in this pytest-benchmark file$"):
        pb.rows(Path("x.json"), data)


def _set(path: list, value):
    def change(data):
        *parents, last = path
        for p in parents:
            data = data[p]
        if value is KeyError:
            del data[last]
        else:
            data[last] = value
    return change


B0 = ["benchmarks", 0]
BROKEN = {
    "benchmarks missing": (_set(["benchmarks"], KeyError), "'benchmarks' is missing"),
    "benchmarks not a list": (_set(["benchmarks"], {}), "'benchmarks' is dict, not a list"),
    "benchmark not an object": (_set(B0, [1]), "benchmark 0: not an object"),
    "extra_info not an object": (_set([*B0, "extra_info"], "x"), "'extra_info' is not an object"),
    "machine_info missing": (_set(["machine_info"], KeyError), "'machine_info' is missing"),
    "commit id missing": (_set(["commit_info", "id"], KeyError), "commit_info's 'id' is missing"),
    "datetime missing": (_set(["datetime"], KeyError), "'datetime' is missing"),
    "datetime garbage": (_set(["datetime"], "yesterday"), "'datetime' is 'yesterday', not an ISO date"),
    "stats missing": (_set([*B0, "stats"], KeyError), "benchmark 0: 'stats' is missing"),
    "data not numbers": (_set([*B0, "stats", "data"], ["1"]), "stats' 'data' is not a list of numbers"),
    "raw_ms not a list": (lambda d: (_set([*B0, "stats", "data"], KeyError)(d), _set([*B0, "extra_info", "raw_ms"], 3)(d)),
                          "extra_info's 'raw_ms' is not a list of numbers"),
    "evict_ms misaligned": (_set([*B0, "extra_info", "evict_ms"], [0.5]), "1 evict_ms for 3 samples"),
    "device missing": (_set([*B0, "extra_info", "device"], KeyError), "extra_info has no device"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_malformed(name):
    change, message = BROKEN[name]
    data = _doc()
    pb.rows(Path("x.json"), copy.deepcopy(data))  # the same file unbroken loads
    change(data)
    with pytest.raises(UsageError) as err:
        pb.rows(Path("x.json"), data)
    text = str(err.value)
    assert text.startswith("x.json: ") and message in text and "\n" not in text, text


def test_not_a_pytest_benchmark_file():
    with pytest.raises(UsageError, match="not a JSON object"):
        pb.rows(Path("x.json"), [])
    assert pb.is_pytest_benchmark(_doc())
    for other in ([], {"spec": {}, "run_id": "r"}, {"benchmarks": []}, "x"):
        assert not pb.is_pytest_benchmark(other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file of ours alone loads without a warning
        pb.rows(Path("x.json"), _doc())


@pytest.mark.slow
def test_compare_and_report_on_pytest_benchmark_files(session, tmp_path):
    """`lossbench compare` on two such files: the same file gives exit 0; a copy whose torch_module row
    needs twice the memory and has a gradient error 10x larger gives exit 1, naming both. `report` takes one."""
    from lossbench.cli import main

    path, data = session
    worse = copy.deepcopy(data)
    for b in worse["benchmarks"]:
        if b["extra_info"]["impl"] == "torch_module":
            info = b["extra_info"]
            info["extra_mem_bytes"] = info["extra_mem_max_bytes"] = 2 * info["extra_mem_bytes"] + 2**21
            info["grad_row_err_max"] *= 10
    head = tmp_path / "head.json"
    head.write_text(json.dumps(worse))
    assert main(["compare", str(path), str(path)]) == 0
    assert main(["compare", str(path), str(head), "--json", str(tmp_path / "c.json")]) == 1
    regressed = {(v["impl"], v["metric"]) for v in json.loads((tmp_path / "c.json").read_text())["rows"]
                 if v["verdict"] == "regressed"}
    assert regressed == {("torch_module", "memory"), ("torch_module", "accuracy")}
    assert main(["report", str(head), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.html").is_file()
