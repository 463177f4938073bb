"""Result files: one JSON-lines file per run, a row appended and fsynced as each one finishes.

    results/<run_id>.jsonl      one row per case x implementation x mode (schema: records.COLUMNS)
    results/<run_id>.meta.json  the run's provenance, command line and state (running/complete/interrupted)

Non-finite floats are written as the NaN / Infinity tokens of Python's json module: an infinite
error (a NaN where the reference is finite) is a different finding from a missing one (null).
"""
from __future__ import annotations

import fcntl
import json
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import UsageError
from .records import COLUMNS, key_of


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunWriter:
    """Appends rows durably: a crash, even SIGKILL, loses at most the row being written.

    The run file is locked while written, so a second process cannot resume a run that is still
    going; two different runs in one folder never share a file."""

    def __init__(self, out_dir: str | Path, run_id: str, meta: dict[str, Any] | None = None):
        self.dir = Path(out_dir)
        self.path = self.dir / f"{run_id}.jsonl"
        self.meta_path = self.dir / f"{run_id}.meta.json"
        resuming = meta is None
        if resuming:
            self.meta = read_meta(self.dir, run_id)
        else:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create output folder {str(self.dir)!r}: {exc.strerror}") from None
            self.meta = {**meta, "run_id": run_id, "rows": 0}
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise UsageError(f"run {run_id} is being written by another process") from None
        if resuming:
            self.meta["rows"] = _drop_torn_tail(self._file)  # the meta's count died with the old process
        self.meta["state"] = "running"
        _atomic_write_json(self.meta_path, self.meta)

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.meta["rows"] += 1

    def close(self, state: str) -> None:
        self._file.close()
        self.meta["state"] = state
        _atomic_write_json(self.meta_path, self.meta)


def _drop_torn_tail(f) -> int:
    """A run killed mid-write leaves a partial last line; appending after it would glue the next row
    onto it. Cut the file back to its last complete line; return how many complete lines it has."""
    with open(f.name, "rb") as raw:
        data = raw.read()
    if not data or data.endswith(b"\n"):
        return data.count(b"\n")
    keep = data.rfind(b"\n") + 1
    size = len(data)
    warnings.warn(f"{f.name}: dropped a torn last line ({size - keep} bytes) before resuming", stacklevel=3)
    f.truncate(keep)
    f.seek(0, os.SEEK_END)
    return data.count(b"\n")


def read_meta(out_dir: str | Path, run_id: str) -> dict[str, Any]:
    path = Path(out_dir) / f"{run_id}.meta.json"
    if not path.is_file():
        raise UsageError(f"no run {run_id!r} in {str(out_dir)!r} (expected {path.name})")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{path} is corrupt: not JSON") from None
    if not isinstance(meta, dict) or "spec" not in meta:
        raise UsageError(f"{path} is not a lossbench run description")
    return meta


def done_keys(path: str | Path) -> set[tuple]:
    """Row keys (records.KEY) already in a run file: resume measures the others."""
    p = Path(path)
    return {key_of(r) for r in _read_run_file(p)} if p.is_file() else set()


_ROW_FIELDS = {"run_id", "family", "impl"}


def _read_run_file(path: Path) -> list[dict[str, Any]]:
    """The rows of one file. Whatever is not a row (a torn last line, garbage, another tool's JSON)
    is skipped with one warning for the file, and the rows around it are kept."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        warnings.warn(f"{path}: unreadable ({exc.strerror}), skipped", stacklevel=3)
        return []
    rows, bad = [], []
    lines = [(i, line) for i, line in enumerate(text.split("\n"), 1) if line.strip()]
    for i, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and _ROW_FIELDS <= row.keys():
            rows.append(row)
        else:
            bad.append(i)
    if bad and not rows:
        warnings.warn(f"{path}: not a lossbench results file, skipped", stacklevel=3)
    elif bad == [lines[-1][0]]:
        warnings.warn(f"{path}: line {bad[0]} is not a complete row (a run killed mid-write?), skipped",
                      stacklevel=3)
    elif bad:
        warnings.warn(f"{path}: {len(bad)} lines are not result rows (first: line {bad[0]}), skipped",
                      stacklevel=3)
    return rows


def load_results(path: str | Path) -> pd.DataFrame:
    """A run file, or a folder of them, as one DataFrame (columns in schema order, raw samples kept).
    asv's results (its folder or one result file) and pytest-benchmark JSON files come in the same
    columns (lossbench.importers)."""
    from . import importers  # they use the registry, which must not be loaded just to read a run file

    p = Path(path)
    if importers.kind(p):
        return pd.concat(importers.runs(p), ignore_index=True)
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
    elif p.is_file():
        files = [p]
    else:
        raise UsageError(f"no results at {str(p)!r}")
    rows = [r for f in files for r in _read_run_file(f)]
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = None
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[COLUMNS + extra]
