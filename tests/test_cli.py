"""The command line: a small real run, plugins, unsupported and failing implementations, bad input."""
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from lossbench import load_results
from lossbench.cli import main
from lossbench.records import COLUMNS, STATUSES

TINY = ["--shape", "64x10", "--dtype", "float32", "--budget", "0.01"]


def _run(tmp_path, *args):
    return main(["run", "--out", str(tmp_path), *TINY, *args])


def test_small_run_writes_complete_rows(tmp_path, capsys):
    rc = main(["run", "--out", str(tmp_path), "--shape", "64x10,32x16x100", "--dtype", "float32", "--budget", "0.01",
               "--impl", "torch_functional,torch_module,torch_composed"])
    out = capsys.readouterr().out
    assert rc == 0
    df = load_results(tmp_path)
    assert set(df["family"]) == {"nll", "ce", "kl", "linear_ce", "jsd"}
    assert len(df) == (4 * 3 + 1) * 3  # (families x impls; jsd has torch_functional only) x modes
    assert df[df["family"] == "linear_ce"]["h"].eq(16).all()
    # these working sets fit in the cache: no rate is read against the copy bandwidth
    assert df["gbps"].isna().all() and df["pct_peak_bw"].isna().all() and (df["copy_gbps"] > 0).all()
    assert (df["status"] == "ok").all()
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    assert (df["samples"] >= 5).all()
    assert df["raw_ms"].map(len).equals(df["samples"])
    assert df["evict_ms"].map(len).equals(df["samples"])  # one eviction time per sample (cold cache)
    assert (df["time_ci_low_ms"] <= df["time_median_ms"]).all()
    assert (df["time_median_ms"] <= df["time_ci_high_ms"]).all()
    assert df["accuracy_ok"].all()
    grads, fwd = df[df["mode"] != "fwd"], df[df["mode"] == "fwd"]
    assert (grads["grad_rel_err"] < 1e-5).all()
    # fwd rows are judged on the loss of the no_grad call: no gradient columns
    assert (fwd["loss_rel_err"] < 1e-6).all() and fwd["grad_rel_err"].isna().all()
    assert df["run_id"].nunique() == 1 and df["threads"].iloc[0] == torch.get_num_threads()
    for family in ("nll", "ce", "kl", "linear_ce", "jsd"):
        assert f"{family} (" in out
    meta = json.loads(next(tmp_path.glob("*.meta.json")).read_text())
    assert meta["state"] == "complete" and meta["rows"] == len(df)


PLUGIN = textwrap.dedent('''
    import torch.nn.functional as F
    import lossbench

    @lossbench.register(family="ce", name="plugin_ok")
    def plugin_ok(logits, target, **kw):
        return F.cross_entropy(logits, target, **kw)

    @lossbench.register(family="ce", name="plugin_refuses")
    def plugin_refuses(logits, target, **kw):
        raise NotImplementedError("no weights here")

    @lossbench.register(family="ce", name="plugin_no_sum", unsupported=("reduction=sum",), dtypes=("float64",))
    def plugin_no_sum(logits, target, **kw):
        return F.cross_entropy(logits, target, **kw)

    @lossbench.register(family="ce", name="plugin_breaks")
    def plugin_breaks(logits, target, **kw):
        raise RuntimeError("kernel launch failed")
''')


