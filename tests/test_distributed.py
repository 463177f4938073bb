"""torchrun-sharded sweeps: two gloo ranks on the CPU write one run holding every unit once; a rank killed
mid-run loses only its unfinished units, which --resume measures; the sharding itself, without processes."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lossbench import distributed, run, sweep
from lossbench.cases import Case
from lossbench.records import key, key_of
from lossbench.registry import Implementation, get
from lossbench.sweep import Unit

PLUGIN = str(Path(__file__).with_name("rank_sleep_impl.py"))
# 21 rows: nll and kl in two reductions x 3 implementations in one mode, and ce in three modes with
# vocab_parallel, a collective implementation (every rank runs it; in a single process it is `unsupported`).
# Its fwd and fwd_bwd accuracy calls must come in the same order on every rank (they once followed a set's
# hash-seeded order, and the ranks hung in different collectives).
SUITE = textwrap.dedent("""
    description = "test_distributed: a tiny sweep"
    budget_s = 0.02
    shapes = ["64x50"]
    dtypes = ["float32"]
    modes = ["fwd_bwd"]
    impls = ["torch_functional", "torch_composed", "rank1_sleepy", "vocab_parallel"]

    [[group]]
    families = ["nll"]
    reduction = ["mean", "sum"]

    [[group]]
    families = ["kl"]
    reduction = ["batchmean", "sum"]

    [[group]]
    families = ["ce"]
    modes = ["fwd", "fwd_bwd", "bwd"]
