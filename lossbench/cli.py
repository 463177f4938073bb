"""`lossbench run | list | report`. Bad input ends in one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import bandwidth, devices, quiet_exit, records, registry, store, suites, sweep
from .errors import UsageError
from .report.kernels import kernel_table
from .report.table import family_tables
from .runners.isolation import IsolatedRunner

EXIT_USAGE, EXIT_FAILED_ROWS, EXIT_INTERRUPTED = 2, 1, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise UsageError(message)


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Tables are wide: outside a terminal (CI logs, files) rich would squeeze them to 80 columns.
    return Console(file=stream, width=None if stream.isatty() else 220)


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


_PLAN_FLAGS = ("suite", "family", "impl", "device", "dtype", "mode", "input_dist", "shape", "threads", "budget")


def _spec_from_args(args: argparse.Namespace) -> dict:
    """Everything that defines a run's plan, resolved (absolute paths, concrete devices), so that
    --resume rebuilds exactly the same plan from the run's meta file."""
    def absolute(path_or_name: str | None) -> str | None:
        if path_or_name and path_or_name.endswith((".py", ".toml")) and Path(path_or_name).is_file():
            return str(Path(path_or_name).resolve())
        return path_or_name

    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, not {args.threads}")
    if args.budget is not None and not args.budget > 0:
        raise UsageError(f"--budget must be positive seconds, not {args.budget}")
    return {
        "suite": absolute(args.suite),
        **{flag: getattr(args, flag) for flag in ("family", "impl", "dtype", "mode", "input_dist", "shape")},
        "devices": devices.resolve(args.device),
        "plugins": [absolute(p) for p in args.plugin],
        "threads": args.threads or torch.get_num_threads(),
        "budget": args.budget,
    }


def _plan(spec: dict):
    for plugin in spec["plugins"]:
        registry.load_plugin(plugin)
    devs = devices.resolve(",".join(spec["devices"]))  # still there? (a resumed run may be elsewhere)
    name, suite = suites.load_suite(spec["suite"]) if spec["suite"] else ("default", None)
    plan = suites.build_plan(suite, devices=devs, name=name, families=_csv(spec["family"]),
                             dtypes=_csv(spec["dtype"]), modes=_csv(spec["mode"]), shapes=_csv(spec["shape"]),
                             input_dists=_csv(spec["input_dist"]))
    if spec["budget"] is not None:
        plan.budget_s = spec["budget"]
    return plan, _select_impls(_csv(spec["impl"]) or plan.impls, {case.family for case, _ in plan.items})


def _check_same_plan(args: argparse.Namespace, spec: dict) -> None:
    """A resume may repeat the run's plan flags (a script re-running its command), never change them."""
    given = {f: getattr(args, f) for f in _PLAN_FLAGS if getattr(args, f) is not None}
    if args.plugin:
        given["plugin"] = args.plugin
    if not given:
        return
    # Resolve the given flags as the original run did (absolute paths, concrete devices).
    full = vars(args) | {f: None for f in _PLAN_FLAGS if f not in given} | {"plugin": args.plugin}
    resolved = _spec_from_args(argparse.Namespace(**full))
    spec_key = {"device": "devices", "plugin": "plugins"}
    for flag in given:
        key = spec_key.get(flag, flag)
        if resolved[key] != spec.get(key):
            raise UsageError(f"--resume reruns the run's own plan: --{flag.replace('_', '-')} "
                             f"{_show(resolved[key])} cannot change it (the run has {_show(spec.get(key))})")


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def cmd_run(args: argparse.Namespace) -> int:
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise UsageError(f"--timeout must be a positive number of seconds, not {args.timeout}")
    if args.force and not args.resume:
        raise UsageError("--force goes with --resume")
    if args.resume:
        meta = store.read_meta(args.out, args.resume)
        spec = meta["spec"]
        _check_same_plan(args, spec)
    else:
        spec = _spec_from_args(args)
    plan, impls = _plan(spec)
    torch.set_num_threads(spec["threads"])  # explicit and recorded: CPU timings mean nothing without it

    run_id = args.resume or records.new_run_id()
    if args.resume and not args.force:
        # Rows measured by other code, torch or hardware must not join the run's file unasked.
        for device in spec["devices"]:
            diff = records.provenance_difference(meta.get("provenance", {}).get(device, {}),
                                                 records.provenance(run_id, device, spec["threads"]))
            if diff:
                raise UsageError(f"run {run_id} cannot be resumed here: {diff}; resuming would mix two "
                                 "versions in one file (--force resumes anyway, each new row with its own provenance)")
    # Everything is validated: only now is a run file created or reopened.
    provs = {d: records.provenance(run_id, d, spec["threads"], bandwidth.copy_gbps(d)) for d in spec["devices"]}
    if args.resume:
        done = store.done_keys(Path(args.out) / f"{run_id}.jsonl")
        writer = store.RunWriter(args.out, run_id)
        writer.meta.setdefault("resumes", []).append({"timestamp": records.now(), "forced": args.force,
                                                      "provenance": provs})
    else:
        done = set()
        writer = store.RunWriter(args.out, run_id, {"suite": plan.name, "spec": spec, "provenance": provs})
    todo = list(sweep.units(plan, lambda fam: impls[fam], done))
    total = sum(len(unit.modes) for unit in todo)
    err = _console(stderr=True)
    err.print(f"lossbench run {run_id}: suite {plan.name}, {len(plan.items)} cases, {total} rows to measure"
              + (f" ({len(done)} already done)" if args.resume else "")
              + f", devices {', '.join(spec['devices'])}, {spec['threads']} CPU threads -> {writer.path}")
    if args.in_process:
        runner = sweep.UnitRunner(provs.__getitem__, plan.budget_s)
    else:
        init = {"plugins": spec["plugins"], "threads": spec["threads"], "budget_s": plan.budget_s, "provenance": provs}
        runner = IsolatedRunner(init, args.timeout, provs.__getitem__)
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
                  f"finish with: lossbench run --resume {run_id} --out {args.out}")
        return EXIT_INTERRUPTED
    finally:
        if isinstance(runner, IsolatedRunner):
            runner.close()
        writer.close(state)
    elapsed = time.perf_counter() - start

    df = store.load_results(writer.path)
    out = _console()
    for table in family_tables(df):
        out.print(table)
    counts = Counter(df["status"])
    out.print(f"{len(df)} rows ({total} measured in {elapsed:.1f} s; "
              f"{', '.join(f'{n} {s}' for s, n in counts.items())}); results: {writer.path}")
    return EXIT_FAILED_ROWS if set(counts) - {"ok", "unsupported"} else 0


