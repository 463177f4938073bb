"""Results other tools wrote, read into lossbench's schema (records.COLUMNS) so that compare, report and
history treat them like lossbench's own runs: asv's results folder (or one of its result files) and
pytest-benchmark's JSON files (or a folder of them, as --benchmark-autosave leaves them).

Each file of theirs is one run. store.load_results and the run loaders of report/ come through `kind`
and `runs`; a lossbench run file (.jsonl) is none of these.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd

from ..errors import UsageError
from . import asv, pytest_benchmark

KINDS = ("asv", "pytest-benchmark")


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is corrupt: not JSON ({getattr(exc, 'msg', exc)})") from None


def kind(path: str | Path) -> str | None:
    """'asv', 'pytest-benchmark', or None (lossbench's own runs, or nothing known)."""
    p = Path(path)
    if p.is_dir():
        if asv.is_results_dir(p):
            return "asv"
        if any(p.glob("*.json")) and not any(p.glob("*.jsonl")):
            return "pytest-benchmark" if all(_is_pytest_benchmark_file(f) for f in p.glob("*.json")) else None
        return None
    if p.suffix != ".json" or not p.is_file():
        return None
    if asv.is_result_file(p):
        return "asv"
    return "pytest-benchmark" if _is_pytest_benchmark_file(p) else None


def _is_pytest_benchmark_file(p: Path) -> bool:
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and pytest_benchmark.is_pytest_benchmark(data)


def run_files(path: str | Path) -> list[Path]:
    """The files that are runs, one each: an asv result file, a pytest-benchmark JSON file."""
    p = Path(path)
    k = kind(p)
    if k is None:
        raise UsageError(f"{p} is neither an asv results folder or file nor pytest-benchmark JSON")
    if not p.is_dir():
        return [p]
    return asv.result_files(p) if k == "asv" else sorted(p.glob("*.json"))


def load_file(path: Path) -> pd.DataFrame:
    """One run's rows. Bad input is a UsageError naming the file."""
    if asv.is_result_file(path):
        return asv.rows(path)
    data = _json(path)
    if not isinstance(data, dict) or not pytest_benchmark.is_pytest_benchmark(data):
        raise UsageError(f"{path} is neither an asv result file nor pytest-benchmark JSON")
    return pytest_benchmark.rows(path, data)


def indexed(path: str | Path) -> list[tuple[str, Path, pd.DataFrame]]:
    """(run id, file, rows) of every run under `path`, oldest first. In a folder, a file that cannot be read
    is left out with one warning naming it; a single file that cannot be read is an error."""
    files = run_files(path)
    if not Path(path).is_dir():
        df = load_file(files[0])
        return [(str(df["run_id"].iloc[0]), files[0], df)]
    out = []
    for f in files:
        try:
            df = load_file(f)
        except UsageError as exc:
            warnings.warn(f"{exc}; left out", stacklevel=2)
            continue
        out.append((str(df["run_id"].iloc[0]), f, df))
    if not out:
        raise UsageError(f"no readable run in {str(path)!r}")
    return sorted(out, key=lambda t: t[0])


def runs(path: str | Path) -> list[pd.DataFrame]:
    """The rows of every run under `path`, oldest first (see indexed)."""
    return [df for _, _, df in indexed(path)]
