"""`lossbench ab BASE HEAD`: both sides measured in one job, their samples interleaved.

Per unit (one implementation on one case), both sides' workers are alive together: each first runs its
own sweep on the unit (accuracy, memory, status: untimed as far as the verdict goes), then the driver
takes the two sides' samples in randomized ABBA rounds, one sample at a time (runners/pairing.py), so
both see the same machine; rounds come in blocks, each on fresh copies of the inputs. The whole run is
made `passes` times, each pass with a fresh pair of worker processes. Rows go to
results/ab/<run_id>.jsonl as each unit's pass finishes, both sides' rows of the unit together (a later
pass writes them again with its samples added), each with its `side` and, per raw sample, its
`pair_round`, `pair_block` and `pair_pass`. A killed run resumes (--resume): each unit is measured in
the passes its rows do not have yet.
"""
from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import records, store
from ..errors import UsageError
from ..records import KEY
from ..runners import pairing, stats
from .sides import Side, open_side

WORKER = Path(__file__).with_name("worker.py")
SIDES = ("base", "head")
STARTUP_TIMEOUT_S = 300.0
SAMPLE_TIMEOUT_S = 120.0
REL_CI = 0.01  # a row's blocks go on until its change is known within +-1% (95%), or its budget ends
# Both workers' processes, made alike and quiet (a user's own setting of any of these is kept):
# - OMP_WAIT_POLICY=PASSIVE: the side not sampling must leave the cores alone. OpenMP's threads spin after
#   a parallel region (GNU OpenMP: up to ~0.3 s by default) and stole the cores from the other side's next
#   sample: torch_functional ce 2048x1000 float32 read 3 ms or 7 ms at random (paired sd 60-85%).
# - glibc malloc made to keep what it got: with its dynamic mmap threshold, whether a 16 MiB buffer is
#   mmapped (and its pages faulted in on every call) depends on what the process freed before: in an A/A
#   run one side read 19 ms and the other 7.9 ms on the same code for a whole unit (1024x4096 float32
#   fwd_bwd). A fixed 32 MiB mmap threshold (glibc's maximum) ends that; a trim threshold no call
#   reaches, and the heap grown 256 MiB at a time, end the rest: with a 64 MiB trim threshold the heap
#   was given back and faulted in again at random, and 5-10% of that row's samples read 3-10x its
#   median (5.5 ms, spikes of 20-70 ms); with these, 0-2 in 200 read over 1.5x and the samples' spread
#   fell from 8-14% to 2-3% (MAD). Explicit malloc_trim in the memory probe (runners/memory.py) still
#   gives the pages back before it measures.
WORKER_ENV = {k: v for k, v in {"OMP_WAIT_POLICY": "PASSIVE", "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
                                "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
                                "MALLOC_TOP_PAD_": str(256 * 2**20)}.items() if k not in os.environ}


class WorkerFailed(Exception):
    def __init__(self, status: str, why: str):
        super().__init__(why)
        self.status = status  # "crash" | "timeout"


class Worker:
    """One side's worker process (worker.py under the side's python, in the side's checkout)."""

    def __init__(self, side: Side, init: dict, log_path: Path):
        self.side, self.init, self.log_path = side, init, log_path
        self.proc = None
        self.info: dict = {}

    def start(self) -> dict:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        env = {**os.environ, "LOSSBENCH_AB_FDS": f"{to_r},{from_w}", **WORKER_ENV,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(self.side.path), os.environ.get("PYTHONPATH")]))}
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.side.python, str(WORKER)], cwd=self.side.path, env=env,
                                     pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        os.close(to_r)
        os.close(from_w)
        self._out = os.fdopen(to_w, "w")
        self._in = from_r
        self._buf = b""
        self.info = self.request({"op": "init", **self.init}, STARTUP_TIMEOUT_S)
        return self.info

    def request(self, payload: dict, timeout_s: float) -> dict:
        try:
            self._out.write(json.dumps(payload) + "\n")
            self._out.flush()
        except (BrokenPipeError, OSError):
            raise WorkerFailed("crash", self._death()) from None
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise WorkerFailed("timeout", f"no answer within {timeout_s:g} s")
            ready, _, _ = select.select([self._in], [], [], min(remaining, 1.0))
            if ready:
                chunk = os.read(self._in, 1 << 16)
                if not chunk:
                    raise WorkerFailed("crash", self._death())
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line)
        if "error" in reply:
            if reply.get("usage"):
                raise UsageError(f"{self.side.name} {self.side.ref!r}: {reply['error']}")
            raise RuntimeError(reply["error"] + ("\n" + reply["traceback"] if reply.get("traceback") else ""))
        return reply["ok"]

    def _death(self) -> str:
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        tail = ""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
            tail = f"; its last output: {lines[-1][:200]}" if lines else ""
        except OSError:
            pass
        from ..runners.isolation import describe_exit
        return describe_exit(code) + tail

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for f in (self._out,):
                try:
                    f.close()
                except OSError:
                    pass
            os.close(self._in)
            self.log.close()
        self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self._out.write(json.dumps({"op": "quit"}) + "\n")
                self._out.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


