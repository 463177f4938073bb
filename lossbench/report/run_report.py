"""`lossbench report [RUN...]`: one run -> a run report, two -> a comparison report, as HTML, Markdown
and PNGs (page.write_report), with the terminal tables of a run.

A run is never a mix: a folder stands for its latest run (by the run id's timestamp), and the report
says which one it picked and among how many.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console

from .. import importers, store
from ..errors import UsageError
from ..records import STATUSES
from . import compare, compare_render, runs
from .page import ReportFiles, Section, write_report
from .table import family_tables
from .verdicts import Comparison

NAME = "report"  # report.html, report.md, report-NN-<section>.png in the output folder


@dataclass
class Picked:
    run: runs.Run
    path: Path
    picked: str = ""  # how a folder was resolved: "latest of N runs in DIR"


# --- which runs ---------------------------------------------------------------------------------------
def _latest(folder: Path) -> tuple[Path, str]:
    if importers.kind(folder):  # asv's results, pytest-benchmark's files: their run ids, not their names
        found = importers.indexed(folder)
        return found[-1][1], f"latest of {len(found)} {importers.kind(folder)} run{'s' * (len(found) > 1)} in {folder}/"
    found = runs.run_files(folder)
    if not found:
        raise UsageError(f"no run in {str(folder)!r} (no <run_id>.jsonl file)")
    return found[-1], f"latest of {len(found)} run{'s' * (len(found) > 1)} in {folder}/"


def _load(path: Path, results: str | Path) -> runs.Run:
    """runs.load_run, with the loader's warnings held back until the file proves to be a run: a
    corrupt file is then one error line, not a warning and an error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = runs.load_run(str(path), results)
        except UsageError as exc:
            if caught:
                reason = str(caught[0].message).removeprefix(f"{path}: ").removesuffix(", skipped")
                raise UsageError(f"{path} is not a readable run: {reason}") from None
            raise UsageError(str(exc)) from None
    for w in caught:
        warnings.warn(w.message, stacklevel=2)
    return run


def pick(refs: list[str], results: str | Path) -> list[Picked]:
    """Each RUN as runs.load_run resolves it (a run file or a run id under results), a folder as
    its latest run; no RUN: the latest run under results."""
    if len(refs) > 2:
        raise UsageError(f"report takes one run (a run report) or two (a comparison), not {len(refs)}")
    if not refs and not Path(results).is_dir():
        raise UsageError(f"no results folder {str(results)!r}: name a run, or a folder with --results")
    out = []
    for ref in refs or [str(results)]:
        folder = Path(ref)
        if folder.is_dir():
            path, how = _latest(folder)
            out.append(Picked(_load(path, results), path, how))
        else:
            run = _load(Path(ref), results)
            out.append(Picked(run, run.path))
    return out


# --- the header ---------------------------------------------------------------------------------------
PROVENANCE = [("device", "device"), ("device_name", "device name"), ("torch_version", "torch"),
              ("triton_version", "triton"), ("cuda_version", "CUDA"), ("git_sha", "commit"), ("threads", "threads")]


def _values(df: pd.DataFrame, col: str) -> str:
    vals = [str(v) for v in pd.unique(df[col].dropna())]
    return ", ".join(vals) if vals else "-"


def _meta(p: Picked) -> dict:
    other = importers.kind(p.path)
    if other:  # another tool's file: its suite is lossbench's for that tool
        return {"spec": {"suite": f"{other} ({'benchmarks/' if other == 'asv' else 'tests/test_benchmarks.py'})"}}
    try:
        return store.read_meta(p.path.parent, p.run.run_id)
    except UsageError:
        return {}  # an early run without a plan spec, or a file without its meta: the rows still report


def _suite(meta: dict) -> str:
    if "spec" not in meta:
        return "unknown (no meta file with the run's plan)"
    return meta["spec"].get("suite") or "none (each family's torch-default case)"


def _run_line(p: Picked) -> str:
    return p.run.run_id + (f" ({p.picked})" if p.picked else "")


def _header(picked: list[Picked]) -> dict[str, str]:
    if len(picked) == 1:
        p, meta = picked[0], _meta(picked[0])
        head = {"run": _run_line(p), "file": str(p.path), "suite": _suite(meta), "state": meta.get("state", "-")}
        head |= {label: _values(p.run.rows, col) for col, label in PROVENANCE}
        return head | {"rows": _counts(p.run.rows)}
    (b, h), head = picked, {}
    head["base"], head["head"] = _run_line(b), _run_line(h)
    head["suite"] = _pair(_suite(_meta(b)), _suite(_meta(h)))
    for col, label in PROVENANCE:
        head[label] = _pair(_values(b.run.rows, col), _values(h.run.rows, col))
    head["rows"] = _pair(_counts(b.run.rows), _counts(h.run.rows))
    return head


