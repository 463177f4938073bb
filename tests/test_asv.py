"""asv over lossbench's registry: asv.conf.json's keys, a real `asv run` on a small selection, its results
read into lossbench's schema, and `lossbench compare` on two asv result files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lossbench import load_results
from lossbench.errors import UsageError
from lossbench.importers import asv as asv_import

ROOT = Path(__file__).resolve().parent.parent
ASV = Path(sys.executable).parent / "asv"
asv_config = pytest.importorskip("asv.config")


def unknown_keys(conf: dict) -> list[str]:
    """Keys asv would ignore: it copies any key into its Config without a word (asv.config.Config.from_json).
    Its own list is what Config() sets, plus the file's format version."""
    known = set(vars(asv_config.Config())) | {"version"}
    return sorted(set(conf) - known)


def test_conf_keys_are_asvs_own():
    conf = json.loads((ROOT / "asv.conf.json").read_text())
    assert unknown_keys(conf) == []
    assert conf["benchmark_dir"] == "benchmarks" and conf["results_dir"] == "results/asv"
    assert ".asv/" in (ROOT / ".gitignore").read_text().split()  # the site and environments are not committed
    assert conf["html_dir"].startswith(".asv/") and conf["env_dir"].startswith(".asv/")
    # The check catches a misspelling asv itself would swallow.
    assert unknown_keys({**conf, "results_directory": "x", "benchmark_dirs": "y"}) == ["benchmark_dirs", "results_directory"]


def test_suites_asv_discovers_cover_every_family_and_measure(monkeypatch):
    """benchmarks/losses.py as asv imports it: one class per family named as asv reports it, its params
    the family's grid; one parameter set's methods run in-process (the slow tests run asv itself)."""
    from lossbench.families import FAMILIES
    from lossbench.integrations import asv_suite

    monkeypatch.setenv("LOSSBENCH_IMPLS", "torch_functional")
    classes = asv_suite.suites()
    assert sorted(classes) == sorted(asv_suite.class_name(f) for f in FAMILIES)
    assert asv_suite.class_name("linear_ce") == "LinearCE" and asv_suite.class_name("jsd") == "JSD"
    suite = classes["CE"]()
    impls, shapes, dtypes, devices = suite.params
    assert impls == ["torch_functional"] and suite.param_names == asv_suite.PARAM_NAMES
    params = (impls[0], shapes[0], dtypes[0], devices[0])
    suite.setup(*params)
    suite.time_fwd_bwd(*params)
    assert suite.track_extra_mem_bytes(*params) > 0
    assert suite.track_err_vs_floor(*params) < 10