@dataclass
class Outcome:
    run_id: str
    path: Path
    state: str       # complete | interrupted
    measured: int    # unit passes measured by this invocation
    elapsed_s: float


def _unit_id(u: dict) -> str:
    return json.dumps([u["case"], u["impl"], u["modes"]], sort_keys=True)


def _case_of(u: dict):
    """The Case of a unit as a worker sent it (JSON: its option pairs as lists)."""
    from ..cases import Case

    c = dict(u["case"])
    c["options_items"] = tuple(tuple(x) for x in c["options_items"])
    return Case(**c)


def _row_keys(u: dict) -> list[tuple]:
    """The records.KEY of each of the unit's rows, as stored."""
    case = _case_of(u)
    return [records.key(case, u["impl"], m) for m in u["modes"]]


def open_run(spec: dict, base: str, head: str, out: str | Path, *, base_python: str | None,
             head_python: str | None, resume: str | None, passes: int = 0) -> tuple[store.RunWriter, dict[str, Side], dict]:
    """The run's writer and its two sides (made and checked before any worker starts), and the rows a
    resumed run already has, by (side, key) (a row written again replaces its earlier version)."""
    folder = Path(out) / "ab"
    if resume:
        meta = store.read_meta(folder, resume)
        if meta.get("kind") != "ab":
            raise UsageError(f"run {resume} is not an ab run")
        spec, sides_meta = meta["spec"], meta["sides"]
    else:
        sides_meta = {"base": {"ref": base, "python": base_python}, "head": {"ref": head, "python": head_python}}
    sides: dict[str, Side] = {}
    try:
        for name in SIDES:
            m = sides_meta[name]
            # A resumed run measures the commits it started with, wherever the refs have moved since.
            ref = m["ref"] if not resume or Path(m["ref"]).is_dir() else m["sha"]
            sides[name] = open_side(name, ref, m["python"], spec["plugins"], sha=m.get("sha"))
            sides[name].ref = m["ref"]
        if sides["base"].path == sides["head"].path:
            raise UsageError(f"base and head are the same checkout ({sides['base'].path}): give two refs or "
                             "two directories")
        if resume:
            writer = store.RunWriter(folder, resume)
            stored = {(r.get("side"), records.key_of(r)): r for r in store._read_run_file(writer.path)}
        else:
            meta = {"kind": "ab", "spec": spec, "passes": passes or PASSES, "sides": {
                n: {"ref": s.ref, "sha": s.sha, "python": sides_meta[n]["python"], "plugins": s.plugins}
                for n, s in sides.items()}}
            writer = store.RunWriter(folder, records.new_run_id(), meta)
            stored = {}
    except BaseException:
        for s in sides.values():
            s.close()
        raise
    return writer, sides, stored


def _passes_of(row: dict | None, passes: int) -> int:
    """How many passes a stored row has: those of its paired samples; all, for a row with nothing to pair
    (unsupported, failed, or ok on one side only); none when it is not there."""
    if row is None:
        return 0
    pp = row.get("pair_pass")
    return max(pp) + 1 if isinstance(pp, list) and pp else passes


