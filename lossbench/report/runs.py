"""Runs in a results folder: the one way to list them, to load one by reference or all at once, and the one
rule of which runs may be compared (compare, history, report and nightly all go through here).

A run is <run_id>.jsonl (its rows) beside <run_id>.meta.json (its plan), or another tool's file (asv,
pytest-benchmark: lossbench.importers). Rows are identified across runs by records.KEY (`keyed`).
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import importers, store
from ..errors import UsageError
from ..records import COMPARABLE, KEY

RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]+$")  # records.new_run_id: sorts by time as text
VERSIONS = tuple(f for f in COMPARABLE if f != "git_sha")  # what must match; the code may differ


@dataclass
class Run:
    name: str                # as given on the command line
    run_id: str
    rows: pd.DataFrame       # in measurement order
    path: Path | None = None  # the file it was read from


# --- listing and loading ------------------------------------------------------------------------------
def run_files(folder: str | Path) -> list[Path]:
    """The run files of a folder, oldest first. Only <run_id>.jsonl files are runs: a copy, a torn
    fragment or another tool's file would otherwise be taken for a run (the latest, or a duplicate)."""
    files = sorted(Path(folder).glob("*.jsonl"))
    others = [f.name for f in files if not RUN_ID.match(f.stem)]
    if others:
        warnings.warn(f"{folder}: {len(others)} .jsonl file(s) not named <run_id>.jsonl are not taken as runs "
                      f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); pass a file as RUN to report it",
                      stacklevel=2)
    return sorted((f for f in files if RUN_ID.match(f.stem)), key=lambda f: f.stem)


def load_run(ref: str, results_dir: str | Path) -> Run:
    """A run file (lossbench's, an asv result file, pytest-benchmark JSON), or a run id under results_dir
    (in asv's or pytest-benchmark's folder also a commit: the first 7 or more hex digits of its sha)."""
    p = Path(ref)
    if not p.is_file():
        p = _imported_run_file(ref, results_dir) or Path(results_dir) / f"{ref}.jsonl"
        if not p.is_file():
            raise UsageError(f"no run {ref!r}: neither a run file nor a run id in {str(results_dir)!r}")
    df = store.load_results(p)
    if df.empty:
        raise UsageError(f"{p} holds no result rows")
    ids = df["run_id"].dropna().unique()
    return Run(ref, str(ids[0]) if len(ids) else p.stem, df.reset_index(drop=True), p)


def _imported_run_file(ref: str, results_dir: str | Path) -> Path | None:
    if not Path(results_dir).is_dir() or not importers.kind(results_dir):
        return None
    for f in importers.run_files(results_dir):
        try:
            first = importers.load_file(f).iloc[0]
        except (UsageError, IndexError):
            continue
        if ref == first["run_id"] or (len(ref) >= 7 and str(first["git_sha"]).startswith(ref)):
            return f
    return None


def load_all(results_dir: str | Path) -> pd.DataFrame:
    """Every row of every run in the folder, keyed, with its measurement order; bad input (no runs, a
    corrupt file) is a UsageError naming it."""
    folder = Path(results_dir)
    if folder.is_dir() and importers.kind(folder):  # asv's results, a folder of pytest-benchmark files
        return pd.concat([keyed(df).reset_index() for df in importers.runs(folder)], ignore_index=True)
    files = run_files(folder) if folder.is_dir() else []
    if not files:
        raise UsageError(f"no runs in {str(results_dir)!r} (no <run_id>.jsonl files)")
    return pd.concat([_load_keyed(f) for f in files], ignore_index=True)


def _load_keyed(path: Path) -> pd.DataFrame:
    check_meta(path.with_suffix(".meta.json"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = store.load_results(path)
    if df.empty:
        raise UsageError(f"{path} is corrupt: no result rows")
    for w in caught:  # a torn last line (a killed run) keeps the rows around it: say so, go on
        warnings.warn(str(w.message), stacklevel=2)
    df["run_id"] = df["run_id"].fillna(path.stem)
    return keyed(df).reset_index()


def check_meta(path: Path) -> None:
    """A run's meta file, where there is one, must be a JSON object; its contents are not needed (the rows
    carry their provenance, and early runs' meta files have no plan)."""
    if not path.is_file():
        return
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise UsageError(f"{path} is corrupt: not a JSON object")


# --- rows across runs ---------------------------------------------------------------------------------
def norm(v):
    """A metadata value with NaN (pandas' missing) as None, so that two missing values are equal."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def keyed(df: pd.DataFrame) -> pd.DataFrame:
    """The rows indexed by their key (records.KEY as JSON), with their measurement order: the drift's
    neighbourhood. A resumed row replaces its first try."""
    df = df.copy()
    df["order"] = np.arange(len(df))
    df["key"] = [json.dumps([norm(v) for v in k]) for k in df[KEY].itertuples(index=False)]
    return df.drop_duplicates("key", keep="last").set_index("key")


# --- which runs compare -------------------------------------------------------------------------------
def incompatibility(base: Run, head: Run) -> str | None:
    """The first version or hardware field (VERSIONS) that differs on a device both runs measured."""
    for device in sorted(set(base.rows["device"]) & set(head.rows["device"])):
        b = base.rows[base.rows["device"] == device].iloc[0]
        h = head.rows[head.rows["device"] == device].iloc[0]
        for f in VERSIONS:
            if norm(b.get(f)) != norm(h.get(f)):
                return f"{device}: {f} is {norm(b.get(f))} in {base.name}, {norm(h.get(f))} in {head.name}"
    return None


def history_for(base: Run, head: Run, results_dir: str | Path, limit: int = 10) -> list[Run]:
    """Up to `limit` most recent earlier runs comparable with the two (same device names and versions), the
    base among them: the rows' own run-to-run variation. They come from results_dir or, for a run another
    tool wrote (asv, pytest-benchmark), from the other runs of its folder."""
    found = []
    for run in _earlier_runs(head, results_dir):
        if run.run_id >= head.run_id:
            continue
        if set(run.rows["device_name"].dropna()) & set(head.rows["device_name"].dropna()) \
                and incompatibility(run, head) is None:
            found.append(run)
        if len(found) >= limit:
            break
    if base.run_id not in {r.run_id for r in found}:
        found.append(base)
    return found


def _earlier_runs(head: Run, results_dir: str | Path):
    """Candidate runs, newest first. A corrupt older file, or a stray one, only leaves the history shorter."""
    def quietly(load):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return load()
            except UsageError:
                return None

    if head.path is not None and importers.kind(head.path):
        folder = head.path.parent
        dfs = quietly(lambda: importers.runs(folder)) if importers.kind(folder) else None
        for df in reversed(dfs or []):
            yield Run(str(folder), str(df["run_id"].iloc[0]), df.reset_index(drop=True))
        return
    for path in reversed(quietly(lambda: run_files(results_dir)) or []):
        if path.stem < head.run_id:
            run = quietly(lambda: load_run(str(path), results_dir))
            if run is not None:
                yield run
