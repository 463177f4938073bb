"""The run flow behind `lossbench run` (and `lossbench nightly`): a plan spec in, a run file out.

A spec is everything that defines a run's plan, resolved (absolute paths, concrete devices): it is
stored in the run's meta file, so --resume rebuilds exactly the same plan from it.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import bandwidth, devices, distributed, lanes, records, registry, store, suites, sweep
from .errors import UsageError
from .runners.isolation import IsolatedRunner

FAILED = ("error", "oom", "timeout", "crash")  # statuses of rows that did not run


def csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def make_spec(*, suite=None, family=None, impl=None, device=None, dtype=None, mode=None, input_dist=None,
              shape=None, plugins=(), threads=None, budget=None) -> dict:
    def absolute(path_or_name: str | None) -> str | None:
        if path_or_name and path_or_name.endswith((".py", ".toml")) and Path(path_or_name).is_file():
            return str(Path(path_or_name).resolve())
        return path_or_name

    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, not {threads}")
    if budget is not None and not budget > 0:
        raise UsageError(f"--budget must be positive seconds, not {budget}")
    return {
        "suite": absolute(suite), "family": family, "impl": impl, "dtype": dtype, "mode": mode,
        "input_dist": input_dist, "shape": shape,
        "devices": devices.resolve(device),
        "plugins": [absolute(p) for p in plugins],
        "threads": threads or torch.get_num_threads(),
        "budget": budget,
    }


def _select_impls(names: list[str] | None, families: set[str]):
    chosen = {f: registry.implementations(f) for f in families}
    if names:
        known = {i.name for impls in chosen.values() for i in impls}
        for name in names:
            if name not in known:
                raise UsageError(f"unknown implementation {name!r} for families {', '.join(sorted(families))} "
                                 f"(known: {', '.join(sorted(known))})")
        chosen = {f: [i for i in impls if i.name in names] for f, impls in chosen.items()}
    return chosen


def plan_of(spec: dict):
    """The plan and, per family, the implementations to run: raises UsageError for bad input."""
    for plugin in spec["plugins"]:
        registry.load_plugin(plugin)
    devs = devices.resolve(",".join(spec["devices"]))  # still there? (a resumed run may be elsewhere)
    name, suite = suites.load_suite(spec["suite"]) if spec["suite"] else ("default", None)
    plan = suites.build_plan(suite, devices=devs, name=name, families=csv(spec["family"]),
                             dtypes=csv(spec["dtype"]), modes=csv(spec["mode"]), shapes=csv(spec["shape"]),
                             input_dists=csv(spec["input_dist"]))
    if spec["budget"] is not None:
        plan.budget_s = spec["budget"]
    return plan, _select_impls(csv(spec["impl"]) or plan.impls, {case.family for case, _ in plan.items})


@dataclass
class RunOutcome:
    run_id: str
    path: Path
    state: str          # complete | interrupted
    measured: int       # rows measured by this invocation (all ranks' under torchrun)
    elapsed_s: float
    writer: bool = True  # this process wrote the run (False: a torchrun rank other than 0)

    def rows(self) -> pd.DataFrame:
        return store.load_results(self.path)


def execute(spec: dict, out: str | Path, *, resume: str | None = None, force: bool = False,
            timeout_s: float = 600.0, in_process: bool = False, err: Console | None = None) -> RunOutcome:
    """Measures the plan of `spec` into a new run file under `out`, or what run `resume` is missing.

    Everything is validated before a run file is created or reopened; rows are written one by one
    (a crash keeps what was measured). Ctrl-C ends the run as `interrupted`, its rows kept.
    Under torchrun the units are shared out among the ranks (lossbench.distributed): each measures its
    share in its own process, and rank 0 writes every rank's rows into the one run."""
    err = err or Console(stderr=True)
    plan, impls = plan_of(spec)
    torch.set_num_threads(spec["threads"])  # explicit and recorded: CPU timings mean nothing without it
    ranks = distributed.join(spec["devices"])
    try:
        return _execute(ranks, spec, plan, impls, out, resume, force, timeout_s, in_process, err)
    finally:
        ranks.close()