def run(spec: dict | None, base: str | None, head: str | None, out: str | Path, *, base_python: str | None = None,
        head_python: str | None = None, resume: str | None = None, timeout_s: float = 600.0,
        budget_s: float | None = None, min_blocks: int = 3, passes: int | None = None, seed: int | None = None,
        err: Console | None = None) -> Outcome:
    """Measures the two sides into <out>/ab/<run_id>.jsonl (or finishes run `resume`): `passes` times, each
    with a fresh pair of worker processes, every unit in each (units in a new random order every pass)."""
    err = err or Console(stderr=True)
    if spec is not None:
        _check_plan(spec)
    writer, sides, stored = open_run(spec, base, head, out, base_python=base_python, head_python=head_python,
                                     resume=resume, passes=passes or PASSES)
    run_id = writer.meta["run_id"]
    spec = writer.meta["spec"]
    passes = int(writer.meta.get("passes", PASSES))
    rng = np.random.default_rng(seed)
    workers: dict[str, Worker] = {}
    state, measured, start = "failed", 0, time.perf_counter()
    try:
        for name, side in sides.items():
            side_spec = {**spec, "plugins": side.plugins}
            workers[name] = Worker(side, {"spec": side_spec, "run_id": run_id, "side": name, "git_sha": side.sha},
                                   writer.dir / f"{run_id}.{name}.log")
        units = _start_workers(workers, sides)
        order = list(units["base"]) + [k for k in units["head"] if k not in units["base"]]

        def unit_passes(k: str) -> int:
            return min(_passes_of(stored.get((n, key)), passes) for n in SIDES if k in units[n]
                       for key in _row_keys(units[n][k]))

        remaining = sum(passes - min(unit_passes(k), passes) for k in order)
        budget = budget_s if budget_s is not None else _suite_budget(spec)
        err.print(f"lossbench ab {run_id}: base {sides['base'].ref} ({sides['base'].sha[:10]}) vs head "
                  f"{sides['head'].ref} ({sides['head'].sha[:10]}), {len(order)} units x {passes} passes"
                  + (f" ({len(order) * passes - remaining} already done)" if resume else "") + f" -> {writer.path}")
        with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err) as progress:
            task = progress.add_task("starting", total=remaining)
            for p in range(passes):
                todo = [k for k in order if unit_passes(k) == p]
                if not todo:
                    continue
                if p and measured:  # a fresh pair of processes for every pass (the first one is started)
                    for w in workers.values():
                        w.close()
                    _start_workers(workers, sides)
                for k in (todo if p == 0 else [todo[i] for i in rng.permutation(len(todo))]):
                    u = units["base"].get(k) or units["head"][k]
                    progress.update(task, description=f"pass {p + 1}: {u['case']['family']} {u['impl']} "
                                                      f"{u['case']['n']}x{u['case']['c']}"[:40])
                    old = {n: [stored.get((n, key)) for key in _row_keys(units[n][k])] for n in SIDES if k in units[n]}
                    rows = _measure_unit(k, units, workers, rng, timeout_s, budget, min_blocks, p, old)
                    for row in rows:
                        writer.write(row)
                        stored[(row["side"], records.key_of(row))] = row
                    measured += 1
                    progress.update(task, advance=1)
        state = "complete"
    except KeyboardInterrupt:
        state = "interrupted"
        err.print(f"interrupted: {writer.meta['rows']} rows kept in {writer.path}; finish with: "
                  f"lossbench ab --resume {run_id} --results {out}")
    finally:
        for w in workers.values():
            w.close()
        for s in sides.values():
            s.close()
        writer.close(state)
    return Outcome(run_id, writer.path, state, measured, time.perf_counter() - start)


def _check_plan(spec: dict) -> None:
    """Bad selection flags (an unknown family, a malformed shape, no such device) refused before any
    checkout or run file is made. Implementation names are the sides' to check when plugins add some."""
    from ..run import plan_of

    plan_of({**spec, "plugins": [], "impl": None if spec["plugins"] else spec["impl"]})


def _start_workers(workers: dict[str, Worker], sides: dict[str, Side]) -> dict[str, dict]:
    """Both sides' workers started; per side, its units by id."""
    infos = {}
    for name, w in workers.items():
        try:
            infos[name] = w.start()
        except WorkerFailed as exc:
            raise UsageError(f"the {name} worker ({sides[name].ref!r}) did not start: {exc}") from None
    _check_lossbench(sides, infos)
    return {name: {_unit_id(u): u for u in infos[name]["units"]} for name in SIDES}


def _check_lossbench(sides: dict[str, Side], infos: dict[str, dict]) -> None:
    """A side whose checkout holds lossbench itself must have run that lossbench, not an installed one."""
    for name, side in sides.items():
        own = side.path / "lossbench" / "__init__.py"
        used = Path(infos[name]["lossbench"]).resolve()
        if own.is_file() and used != own.resolve():
            raise UsageError(f"{name} {side.ref!r} holds lossbench, but its python imported {used}")