""")
UNITS = 21
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_ENV}
    return {**env, **extra}


def _lossbench(*args, launcher=(), env=None, timeout=240):
    t0 = time.perf_counter()
    cmd = [*(launcher or [sys.executable]), "-m", "lossbench", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=timeout)
    return result, time.perf_counter() - t0


def _rows(out: Path) -> list[dict]:
    (path,) = out.glob("*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _written(out: Path) -> bool:
    """Whether a complete row is in the run file yet."""
    return any(b"\n" in p.read_bytes() for p in out.glob("*.jsonl"))


def _meta(out: Path) -> dict:
    (path,) = out.glob("*.meta.json")
    return json.loads(path.read_text())


def _keys(rows: list[dict]) -> list[tuple]:
    return [key_of(r) for r in rows]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "tiny.toml"
    path.write_text(SUITE)
    return str(path)


@pytest.fixture(scope="module")
def single(suite, tmp_path_factory):
    """The same suite in one process: the key set every sharded run must end with."""
    out = tmp_path_factory.mktemp("single")
    result, wall = _lossbench("run", "--suite", suite, "--device", "cpu", "--plugin", PLUGIN, "--in-process",
                              "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == UNITS and len(set(_keys(rows))) == UNITS
    return {"keys": set(_keys(rows)), "rows": rows, "wall_s": wall}


@pytest.mark.slow
def test_two_gloo_ranks_write_one_run_with_every_unit_once(tmp_path, suite, single):
    out = tmp_path / "two"
    result, wall = _lossbench("run", "--suite", suite, "--device", "cpu", "--plugin", PLUGIN, "--out", str(out),
                              launcher=TORCHRUN)
    print(f"\n2-rank torchrun sweep: {wall:.1f} s wall; single process: {single['wall_s']:.1f} s wall")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    assert len(list(out.glob("*.jsonl"))) == 1 and len(list(out.glob("*.meta.json"))) == 1
    rows, meta = _rows(out), _meta(out)
    keys = _keys(rows)
    assert len(keys) == len(set(keys)) == UNITS  # every unit once
    assert set(keys) == single["keys"]
    assert {r["run_id"] for r in rows} == {meta["run_id"]}
    assert meta["state"] == "complete" and meta["rows"] == UNITS
    assert meta["world_size"] == 2 and [e["rank"] for e in meta["ranks"]] == [0, 1]
    assert all(e["devices"] == {"cpu": "cpu"} and e["host"] for e in meta["ranks"])
    assert meta["spec"]["devices"] == ["cpu"]
    # Rank 0 never measures rank 1's share: its rows are in the file because they came over the wire.
    plan, impls = run.plan_of(meta["spec"])
    units = list(sweep.units(plan, lambda fam: impls[fam]))
    shares = distributed.assign(units, lambda u: get(u.case.family, u.impl), 2)
    rank1 = {key(u.case, u.impl, m) for u in shares[1] if not get(u.case.family, u.impl).collective for m in u.modes}
    assert rank1 and rank1 <= set(keys)
    # The collective implementation ran on both ranks (ok, where alone it is unsupported), a fixed sample count.
    vps = [r for r in rows if r["impl"] == "vocab_parallel"]
    assert sorted(r["mode"] for r in vps) == ["bwd", "fwd", "fwd_bwd"]
    assert all(vp["status"] == "ok" and vp["samples"] == sweep.COLLECTIVE_SAMPLES for vp in vps), vps
    assert {r["world_size"] for r in rows} == {2} and {r["world_size"] for r in single["rows"]} == {1}
    assert [r["status"] for r in single["rows"] if r["impl"] == "vocab_parallel"] == ["unsupported"] * 3
    assert {r["status"] for r in rows} == {"ok"}
    # Only rank 0 speaks: one header, one table of results.
    assert result.stderr.count("lossbench run ") == 1, result.stderr[-3000:]
    assert result.stdout.count(f"{UNITS} rows (") == 1, result.stdout[-3000:]


@pytest.mark.slow
def test_a_killed_rank_loses_only_its_unfinished_units(tmp_path, suite, single):
    out, pidfile = tmp_path / "killed", tmp_path / "rank1.pid"
    env = _env(LOSSBENCH_TEST_PIDFILE=str(pidfile), LOSSBENCH_TEST_SLEEP_S="1")
    cmd = [*TORCHRUN, "-m", "lossbench", "run", "--suite", suite, "--device", "cpu", "--plugin", PLUGIN,
           "--out", str(out)]
    with open(tmp_path / "torchrun.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while not (pidfile.is_file() and pidfile.read_text() and _written(out)):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "torchrun.log").read_text()
                time.sleep(0.2)
            os.kill(int(pidfile.read_text()), signal.SIGKILL)  # rank 1, sleeping in its share
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = (tmp_path / "torchrun.log").read_text()
    assert rc != 0, log[-3000:]
    rows, meta = _rows(out), _meta(out)
    keys = _keys(rows)
    assert 0 < len(keys) < UNITS and len(set(keys)) == len(keys), log[-3000:]  # rows kept, some missing
    assert set(keys) <= single["keys"]
    assert meta["state"] in ("running", "interrupted")

    result, _ = _lossbench("run", "--resume", meta["run_id"], "--out", str(out), "--in-process")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"({len(keys)} already done)" in result.stderr
    rows = _rows(out)
    keys = _keys(rows)
    assert len(keys) == len(set(keys)) and set(keys) == single["keys"]
    meta = _meta(out)
    assert meta["state"] == "complete" and meta["rows"] == UNITS and len(meta["resumes"]) == 1


# --- sharding, without processes ---------------------------------------------------------------------

def _impl(name, compiles=False, collective=False):
    return Implementation("ce", name, lambda *a, **k: None, compiles=compiles, collective=collective)


IMPLS = {i.name: i for i in (_impl("a"), _impl("b"), _impl("slow", compiles=True), _impl("vp", collective=True))}


def _units():
    units = []
    # (4096, 32000) and (8192, 16000): the same bytes, so ties in cost
    for n, c in ((64, 50), (4096, 32000), (8192, 16000), (1024, 1000), (8, 8), (2048, 128256), (512, 50257)):
        for dtype in ("float32", "bfloat16"):
            case = Case.make("ce", n, c, dtype, "cpu")
            for impl in IMPLS:
                modes = ("fwd", "fwd_bwd", "bwd") if impl != "b" else ("fwd_bwd",)
                units.append(Unit(case, impl, modes))
    return units


def _impl_of(unit):
    return IMPLS[unit.impl]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_sharding_deals_every_unit_once_balanced_and_collective_units_everywhere(world_size):
    units = _units()
    shares = distributed.assign(units, _impl_of, world_size)
    assert shares == distributed.assign(list(units), _impl_of, world_size)  # deterministic
    shuffled = random.Random(0).sample(units, len(units))
    assert [set(s) for s in distributed.assign(shuffled, _impl_of, world_size)] == [set(s) for s in shares]
    own = [[u for u in s if not _impl_of(u).collective] for s in shares]
    dealt = [u for s in own for u in s]
    assert sorted(map(repr, dealt)) == sorted(repr(u) for u in units if not _impl_of(u).collective)  # each once
    collective = [u for u in units if _impl_of(u).collective]
    assert collective and all(s[len(o):] == collective for s, o in zip(shares, own))  # after its own, in order
    for o in own:  # each rank's own units in plan order
        assert o == sorted(o, key=units.index)
    loads = [sum(distributed.cost(u, _impl_of(u)) for u in o) for o in own]
    largest = max(distributed.cost(u, _impl_of(u)) for u in dealt)
    assert max(loads) <= min(loads) + largest, loads


def test_costs_grow_with_bytes_modes_and_compiling():
    small, big = Case.make("ce", 64, 50, "float32", "cpu"), Case.make("ce", 4096, 32000, "float32", "cpu")
    cost = distributed.cost
    assert cost(Unit(small, "a", ("fwd",)), IMPLS["a"]) < cost(Unit(big, "a", ("fwd",)), IMPLS["a"])
    assert cost(Unit(big, "a", ("fwd",)), IMPLS["a"]) < cost(Unit(big, "a", ("fwd", "bwd")), IMPLS["a"])
    assert cost(Unit(big, "a", ("fwd",)), IMPLS["a"]) < cost(Unit(big, "slow", ("fwd",)), IMPLS["slow"])


def test_solo_keeps_every_unit_and_torchrun_is_detected_from_its_environment():
    units = _units()
    assert distributed.Solo().share(units, _impl_of) == (units, [])
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert distributed.launched(env)
    assert not distributed.launched({**env, "WORLD_SIZE": "1"})
    assert not distributed.launched({k: v for k, v in env.items() if k != "MASTER_PORT"})


def test_resume_finds_rows_whatever_gpu_measured_them():
    """A sharded CUDA run's rows carry each rank's device (cuda:LOCAL_RANK); resume counts them as the run's device."""
    meta = {"ranks": [{"rank": 0, "devices": {"cuda:0": "cuda:0"}}, {"rank": 1, "devices": {"cuda:0": "cuda:1"}}],
            "resumes": [{"ranks": [{"rank": 2, "devices": {"cuda:0": "cuda:2", "cpu": "cpu"}}]}]}
    k = key(Case.make("ce", 8, 8, "float32", "cuda:0"), "a", "fwd")
    rows = {(device, *k[1:]) for device in ("cuda:1", "cuda:2", "cpu")}
    assert {k[0] for k in distributed.planned_keys(rows, meta)} == {"cuda:0", "cpu"}
    assert distributed.planned_keys(rows, {}) == rows  # a single-process run: rows as they are
