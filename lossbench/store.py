"""Result files: one JSON-lines file per run, a row appended and fsynced as each one finishes.

    results/<run_id>.jsonl      one row per case x implementation x mode (schema: records.COLUMNS)
    results/<run_id>.meta.json  the run's provenance, command line and state (running/complete/interrupted)

Non-finite floats are written as the NaN / Infinity tokens of Python's json module: an infinite
error (a NaN where the reference is finite) is a different finding from a missing one (null).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import UsageError
from .records import COLUMNS


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunWriter:
    """Appends rows durably: a crash loses at most the row being written."""

    def __init__(self, out_dir: str | Path, run_id: str, meta: dict[str, Any]):
        self.dir = Path(out_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create output folder {str(self.dir)!r}: {exc.strerror}") from None
        self.path = self.dir / f"{run_id}.jsonl"
        self.meta_path = self.dir / f"{run_id}.meta.json"
        self.meta = {**meta, "run_id": run_id, "state": "running", "rows": 0}
        _atomic_write_json(self.meta_path, self.meta)
        self._file = open(self.path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.meta["rows"] += 1

    def close(self, state: str) -> None:
        self._file.close()
        self.meta["state"] = state
        _atomic_write_json(self.meta_path, self.meta)


def _read_run_file(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # A run killed mid-write leaves a torn last line: skip it, keep everything before it.
            warnings.warn(f"{path}: line {i} is not a complete row, skipped", stacklevel=3)
    return rows


def load_results(path: str | Path) -> pd.DataFrame:
    """A run file, or a folder of them, as one DataFrame (columns in schema order, raw samples kept)."""
    p = Path(path)
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