def _suite_budget(spec: dict) -> float:
    """Seconds of sampling per row and side: --budget, else the suite's (read without loading plugins,
    which belong to the sides)."""
    from ..suites import DEFAULT_BUDGET_S, load_suite

    if spec.get("budget") is not None:
        return float(spec["budget"])
    return float(load_suite(spec["suite"])[1].get("budget_s", DEFAULT_BUDGET_S)) if spec.get("suite") else DEFAULT_BUDGET_S


ROUNDS_PER_BLOCK = 4  # ABBA rounds per mode in a block (after one warm-up round)
# Passes: every unit measured again in a fresh pair of worker processes. A process carries its own
# offset (in an A/A run of ce 256x1000 bfloat16 fwd one side was 5.1% slower over 15 blocks of fresh
# inputs, CI 2.3-8.1%): the passes are the replicates that show it (report/ab.py).
PASSES = 3
MAX_BLOCKS = 50


def _measure_unit(k: str, units: dict, workers: dict[str, Worker], rng: np.random.Generator, timeout_s: float,
                  budget_s: float, min_blocks: int, pass_no: int, old: dict[str, list]) -> list[dict]:
    """Both sides' rows of one unit after pass `pass_no`. The first pass prepares the unit on each side
    (in random order: accuracy, memory, status); a later one has the stored rows and only rebuilds the
    calls in these fresh processes. Then the modes that ran on both sides are sampled in blocks: each
    block starts with both sides' calls rebuilt on fresh copies of the inputs (new addresses), then
    ROUNDS_PER_BLOCK ABBA rounds per mode. Blocks go on until every mode's change is known within +-1%
    (95%) or the budget (2 x --budget per mode) ends; at least min_blocks. The samples join the row's
    earlier passes'."""
    present = [n for n in SIDES if k in units[n]]
    deadline = time.monotonic() + timeout_s
    first = pass_no == 0 or any(r is None for n in present for r in old[n])
    rows: dict[str, list[dict]] = {}
    for name in [present[i] for i in rng.permutation(len(present))]:
        u = units[name][k]
        try:
            _ensure_started(workers[name])
            if first:
                rows[name] = workers[name].request({"op": "prepare", "unit": u}, max(deadline - time.monotonic(), 1))["rows"]
            else:
                rows[name] = [dict(r) for r in old[name]]
                mutates = {r["mode"]: bool(r.get("mutates_inputs")) for r in rows[name] if r["status"] == "ok"}
                workers[name].request({"op": "calls", "unit": u, "mutates": mutates}, max(deadline - time.monotonic(), 1))
        except (WorkerFailed, RuntimeError) as exc:
            status = exc.status if isinstance(exc, WorkerFailed) else "crash"
            workers[name].kill()
            rows[name] = _failed_rows(u, workers[name], status, str(exc).splitlines()[0])
    if len(present) == 2:
        by_mode = {n: {r["mode"]: r for r in rows[n]} for n in SIDES}
        modes = [m for m in units["base"][k]["modes"] if m in by_mode["head"]
                 and by_mode["base"][m]["status"] == by_mode["head"][m]["status"] == "ok"]
        if not first:  # modes with nothing to pair were complete after the first pass
            modes = [m for m in modes if isinstance(by_mode["base"][m].get("pair_pass"), list)]
        try:
            offsets = {m: _next_ids(by_mode["base"][m]) for m in modes}
            paired = _blocks(modes, workers, rng, deadline, budget_s, min_blocks, offsets)
        except (WorkerFailed, RuntimeError) as exc:  # a worker died or hung, or a call raised on a later try
            status = exc.status if isinstance(exc, WorkerFailed) else "error"
            for name in SIDES:
                workers[name].kill()
            why = f"during the paired samples (pass {pass_no + 1}): {str(exc).splitlines()[0]}"
            for m in modes:
                for name in SIDES:
                    by_mode[name][m].update(status=status, error=why)
            paired = {}
        for m, p in paired.items():
            _add_times(by_mode["base"][m], p.a_ms, p.a_evict_ms, p.a_round, p.a_block, pass_no, p.converged)
            _add_times(by_mode["head"][m], p.b_ms, p.b_evict_ms, p.b_round, p.b_block, pass_no, p.converged)
    out = []
    for name in present:
        for r in rows[name]:
            r["side"] = name
            out.append(r)
    return out


