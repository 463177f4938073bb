"""`lossbench run | list | report | compare | ab | nightly | history | kernels`: arguments in, one function per command.

Bad input ends in one line on stderr and exit status 2 (exit_codes.USAGE)."""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import nightly, quiet_exit, registry, run, store, suites
from .errors import UsageError
from .exit_codes import FAILED, INTERRUPTED, NIGHTLY_FAILED_ROWS, NO_BASELINE, OK, REGRESSION, USAGE
from .families import FAMILIES
from .ab import command as ab_command
from .runners.pairing import MIN_BLOCKS
from .report import ab as ab_report
from .report import compare, compare_render, history_render, run_report, runs
from .report.kernels import kernel_table
from .report.table import family_tables


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise UsageError(message)


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Tables are wide: outside a terminal (CI logs, files) rich would squeeze them to 80 columns.
    return Console(file=stream, width=None if stream.isatty() else 220)


_PLAN_FLAGS = ("suite", "family", "impl", "device", "dtype", "mode", "input_dist", "shape", "threads", "budget")


def _spec_from_args(args: argparse.Namespace) -> dict:
    return run.make_spec(**{flag: getattr(args, flag) for flag in _PLAN_FLAGS}, plugins=args.plugin)


def _spec_with_relative_plugins(args: argparse.Namespace) -> dict:
    """The plan spec for a command that measures two checkouts (ab, nightly --ab): a relative plugin path
    stays relative, so that each side takes its own checkout's file."""
    return _spec_from_args(argparse.Namespace(**{**vars(args), "plugin": []})) | {"plugins": args.plugin}


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


def _check_timeout(args: argparse.Namespace) -> None:
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise UsageError(f"--timeout must be a positive number of seconds, not {args.timeout}")


def cmd_run(args: argparse.Namespace) -> int:
    _check_timeout(args)
    if args.force and not args.resume:
        raise UsageError("--force goes with --resume")
    if args.resume:
        spec = store.read_meta(args.out, args.resume)["spec"]
        _check_same_plan(args, spec)
    else:
        spec = _spec_from_args(args)
    outcome = run.execute(spec, args.out, resume=args.resume, force=args.force, timeout_s=args.timeout,
                          in_process=args.in_process, err=_console(stderr=True))
    if not outcome.writer:  # a torchrun rank other than 0: rank 0 wrote the run and reports it
        return INTERRUPTED if outcome.state == "interrupted" else OK
    if outcome.state == "interrupted":
        return INTERRUPTED
    df = outcome.rows()
    out = _console()
    for table in family_tables(df):
        out.print(table)
    counts = run.status_counts(df)
    out.print(f"{len(df)} rows ({outcome.measured} measured in {outcome.elapsed_s:.1f} s; "
              f"{', '.join(f'{n} {s}' for s, n in counts.items())}); results: {outcome.path}")
    return FAILED if set(counts) & set(run.FAILED) else OK


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
    return OK


def cmd_report(args: argparse.Namespace) -> int:
    run_report.report(args.runs, args.results, args.out, _console(), threshold_pct=args.threshold, force=args.force)
    return OK


def cmd_kernels(args: argparse.Namespace) -> int:
    try:
        from .kernels.triton import aot
    except ImportError as exc:
        raise UsageError(f"the Triton kernels need triton: {exc}") from None
    archs, kernels = run.csv(args.arch) or list(aot.ARCHS), run.csv(args.kernel)
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
            return FAILED
    df = aot.format_rows(rows)
    _console().print(kernel_table(df))
    spills = df[df["spill_bytes"] > 0]
    _console().print(f"{len(df)} variants compiled; {len(spills)} spill"
                     + (f": {', '.join(spills['kernel'] + ' ' + spills['variant'] + ' ' + spills['arch'])}"
                        if len(spills) else ""))
    if args.json:
        Path(args.json).write_text(df.to_json(orient="records", indent=1))
    return OK


def cmd_compare(args: argparse.Namespace) -> int:
    threshold = compare.threshold_from_pct(args.threshold, compare.DEFAULT_THRESHOLD_PCT)
    base, head = runs.load_run(args.base, args.results), runs.load_run(args.head, args.results)
    cmp = compare.compare(base, head, threshold, force=args.force,
                          history=runs.history_for(base, head, args.results))
    compare_render.write(cmp, _console(), args.markdown, args.json)
    return cmp.exit_code()