def _asv(tmp: Path, machine: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HOME": str(tmp / "home"),  # asv machine writes ~/.asv-machine.json
               "LOSSBENCH_IMPLS": "torch_functional,adjustable", "LOSSBENCH_SHAPES": "256x100",
               "LOSSBENCH_DTYPES": "float32", "LOSSBENCH_PLUGIN": str(ROOT / "tests" / "adjustable_impl.py"), **env}
    environ.pop("TRITON_INTERPRET", None)
    conf = tmp / "asv.conf.json"
    subprocess.run([str(ASV), "machine", "--yes", "--machine", machine, "--config", str(conf)], env=environ,
                   cwd=tmp, check=True, capture_output=True, timeout=120)
    return subprocess.run([str(ASV), "run", "--config", str(conf), "--machine", machine, "--python=same",
                           "--set-commit-hash", "HEAD", "-b", r"^losses\.CE\.", *args],
                          env=environ, cwd=tmp, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def asv_results(tmp_path_factory):
    """Two asv runs of the CE suite (torch_functional and the test plugin, one small case): `base` with raw
    samples recorded, `head` --quick with the plugin's gradient scaled by 1.01."""
    if not ASV.exists():
        pytest.skip("asv is not installed")
    tmp = tmp_path_factory.mktemp("asv")
    conf = json.loads((ROOT / "asv.conf.json").read_text())
    conf.update(repo=str(ROOT), benchmark_dir=str(ROOT / "benchmarks"), results_dir=str(tmp / "results"),
                html_dir=str(tmp / "html"), env_dir=str(tmp / "env"))
    (tmp / "asv.conf.json").write_text(json.dumps(conf))
    base = _asv(tmp, "base", "--record-samples")
    head = _asv(tmp, "head", "--quick", LOSSBENCH_TEST_WRONG_GRAD="1")
    for done in (base, head):
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "failed" not in done.stdout
    files = {m: next((tmp / "results" / m).glob("*-*.json")) for m in ("base", "head")}
    return tmp, files


@pytest.mark.slow
def test_asv_run_saves_results_in_lossbenchs_schema(asv_results):
    tmp, files = asv_results
    df = load_results(tmp / "results")
    assert set(df["family"]) == {"ce"} and set(df["impl"]) == {"torch_functional", "adjustable"}
    assert len(df) == 4 and set(df["status"]) == {"ok"}
    assert (df["time_median_ms"] > 0).all() and (df["extra_mem_bytes"] > 0).all() and (df["err_vs_floor"] >= 1).all()
    assert set(df["mode"]) == {"fwd_bwd"} and set(df["torch_version"]) == {__import__("torch").__version__}
    assert df["device_name"].notna().all() and df["git_sha"].str.fullmatch("[0-9a-f]{40}").all()
    base = load_results(files["base"])
    # Raw samples recorded: the time columns are lossbench's own summaries of them, in milliseconds.
    for _, r in base.iterrows():
        assert len(r["raw_ms"]) == r["samples"] >= 5
        assert sorted(r["raw_ms"])[len(r["raw_ms"]) // 2 - 1] <= r["time_median_ms"] <= max(r["raw_ms"])
        assert 0.01 < r["time_median_ms"] < 1000  # ms, not asv's seconds
    # The result file's own medians (seconds) agree with the rows' (ms).
    raw = json.loads(files["base"].read_text())["results"]["losses.CE.time_fwd_bwd"][0]
    assert sorted(base["time_median_ms"]) == pytest.approx(sorted(v * 1e3 for v in raw), rel=1e-6)


@pytest.mark.slow
def test_compare_on_two_asv_result_files(asv_results):
    tmp, files = asv_results
    from lossbench.cli import main

    # The wrong gradient is a regression: exit 1, named. The same file against itself: exit 0.
    assert main(["compare", str(files["base"]), str(files["head"])]) == 1
    assert main(["compare", str(files["base"]), str(files["base"])]) == 0
    assert main(["compare", str(files["base"]), str(files["head"]), "--json", str(tmp / "c.json")]) == 1
    verdicts = json.loads((tmp / "c.json").read_text())["rows"]
    regressed = [v for v in verdicts if v["verdict"] == "regressed"]
    assert [(v["impl"], v["metric"]) for v in regressed] == [("adjustable", "accuracy")]


def test_asv_result_without_lossbench_benchmarks_or_corrupt(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "machine.json").write_text(json.dumps({"machine": "m", "cpu": "x", "version": 1}))
    other = tmp_path / "m" / "abcdef12-env.json"
    other.write_text(json.dumps({"commit_hash": "abcdef12", "result_columns": ["result", "params"],
                                 "results": {"bench.time_other": [[1.0], []]}, "version": 2}))
    with pytest.raises(UsageError, match="no lossbench benchmarks"):
        asv_import.rows(other)
    other.write_text("{not json")
    with pytest.raises(UsageError, match="corrupt"):
        load_results(other)
    # In a folder, the unreadable file is left out with a warning; nothing else there: an error.
    with pytest.warns(UserWarning, match="left out"), pytest.raises(UsageError, match="no readable run"):
        load_results(tmp_path)


@pytest.mark.slow
def test_history_takes_asv_results(asv_results, capsys):
    """The two runs (machines base and head, one CPU) are one comparable group for history."""
    tmp, files = asv_results
    from lossbench.cli import main

    assert main(["history", "--results", str(tmp / "results"), "--out", str(tmp / "history")]) == 0
    assert "2 runs in 1 comparable group" in capsys.readouterr().out
    assert (tmp / "history" / "history.html").is_file()