def _next_ids(row: dict) -> tuple[int, int]:
    """The first round and block numbers free in a row (after its earlier passes)."""
    rounds, blocks = row.get("pair_round"), row.get("pair_block")
    if isinstance(rounds, list) and rounds:
        return max(rounds) + 1, max(blocks) + 1
    return 0, 0


def _blocks(modes: list[str], workers: dict[str, Worker], rng: np.random.Generator, deadline: float,
            budget_s: float, min_blocks: int, offsets: dict[str, tuple[int, int]]) -> dict[str, pairing.Paired]:
    paired = {m: pairing.Paired() for m in modes}
    if not modes:
        return paired
    start = time.perf_counter()
    for blk in range(MAX_BLOCKS):
        if blk:
            for name in [SIDES[i] for i in rng.permutation(2)]:
                workers[name].request({"op": "refresh"}, max(deadline - time.monotonic(), 1))
        for m in modes:
            r0, b0 = offsets[m]
            p = pairing.abba(_sampler(workers["base"], m, deadline), _sampler(workers["head"], m, deadline), rng=rng,
                             rounds=ROUNDS_PER_BLOCK, first_round=r0 + blk * ROUNDS_PER_BLOCK, block=b0 + blk)
            paired[m].extend(p)
        if blk + 1 < min_blocks:
            continue
        for p in paired.values():
            m_b = pairing.block_log_ratios(p.a_ms, p.a_round, p.a_block, p.b_ms, p.b_round, p.b_block)
            s = pairing.summarize_blocks(m_b, 0, 0.0)
            p.converged = (math.log(s.ci_high) - math.log(s.ci_low)) / 2 <= REL_CI
        if all(p.converged for p in paired.values()) or time.perf_counter() - start >= 2 * budget_s * len(modes):
            break
    return paired


def _ensure_started(w: Worker) -> None:
    if w.proc is None:
        w.start()


def _sampler(w: Worker, mode: str, deadline: float) -> pairing.Sampler:
    def sample() -> tuple[float, float]:
        reply = w.request({"op": "sample", "mode": mode},
                          max(min(SAMPLE_TIMEOUT_S, deadline - time.monotonic()), 1.0))
        return reply["ms"], reply["evict_ms"]
    return sample


def _add_times(row: dict, ms: list[float], evict: list[float], rounds: list[int], blocks: list[int], pass_no: int,
               converged: bool) -> None:
    """The pass's samples added to the row's (its first pass: replacing the side's own unpaired ones)."""
    def earlier(col):
        v = row.get(col)
        return list(v) if isinstance(row.get("pair_pass"), list) and isinstance(v, list) else []

    all_ms = earlier("raw_ms") + [round(x, 6) for x in ms]
    row.update(stats.summarize(all_ms))
    row.update(raw_ms=all_ms, evict_ms=earlier("evict_ms") + [round(x, 6) for x in evict],
               pair_round=earlier("pair_round") + list(rounds), pair_block=earlier("pair_block") + list(blocks),
               pair_pass=earlier("pair_pass") + [pass_no] * len(ms), converged=converged,
               speedup_vs_torch=None, speedup_ci_low=None, speedup_ci_high=None)


def _failed_rows(u: dict, w: Worker, status: str, why: str) -> list[dict]:
    case = _case_of(u)
    prov = (w.info.get("provenance") or {}).get(case.device) or {"device": case.device}
    return [records.row(prov, case, u["impl"], m, status=status, error=why) for m in u["modes"]]


def rows_by_side(path: str | Path):
    """An ab run file's rows as (base, head) DataFrames, a re-measured row replacing its first try."""
    df = store.load_results(path)
    if "side" not in df.columns or df.empty:
        raise UsageError(f"{path} is not an ab run (no side column)")
    out = []
    for name in SIDES:
        s = df[df["side"] == name].copy()
        s["_k"] = [json.dumps([None if isinstance(v, float) and v != v else v for v in t])
                   for t in s[KEY].itertuples(index=False)]
        out.append(s.drop_duplicates("_k", keep="last").drop(columns="_k").reset_index(drop=True))
    return tuple(out)


def main_python() -> str:
    return sys.executable