def _execute(ranks: distributed.Solo, spec: dict, plan, impls, out, resume, force, timeout_s, in_process,
             err: Console) -> RunOutcome:
    run_id, provs, writer, done = _start(ranks, spec, plan, out, resume, force)
    todo = list(sweep.units(plan, lambda fam: impls[fam], done))
    total = sum(len(unit.modes) for unit in todo)
    own, common = ranks.share(todo, lambda unit: registry.get(unit.case.family, unit.impl))
    if ranks.main:
        err.print(f"lossbench run {run_id}: suite {plan.name}, {len(plan.items)} cases, {total} rows to measure"
                  + (f" ({len(done)} already done)" if resume else "")
                  + f", devices {', '.join(spec['devices'])}, {spec['threads']} CPU threads"
                  + (f", {ranks.world_size} ranks" if ranks.distributed else "") + f" -> {writer.path}")
    init = {"plugins": spec["plugins"], "threads": spec["threads"], "budget_s": plan.budget_s, "provenance": provs}
    if in_process or ranks.distributed:  # under torchrun the process group lives in the rank itself
        runner = sweep.UnitRunner(provs.__getitem__, plan.budget_s)
        at_once = []
    else:
        runner = IsolatedRunner(init, timeout_s, provs.__getitem__)
        at_once, own = lanes.split(own)  # several CUDA devices: measured side by side, one worker each
    start = time.perf_counter()
    state = "failed"  # a bug in the harness itself: its traceback is shown, the rows so far are kept
    try:
        # Only rank 0 shows progress: every rank's rows, as they are written.
        with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=False, disable=not ranks.main) as progress:
            task = progress.add_task("starting", total=total)

            def write(row: dict) -> None:
                writer.write(row)
                progress.update(task, advance=1, description=f"{row['family']} {row['impl']} {row['mode']}")

            def measure_with(unit_runner, unit: sweep.Unit, emit: sweep.Emit) -> None:
                progress.update(task, description=f"{unit.case.family} {unit.impl} {unit.case.label()[:24]}")
                unit_runner.run(unit, emit)

            def measure(unit: sweep.Unit, emit: sweep.Emit) -> None:
                measure_with(runner, unit, emit)

            with ranks.rows(write) as emit:
                if at_once:
                    lanes.run_concurrently(at_once, lambda: IsolatedRunner(init, timeout_s, provs.__getitem__),
                                           measure_with, emit)
                for unit in own:
                    measure(unit, emit)
                ranks.run_together(common, measure, emit)  # collective units: on every rank alike
        state = "complete"
    except (KeyboardInterrupt, distributed.RankLost) as exc:
        state = "interrupted"
        if ranks.main:
            err.print((f"{exc}: " if isinstance(exc, distributed.RankLost) else "interrupted: ")
                      + f"{writer.meta['rows']} rows kept in {writer.path}; "
                      f"finish with: lossbench run --resume {run_id} --out {out}")
    finally:
        if isinstance(runner, IsolatedRunner):
            runner.close()
        if writer is not None:
            writer.close(state)
    return RunOutcome(run_id, Path(out) / f"{run_id}.jsonl", state, total, time.perf_counter() - start, ranks.main)


def _start(ranks: distributed.Solo, spec: dict, plan, out, resume: str | None, force: bool):
    """The run id, this rank's provenance per device it measures on, the run's writer (rank 0's alone; None
    elsewhere) and the keys the run already has; every check made before anything is written."""
    specs = ranks.gather(spec)
    ranks.on_main(lambda: _same_plan(specs))
    run_id = ranks.broadcast(resume or records.new_run_id())
    here = {d: ranks.device(d) for d in spec["devices"]}  # where this rank measures each of the run's devices
    mine = {d: records.provenance(run_id, here[d], spec["threads"]) for d in spec["devices"]}
    current = ranks.gather(mine)  # every rank's, on rank 0
    if resume and not force:
        ranks.on_main(lambda: _check_resumable(store.read_meta(out, resume), current, run_id))
    elif not resume:
        ranks.on_main(lambda: _check_alike(current))
    provs = {here[d]: {**mine[d], "copy_gbps": bandwidth.copy_gbps(here[d])} for d in spec["devices"]}
    entries = ranks.gather(distributed.rank_entry(ranks, spec["devices"]))
    opened = ranks.on_main(lambda: _open_run(spec, plan, out, run_id, resume, force,
                                             {d: provs[here[d]] for d in spec["devices"]}, entries))
    writer, done = opened or (None, None)
    return run_id, provs, writer, ranks.broadcast(done)


def _same_plan(specs: list[dict]) -> None:
    for rank, other in enumerate(specs):
        if other != specs[0]:
            diff = sorted(k for k in other.keys() | specs[0].keys() if other.get(k) != specs[0].get(k))
            raise UsageError(f"rank {rank} builds another plan than rank 0 ({', '.join(diff)} differ): every rank "
                             "must run the same command in the same folder")


def _check_alike(current: list[dict]) -> None:
    """One run's rows must come from the same code, libraries, hardware and threads, whichever rank measured them."""
    for rank, provs in enumerate(current[1:], 1):
        for device, prov in provs.items():
            diff = records.provenance_difference(current[0][device], prov)
            if diff:
                raise UsageError(f"rank {rank} ({prov['host']}) differs from rank 0 on {device}: {diff}")


def _check_resumable(meta: dict, current: list[dict], run_id: str) -> None:
    # Rows measured by other code, torch or hardware must not join the run's file unasked.
    for rank, provs in enumerate(current):
        for device, prov in provs.items():
            diff = records.provenance_difference(meta.get("provenance", {}).get(device, {}), prov)
            if diff:
                where = f" on rank {rank} ({prov['host']})" if len(current) > 1 else ""
                raise UsageError(f"run {run_id} cannot be resumed here{where}: {diff}; resuming would mix two "
                                 "versions in one file (--force resumes anyway, each new row with its own "
                                 "provenance)")


def _open_run(spec: dict, plan, out, run_id: str, resume: str | None, force: bool, provs: dict,
              ranks: list[dict]) -> tuple[store.RunWriter, set[tuple]]:
    """The run's writer (rank 0's alone), and the keys of the rows it already has."""
    sharded = {"world_size": len(ranks), "ranks": ranks} if len(ranks) > 1 else {}
    if not resume:
        return store.RunWriter(out, run_id, {"suite": plan.name, "spec": spec, "provenance": provs, **sharded}), set()
    meta = store.read_meta(out, run_id)
    done = distributed.planned_keys(store.done_keys(Path(out) / f"{run_id}.jsonl"), meta)
    writer = store.RunWriter(out, run_id)
    writer.meta.setdefault("resumes", []).append({"timestamp": records.now(), "forced": force,
                                                  "provenance": provs, **sharded})
    return writer, done


def status_counts(df: pd.DataFrame) -> Counter:
    return Counter(df["status"])