def test_plugin_rows_unsupported_and_error(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "res"
    rc = main(["run", "--out", str(out), *TINY, "--family", "ce", "--mode", "fwd_bwd", "--plugin", str(plugin),
               "--impl", "torch_functional,plugin_ok,plugin_refuses,plugin_no_sum,plugin_breaks"])
    assert rc == 1  # an error row makes the run fail, after every other row is written
    df = load_results(out).set_index("impl")
    assert set(df["status"]) <= set(STATUSES)
    assert df.loc["plugin_ok", "status"] == "ok"
    assert df.loc["plugin_refuses", "status"] == "unsupported"
    assert "no weights here" in df.loc["plugin_refuses", "error"]
    assert df.loc["plugin_no_sum", "status"] == "unsupported"
    assert "float32" in df.loc["plugin_no_sum", "error"]
    assert df.loc["plugin_breaks", "status"] == "error"
    assert "kernel launch failed" in df.loc["plugin_breaks", "error"]
    assert math.isclose(df.loc["plugin_ok", "err_ratio_vs_torch"], 1.0)


@pytest.mark.slow
def test_torch_compile_reports_compile_time_apart(tmp_path):
    rc = _run(tmp_path, "--family", "kl", "--impl", "torch_compile,torch_functional", "--mode", "fwd,fwd_bwd")
    assert rc == 0
    df = load_results(tmp_path)
    compiled = df[df["impl"] == "torch_compile"]
    assert (compiled["status"] == "ok").all() and compiled["accuracy_ok"].all()
    # Compilation takes far longer than a steady-state call, and stays out of the samples.
    assert (compiled["compile_ms"] > 20 * compiled["time_median_ms"]).all()
    assert (compiled["time_median_ms"] < 50).all()
    assert df[df["impl"] == "torch_functional"]["compile_ms"].isna().all()


def test_list_and_report(tmp_path, capsys):
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    for name in ("torch_module", "torch_functional", "torch_composed", "torch_compile"):
        assert name in listing
    assert _run(tmp_path, "--family", "nll", "--impl", "torch_functional,torch_composed") == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    assert "torch_composed" in capsys.readouterr().out


BAD = [
    (["--family", "hinge"], "unknown family 'hinge'"),
    (["--impl", "torch_fast"], "unknown implementation 'torch_fast'"),
    (["--suite", "nightly-xl"], "unknown suite 'nightly-xl'"),
    (["--shape", "64by10"], "malformed shape '64by10'"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--mode", "fast"], "unknown mode 'fast'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--plugin", "no_such_module_xyz"], "plugin 'no_such_module_xyz' failed to import"),
    (["--budget", "-1"], "--budget must be positive"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_exit_2_and_no_run_file(tmp_path, capsys, args, message):
    rc = main(["run", "--out", str(tmp_path / "res"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and message in err and err.startswith("lossbench: error:")
    assert not (tmp_path / "res").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_cuda_device(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "not available" in capsys.readouterr().err


def test_broken_plugin_file_exits_2_without_traceback(tmp_path):
    plugin = tmp_path / "broken.py"
    plugin.write_text("import lossbench\nimport not_installed_dependency\n")
    proc = subprocess.run([sys.executable, "-m", "lossbench", "run", "--plugin", str(plugin), "--out",
                           str(tmp_path / "res")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"lossbench: error: plugin '{plugin}' failed to import: ModuleNotFoundError: No module named 'not_installed_dependency'"]
    assert not (tmp_path / "res").exists()


def test_registry_conflicts_and_reloads(tmp_path):
    from lossbench import register
    from lossbench.errors import UsageError
    from lossbench.registry import load_plugin

    with pytest.raises(UsageError, match="already registered by torch.nn.functional"):
        register(family="ce", name="torch_functional")(lambda *a, **k: None)
    text = PLUGIN.replace('name="plugin_', 'name="twice_')
    plugin = tmp_path / "twice.py"
    plugin.write_text(text)
    load_plugin(str(plugin))
    load_plugin(str(plugin))  # the same file again: nothing to do
    copy = tmp_path / "sub"
    copy.mkdir()
    (copy / "twice.py").write_text(text)
    load_plugin(str(copy / "twice.py"))  # same module name, re-imported: replaces its own entries
    (tmp_path / "rival.py").write_text(text)  # another module claiming the same names: refused
    with pytest.raises(UsageError, match="twice_ok is already registered by lossbench_plugin_twice"):
        load_plugin(str(tmp_path / "rival.py"))


@pytest.mark.parametrize("args,message", [
    (["--arch", "ampere"], "arch 'ampere': expected sm_<capability>"),
    (["--kernel", "softmax"], "unknown kernels ['softmax']"),
])
def test_kernels_bad_input_is_one_line_exit_2(capsys, args, message):
    pytest.importorskip("triton")
    assert main(["kernels", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_kernels_prints_the_table_and_writes_json(tmp_path, capsys, monkeypatch):
    """The command's wiring (the compiles themselves are tests/test_triton_compile.py's)."""
    pytest.importorskip("triton")
    from lossbench.kernels.triton import aot

    row = aot.ResourceRow("ce", "bf16 grad BLOCK=4096 warps=8", "bfloat16", "sm_90", 61, 16, 16, 0, 32, 1024, 9000, 0.5)
    monkeypatch.setattr(aot, "resource_table", lambda archs, kernels, progress: [row])
    assert main(["kernels", "--json", str(tmp_path / "k.json")]) == 0
    out = capsys.readouterr().out
    assert "bf16 grad BLOCK=4096 warps=8" in out and "1 spill: ce bf16 grad BLOCK=4096 warps=8 sm_90" in out
    (saved,) = json.loads((tmp_path / "k.json").read_text())
    assert saved["registers"] == 61 and saved["spill_bytes"] == 16