def cmd_ab(args: argparse.Namespace) -> int:
    _check_timeout(args)
    threshold = compare.threshold_from_pct(args.threshold, ab_report.DEFAULT_THRESHOLD_PCT)
    if args.resume:
        if args.base or args.head:
            raise UsageError("--resume continues the run's own BASE and HEAD: give neither")
        spec = None
    elif not (args.base and args.head):
        raise UsageError("ab needs BASE and HEAD (git refs or checkout directories), or --resume RUN_ID")
    else:
        spec = _spec_with_relative_plugins(args)
    if args.passes is not None and args.passes < 1:
        raise UsageError(f"--passes must be at least 1, not {args.passes}")
    if args.min_blocks < MIN_BLOCKS:
        raise UsageError(f"--min-blocks must be at least {MIN_BLOCKS}, not {args.min_blocks}")
    return ab_command.ab(spec, args.base, args.head, args.results, threshold=threshold,
                         base_python=args.base_python, head_python=args.head_python, resume=args.resume,
                         timeout_s=args.timeout, budget_s=args.budget, min_blocks=args.min_blocks,
                         passes=args.passes, seed=args.seed, markdown_path=args.markdown, json_path=args.json,
                         console=_console(), err=_console(stderr=True))


def cmd_history(args: argparse.Namespace) -> int:
    return history_render.history(args.results, run.csv(args.family), run.csv(args.impl), args.out, _console())


def _add_selection(p: argparse.ArgumentParser, suite_default: str | None = None) -> None:
    """The plan flags `run` and `nightly` share."""
    p.add_argument("--suite", default=suite_default,
                   help=f"built-in suite ({', '.join(suites.suite_names())}) or a .toml file"
                        + (f" (default: {suite_default})" if suite_default else
                           "; without it, each family's torch-default case"))
    p.add_argument("--family", help=f"comma-separated: {','.join(FAMILIES)}")
    p.add_argument("--impl", help="comma-separated implementation names (see `lossbench list`)")
    p.add_argument("--device", help="cpu | cuda | cuda:N | all (default: the best available)")
    p.add_argument("--dtype", help="comma-separated: float32,bfloat16,float16,float64")
    p.add_argument("--mode", help="comma-separated: fwd,fwd_bwd,bwd")
    p.add_argument("--input-dist", help="comma-separated: normal,peaked (default without a suite: normal)")
    p.add_argument("--shape", help="NxC[,NxC...]: replaces the suite's shapes")
    p.add_argument("--plugin", action="append", default=[], help="module or .py file registering implementations (repeatable)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per physical core)")
    p.add_argument("--budget", type=float, help="seconds of sampling per timed row (default: the suite's)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds one implementation may take on one case, all modes (default 600)")


def cmd_nightly(args: argparse.Namespace) -> int:
    _check_timeout(args)
    threshold = compare.threshold_from_pct(
        args.threshold, ab_report.DEFAULT_THRESHOLD_PCT if args.ab else compare.DEFAULT_THRESHOLD_PCT)
    spec, flow = (_spec_with_relative_plugins(args), nightly.nightly_ab) if args.ab else \
        (_spec_from_args(args), nightly.nightly)
    return flow(spec, args.results, threshold=threshold, timeout_s=args.timeout, markdown_path=args.markdown,
                json_path=args.json, console=_console(), err=_console(stderr=True))


