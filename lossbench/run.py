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

from . import bandwidth, devices, records, registry, store, suites, sweep
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
    measured: int       # rows measured by this invocation
    elapsed_s: float

    def rows(self) -> pd.DataFrame:
        return store.load_results(self.path)


def execute(spec: dict, out: str | Path, *, resume: str | None = None, force: bool = False,
            timeout_s: float = 600.0, in_process: bool = False, err: Console | None = None) -> RunOutcome:
    """Measures the plan of `spec` into a new run file under `out`, or what run `resume` is missing.

    Everything is validated before a run file is created or reopened; rows are written one by one
    (a crash keeps what was measured). Ctrl-C ends the run as `interrupted`, its rows kept."""
    err = err or Console(stderr=True)
    plan, impls = plan_of(spec)
    torch.set_num_threads(spec["threads"])  # explicit and recorded: CPU timings mean nothing without it

    run_id = resume or records.new_run_id()
    if resume:
        meta = store.read_meta(out, resume)
        if not force:
            # Rows measured by other code, torch or hardware must not join the run's file unasked.
            for device in spec["devices"]:
                diff = records.provenance_difference(meta.get("provenance", {}).get(device, {}),
                                                     records.provenance(run_id, device, spec["threads"]))
                if diff:
                    raise UsageError(f"run {run_id} cannot be resumed here: {diff}; resuming would mix two "
                                     "versions in one file (--force resumes anyway, each new row with its own "
                                     "provenance)")
    provs = {d: records.provenance(run_id, d, spec["threads"], bandwidth.copy_gbps(d)) for d in spec["devices"]}
    if resume:
        done = store.done_keys(Path(out) / f"{run_id}.jsonl")
        writer = store.RunWriter(out, run_id)
        writer.meta.setdefault("resumes", []).append({"timestamp": records.now(), "forced": force,
                                                      "provenance": provs})
    else:
        done = set()
        writer = store.RunWriter(out, run_id, {"suite": plan.name, "spec": spec, "provenance": provs})
    todo = list(sweep.units(plan, lambda fam: impls[fam], done))
    total = sum(len(unit.modes) for unit in todo)
    err.print(f"lossbench run {run_id}: suite {plan.name}, {len(plan.items)} cases, {total} rows to measure"
              + (f" ({len(done)} already done)" if resume else "")
              + f", devices {', '.join(spec['devices'])}, {spec['threads']} CPU threads -> {writer.path}")
    if in_process:
        runner = sweep.UnitRunner(provs.__getitem__, plan.budget_s)
    else:
        init = {"plugins": spec["plugins"], "threads": spec["threads"], "budget_s": plan.budget_s, "provenance": provs}
        runner = IsolatedRunner(init, timeout_s, provs.__getitem__)
    start = time.perf_counter()
    state = "failed"  # a bug in the harness itself: its traceback is shown, the rows so far are kept
    try:
        with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=False) as progress:
            task = progress.add_task("starting", total=total)

            def emit(row: dict) -> None:
                writer.write(row)
                progress.update(task, advance=1, description=f"{row['family']} {row['impl']} {row['mode']}")

            for unit in todo:
                progress.update(task, description=f"{unit.case.family} {unit.impl} {unit.case.label()[:24]}")
                runner.run(unit, emit)
        state = "complete"
    except KeyboardInterrupt:
        state = "interrupted"
        err.print(f"interrupted: {writer.meta['rows']} rows kept in {writer.path}; "
                  f"finish with: lossbench run --resume {run_id} --out {out}")
    finally:
        if isinstance(runner, IsolatedRunner):
            runner.close()
        writer.close(state)
    return RunOutcome(run_id, writer.path, state, total, time.perf_counter() - start)


def status_counts(df: pd.DataFrame) -> Counter:
    return Counter(df["status"])
