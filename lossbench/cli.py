"""`lossbench run | list | report`. Bad input ends in one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import devices, records, registry, store, suites
from .errors import UsageError
from .report.table import family_tables
from .sweep import Sweep

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


def cmd_run(args: argparse.Namespace) -> int:
    for plugin in args.plugin:
        registry.load_plugin(plugin)
    devs = devices.resolve(args.device)
    name, suite = suites.load_suite(args.suite) if args.suite else ("default", None)
    plan = suites.build_plan(suite, devices=devs, name=name, families=_csv(args.family),
                             dtypes=_csv(args.dtype), modes=_csv(args.mode), shapes=_csv(args.shape),
                             input_dists=_csv(args.input_dist))
    if args.budget is not None:
        if args.budget <= 0:
            raise UsageError(f"--budget must be positive seconds, not {args.budget}")
        plan.budget_s = args.budget
    impls = _select_impls(_csv(args.impl), {case.family for case, _ in plan.items})
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, not {args.threads}")
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()  # explicit and recorded: CPU timings mean nothing without it

    # Everything is validated: only now does a run file exist.
    run_id = records.new_run_id()
    provs = {d: {**records.provenance(run_id, d, threads)} for d in devs}
    writer = store.RunWriter(args.out, run_id, {"suite": plan.name, "argv": sys.argv[1:],
                                                "provenance": provs, "cases": len(plan.items)})
    total = sum(len(modes) * len(impls[case.family]) for case, modes in plan.items)
    err = _console(stderr=True)
    err.print(f"lossbench run {run_id}: suite {plan.name}, {len(plan.items)} cases, {total} rows, "
              f"devices {', '.join(devs)}, {threads} CPU threads -> {writer.path}")
    start = time.perf_counter()
    state = "failed"  # a bug in the harness itself: its traceback is shown, the rows so far are kept
    try:
        with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=False) as progress:
            task = progress.add_task("starting", total=total)
            Sweep(plan, lambda fam: impls[fam], lambda d: provs[d], writer.write,
                  lambda what: progress.update(task, advance=1, description=what)).run()
        state = "complete"
    except KeyboardInterrupt:
        state = "interrupted"
        err.print(f"interrupted: {writer.meta['rows']} rows kept in {writer.path}")
        return EXIT_INTERRUPTED
    finally:
        writer.close(state)
    elapsed = time.perf_counter() - start

    df = store.load_results(writer.path)
    out = _console()
    for table in family_tables(df):
        out.print(table)
    counts = Counter(df["status"])
    out.print(f"{len(df)} rows in {elapsed:.1f} s ({', '.join(f'{n} {s}' for s, n in counts.items())}); "
              f"results: {writer.path}")
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
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="print the registry with capabilities")
    lst.add_argument("--plugin", action="append", default=[])
    lst.set_defaults(func=cmd_list)

    rep = sub.add_parser("report", help="print the comparison tables of a results file or folder")
    rep.add_argument("path")
    rep.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as exc:
        print(f"lossbench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