def _add_comparison_flags(p: argparse.ArgumentParser, results_help: str, threshold_help: str) -> None:
    """The flags `compare`, `ab` and `nightly` share."""
    p.add_argument("--results", default="results", help=results_help)
    p.add_argument("--threshold", type=float, default=None, metavar="PCT",
                   help=f"smallest change that counts, in percent ({threshold_help})")
    p.add_argument("--markdown", metavar="FILE",
                   help="also write the comparison as Markdown (a pull-request comment, a job summary)")
    p.add_argument("--json", metavar="FILE", help="also write the comparison as JSON")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lossbench", description="Time, memory and gradient accuracy of PyTorch loss implementations.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run_p = sub.add_parser("run", help="measure a suite and write results")
    _add_selection(run_p)
    run_p.add_argument("--out", default="results", help="results folder (default: results/)")
    run_p.add_argument("--resume", metavar="RUN_ID", help="measure only what run RUN_ID in --out is missing")
    run_p.add_argument("--force", action="store_true",
                     help="with --resume: resume even though the code, library versions, device or threads changed")
    run_p.add_argument("--in-process", action="store_true",
                     help="no worker process (for debugging): no timeout, and a crash ends the run (always so "
                          "under torchrun, which shares the units out among its ranks)")
    run_p.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="print the registry with capabilities")
    lst.add_argument("--plugin", action="append", default=[])
    lst.set_defaults(func=cmd_list)

    rep = sub.add_parser("report", help="write an HTML + Markdown report with plots: one run, or two compared")
    rep.add_argument("runs", nargs="*", metavar="RUN",
                     help="run id under --results, run file, or folder (its latest run); none: the latest run "
                          "in --results; two: a comparison (base, head)")
    rep.add_argument("--results", default="results", help="results folder (default: results/)")
    rep.add_argument("--out", help="report folder (default: reports/<run_id> or reports/<base>_vs_<head>)")
    rep.add_argument("--threshold", type=float, default=5.0, metavar="PCT",
                     help="for a comparison: smallest change that counts, in percent (default 5)")
    rep.add_argument("--force", action="store_true",
                     help="for a comparison: compare runs whose device, library versions or threads differ")
    rep.set_defaults(func=cmd_report)

    cmp = sub.add_parser("compare", help="regression verdicts between two runs: exit "
                                         f"{OK} none regressed, {REGRESSION} some did, {USAGE} bad input or incompatible runs")
    cmp.add_argument("base", metavar="BASE", help="run id under --results, or a run file")
    cmp.add_argument("head", metavar="HEAD", help="run id under --results, or a run file")
    _add_comparison_flags(cmp, results_help="results folder (default: results/)", threshold_help="default 5")
    cmp.add_argument("--force", action="store_true",
                     help="compare runs whose device, library versions or threads differ")
    cmp.set_defaults(func=cmd_compare)

    nig = sub.add_parser("nightly", help="run the nightly suite, compare with the pinned baseline, move it after a "
                                         f"clean night: exit {OK} clean, {REGRESSION} regression, {NIGHTLY_FAILED_ROWS} failed rows, "
                                         f"{NO_BASELINE} no baseline yet")
    _add_selection(nig, suite_default="nightly")
    _add_comparison_flags(nig, results_help="results folder holding the runs and baseline.json (default: results/)",
                          threshold_help="default 5; with --ab 3")
    nig.add_argument("--ab", action="store_true",
                     help="measure the baseline's commit and HEAD side by side tonight (lossbench ab) and judge "
                          "on the paired samples; needs the baseline's commit in this repository")
    nig.set_defaults(func=cmd_nightly)

    abp = sub.add_parser("ab", help="measure BASE and HEAD side by side, samples interleaved in paired rounds, "
                                     f"and judge the change: exit {OK} none regressed, {REGRESSION} some did, {USAGE} bad input")
    abp.add_argument("base", metavar="BASE", nargs="?",
                     help="git ref of the repository here (checked out into a temporary worktree) or a checkout directory")
    abp.add_argument("head", metavar="HEAD", nargs="?", help="as BASE")
    _add_selection(abp)
    _add_comparison_flags(abp, results_help="results folder: the run goes to <results>/ab/ (default: results/)",
                          threshold_help="default 3: the paired samples resolve smaller changes than compare")
    abp.add_argument("--base-python", help="the python BASE runs with (default: this one)")
    abp.add_argument("--head-python", help="the python HEAD runs with (default: this one)")
    abp.add_argument("--resume", metavar="RUN_ID", help="finish ab run RUN_ID in <results>/ab/")
    abp.add_argument("--passes", type=int, default=None,
                     help="times every unit is measured, each in a fresh pair of processes (default 3)")
    abp.add_argument("--min-blocks", type=int, default=3,
                     help="blocks of paired rounds per row and pass at least, each on fresh copies of the inputs "
                          "(default 3)")
    abp.add_argument("--seed", type=int, help="seed of the rounds' random order (default: fresh)")
    abp.set_defaults(func=cmd_ab)

    his = sub.add_parser("history", help="every row's time, memory and accuracy over the runs in --results, and "
                                         "the changes in them (change points): a table and an HTML/Markdown report")
    his.add_argument("--results", default="results", help="results folder (default: results/)")
    his.add_argument("--family", help="comma-separated: only these families")
    his.add_argument("--impl", help="comma-separated: only these implementations")
    his.add_argument("--out", default="reports/history", help="report folder (default: reports/history)")
    his.set_defaults(func=cmd_history)

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
        return USAGE


if __name__ == "__main__":
    sys.exit(main())