def cmd_list(args: argparse.Namespace) -> int:
    for plugin in args.plugin:
        registry.load_plugin(plugin)
    table = Table(title="lossbench implementations", title_justify="left")
    for col in ("family", "impl", "devices", "dtypes", "unsupported", "mutates", "grad in fwd", "what"):
        table.add_column(col)
    for impl in registry.implementations():
        table.add_row(impl.family, impl.name, ",".join(impl.devices or ("any",)), ",".join(impl.dtypes or ("any",)),
                      ",".join(impl.unsupported) or "-", "yes" if impl.mutates_inputs else "-",
                      "yes" if impl.grad_in_forward else "-", impl.description)
    _console().print(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    df = store.load_results(args.path)
    if df.empty:
        raise UsageError(f"no result rows in {args.path!r}")
    for table in family_tables(df):
        _console().print(table)
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    try:
        from .kernels.triton import aot
    except ImportError as exc:
        raise UsageError(f"the Triton kernels need triton: {exc}") from None
    archs, kernels = _csv(args.arch) or list(aot.ARCHS), _csv(args.kernel)
    try:
        total = aot.validate(archs, kernels)
    except ValueError as exc:  # an unknown kernel or arch
        raise UsageError(str(exc)) from None
    with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_console(stderr=True)) as progress:
        task = progress.add_task("compiling", total=total)

        def advance(row, done, total):
            progress.update(task, completed=done, description=f"{row.kernel} {row.arch} {row.variant}"[:40])

        try:
            rows = aot.resource_table(archs, kernels, progress=advance)
        except RuntimeError as exc:  # a variant that does not compile, or no cuobjdump: a defect, not bad input
            print(f"lossbench: error: {str(exc).splitlines()[0]}", file=sys.stderr)
            return EXIT_FAILED_ROWS
    df = aot.format_rows(rows)
    _console().print(kernel_table(df))
    spills = df[df["spill_bytes"] > 0]
    _console().print(f"{len(df)} variants compiled; {len(spills)} spill"
                     + (f": {', '.join(spills['kernel'] + ' ' + spills['variant'] + ' ' + spills['arch'])}"
                        if len(spills) else ""))
    if args.json:
        Path(args.json).write_text(df.to_json(orient="records", indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lossbench", description="Time, memory and gradient accuracy of PyTorch loss implementations.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="measure a suite and write results")
    run.add_argument("--suite", help=f"built-in suite ({', '.join(suites.suite_names())}) or a .toml file; "
                                     "without it, each family's torch-default case")
    run.add_argument("--family", help="comma-separated: nll,ce,kl")
    run.add_argument("--impl", help="comma-separated implementation names (see `lossbench list`)")
    run.add_argument("--device", help="cpu | cuda | cuda:N | all (default: the best available)")
    run.add_argument("--dtype", help="comma-separated: float32,bfloat16,float16,float64")
    run.add_argument("--mode", help="comma-separated: fwd,fwd_bwd,bwd")
    run.add_argument("--input-dist", help="comma-separated: normal,peaked (default without a suite: normal)")
    run.add_argument("--shape", help="NxC[,NxC...]: replaces the suite's shapes")
    run.add_argument("--out", default="results", help="results folder (default: results/)")
    run.add_argument("--plugin", action="append", default=[], help="module or .py file registering implementations (repeatable)")
    run.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per physical core)")
    run.add_argument("--budget", type=float, help="seconds of sampling per timed row (default: the suite's)")
    run.add_argument("--timeout", type=float, default=600.0,
                     help="seconds one implementation may take on one case, all modes (default 600)")
    run.add_argument("--resume", metavar="RUN_ID", help="measure only what run RUN_ID in --out is missing")
    run.add_argument("--force", action="store_true",
                     help="with --resume: resume even though the code, library versions, device or threads changed")
    run.add_argument("--in-process", action="store_true",
                     help="no worker process (for debugging): no timeout, and a crash ends the run")
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="print the registry with capabilities")
    lst.add_argument("--plugin", action="append", default=[])
    lst.set_defaults(func=cmd_list)

    rep = sub.add_parser("report", help="print the comparison tables of a results file or folder")
    rep.add_argument("path")
    rep.set_defaults(func=cmd_report)

    ker = sub.add_parser("kernels", help="compile every Triton kernel variant for real GPUs (no GPU needed) and "
                                         "print registers, spills and shared memory")
    ker.add_argument("--arch", help="comma-separated: sm_80,sm_90 (default both)")
    ker.add_argument("--kernel", help="comma-separated: ce,kl (default all)")
    ker.add_argument("--json", help="also write the table to this JSON file")
    ker.set_defaults(func=cmd_kernels)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"lossbench: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    quiet_exit.install()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning  # a skipped corrupt line is news, not a traceback
            args = build_parser().parse_args(argv)
            return args.func(args)
    except UsageError as exc:
        print(f"lossbench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