def _counts(df: pd.DataFrame) -> str:
    c = df["status"].value_counts()
    order = [s for s in STATUSES if s in c] + [s for s in c.index if s not in STATUSES]
    return f"{len(df)} ({', '.join(f'{int(c[s])} {s}' for s in order)})"


def _pair(base: str, head: str) -> str:
    return base if base == head else f"{base} → {head}"


# --- sections -----------------------------------------------------------------------------------------
def failed_section(df: pd.DataFrame, which: str = "") -> Section:
    """Rows that did not run, with their reason, once per case and reason (its modes together)."""
    bad = df[df["status"] != "ok"]
    title = f"Failed and unsupported rows{which}"
    if bad.empty:
        return Section(title, text="None: every row is ok.")
    table = (bad.fillna({"error": ""}).groupby(["status", "family", "impl", "label", "error"], sort=False)["mode"]
             .agg(lambda m: ",".join(pd.unique(m))).reset_index())
    table = table[["status", "impl", "error", "family", "label", "mode"]]  # the reason before the long labels
    return Section(title, table=table, text=(
        f"{len(bad)} rows, listed once per case and reason (modes together). error, oom, timeout and crash "
        "rows failed to run; unsupported rows are cases the implementation declares it cannot run."))


def _plots():
    try:
        from . import plots
    except ImportError as exc:
        raise UsageError(f"the report's plots need seaborn and matplotlib (pip install -e '.[plots]'): {exc}") from None
    return plots


def run_sections(df: pd.DataFrame) -> list[Section]:
    plots = _plots()
    return [plots.speedup_section(df), plots.time_section(df), plots.memory_section(df), plots.accuracy_section(df),
            plots.bandwidth_section(df), failed_section(df)]


def comparison_sections(cmp: Comparison) -> list[Section]:
    plots = _plots()
    v = cmp.verdicts
    changed = v[(v["metric"] == "time") & (v["verdict"] != "unchanged")]
    shown = compare_render.display_frame(cmp)
    samples = plots.raw_samples_section(cmp, changed)
    if samples.figure is not None:  # numbered as the panels are
        samples.table = shown[shown["metric"] == "time"].head(plots.MAX_SAMPLE_PANELS)
        samples.table.insert(0, "#", range(1, len(samples.table) + 1))
    summary = Section("Verdicts", text="\n".join(compare_render.summary_lines(cmp)))
    table = Section("Every verdict other than unchanged", table=shown if len(shown) else None,
                    text="Most severe first, as lossbench compare prints them." if len(shown)
                    else "Every matched row is unchanged.")
    # the picture first, the long table after it
    return [summary, samples, table, plots.time_changes_section(cmp), plots.memory_changes_section(cmp),
            plots.accuracy_changes_section(cmp), failed_section(cmp.head.rows, " (head)")]


# --- the command --------------------------------------------------------------------------------------
def report(refs: list[str], results: str | Path = "results", out: str | Path | None = None,
           console: Console | None = None, threshold_pct: float = 5.0, force: bool = False) -> ReportFiles:
    console = console or Console()
    picked = pick(refs, results)
    for p in picked:
        if p.picked:
            console.print(f"{p.picked}: {p.run.run_id}", markup=False, highlight=False, soft_wrap=True)
    if len(picked) == 1:
        run = picked[0].run
        for table in family_tables(run.rows):
            console.print(table)
        console.print(f"run {run.run_id}, rows: {_counts(run.rows)}", markup=False, highlight=False)
        name, title, sections = run.run_id, f"lossbench run {run.run_id}", run_sections(run.rows)
    else:
        base, head = picked[0].run, picked[1].run
        cmp = compare.compare(base, head, compare.threshold_from_pct(threshold_pct), force=force,
                              history=runs.history_for(base, head, results))
        for line in compare_render.summary_lines(cmp):
            console.print(line)
        name = f"{base.run_id}_vs_{head.run_id}"
        title, sections = f"lossbench comparison {base.run_id} → {head.run_id}", comparison_sections(cmp)
    files = write_report(Path(out) if out else Path("reports") / name, NAME, title, _header(picked), sections)
    for path in (files.html, files.markdown, *files.pngs):
        console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)
    return files
