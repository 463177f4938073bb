"""pytest-benchmark JSON (--benchmark-json, --benchmark-save) as lossbench rows.

One row per benchmark of tests/test_benchmarks.py, whose extra_info holds the row's case, memory and
accuracy columns, first_call_ms, and the samples (raw_ms) with the eviction before each (evict_ms).
The provenance comes from machine_info["lossbench"] (tests/conftest.py) and commit_info; the run id
from the file's datetime and commit, so that the same file always imports as the same run.
"""
from __future__ import annotations

import datetime as dt
import re
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import UsageError
from ..records import ACCURACY, CASE, COLUMNS, MEMORY
from ..runners.stats import summarize

# What marks a benchmark of tests/test_benchmarks.py: the case columns it puts in its extra_info.
OURS = ("family", "impl", "mode")
# The columns a benchmark's extra_info gives as they are; the rest are built here.
_FROM_INFO = ("device", *CASE, *MEMORY, *ACCURACY)
_KINDS = {dict: "an object", list: "a list", str: "a string"}


def is_pytest_benchmark(data: Any) -> bool:
    """A pytest-benchmark file, whoever's benchmarks it holds (rows() tells whether any are lossbench's)."""
    return isinstance(data, dict) and {"machine_info", "commit_info", "benchmarks"} <= data.keys()


def _need(path: Path, obj: dict, key: str, kind: type, where: str = "") -> Any:
    if not isinstance(obj.get(key), kind):
        found = "missing" if key not in obj else f"{type(obj[key]).__name__}, not {_KINDS[kind]}"
        raise UsageError(f"{path}: malformed pytest-benchmark file: {where}{key!r} is {found}")
    return obj[key]


def _numbers(path: Path, value: Any, where: str, scale: float = 1.0) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in value):
        raise UsageError(f"{path}: malformed pytest-benchmark file: {where} is not a list of numbers")
    return [round(v * scale, 6) for v in value]  # rounded as lossbench's runs write them (sweep.py)


def _run(path: Path, data: dict) -> dict[str, Any]:
    """The provenance every row of the file shares (all but device and device_name)."""
    machine = _need(path, data, "machine_info", dict)
    commit = _need(path, data, "commit_info", dict)
    lb = machine.get("lossbench")
    lb = lb if isinstance(lb, dict) else {}  # a session without tests/conftest.py's hook
    text = _need(path, data, "datetime", str)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{path}: malformed pytest-benchmark file: 'datetime' is {text!r}, not an ISO date") from None
    if when.tzinfo is None:  # pytest-benchmark before 4.0 wrote utcnow(): naive, in UTC
        when = when.replace(tzinfo=dt.timezone.utc)
    when = when.astimezone(dt.timezone.utc)
    sha = _need(path, commit, "id", str, "commit_info's ").lower()
    # 'unversioned' or 'unknown' when pytest-benchmark found no git (or hg) checkout.
    known = re.fullmatch(r"[0-9a-f]{6,}", sha) is not None
    git_sha = sha + ("+dirty" if commit.get("dirty") else "") if known else lb.get("git_sha")
    return {
        # Text-sortable like records.new_run_id; from the file itself, so re-importing it gives the same id.
        "run_id": when.strftime("%Y%m%dT%H%M%SZ") + "-" + (sha[:6] if known else "000000"),
        "timestamp": when.isoformat(timespec="seconds"),
        "git_sha": git_sha,
        "host": lb.get("host") or machine.get("node"),
        **{k: lb.get(k) for k in ("torch_version", "triton_version", "cuda_version", "threads")},
    }


def _row(path: Path, run: dict, names: dict, bench: dict, info: dict, where: str) -> dict[str, Any]:
    row = {col: None for col in COLUMNS}
    row.update(run)
    row.update({k: info.get(k) for k in _FROM_INFO})
    if not isinstance(row["device"], str):
        raise UsageError(f"{path}: malformed pytest-benchmark file: {where}extra_info has no device")
    row["device_name"] = names.get(row["device"])
    stats = _need(path, bench, "stats", dict, where)
    # Seconds in stats["data"] where the file kept them (--benchmark-json, --benchmark-save-data), else
    # the milliseconds of extra_info; neither after a --benchmark-disable session (one untimed call).
    if stats.get("data") is not None:
        raw = _numbers(path, stats["data"], f"{where}stats' 'data'", 1e3)
    else:
        raw = _numbers(path, info.get("raw_ms", []), f"{where}extra_info's 'raw_ms'")
    evict = _numbers(path, info.get("evict_ms", []), f"{where}extra_info's 'evict_ms'")
    if evict and len(evict) != len(raw):
        raise UsageError(f"{path}: malformed pytest-benchmark file: {where}{len(evict)} evict_ms for "
                         f"{len(raw)} samples")
    if raw:
        row.update(summarize(raw), raw_ms=raw, evict_ms=evict or None)
        first = info.get("first_call_ms")
        if info.get("compiles") and isinstance(first, (int, float)):
            # As sweep.py reports it: the first call's excess over a steady-state one.
            row["compile_ms"] = max(first - row["time_median_ms"], 0.0)
    row.update(status="ok", error=None)
    return row


def rows(path: Path, data: dict) -> pd.DataFrame:
    """The lossbench rows of one pytest-benchmark file, columns exactly records.COLUMNS. Benchmarks of
    other modules are skipped (one warning); a file with none of ours, or malformed, is a UsageError."""
    if not isinstance(data, dict):
        raise UsageError(f"{path}: malformed pytest-benchmark file: not a JSON object")
    benches = _need(path, data, "benchmarks", list)
    ours, foreign = [], 0
    for i, bench in enumerate(benches):
        where = f"benchmark {i}: "
        if not isinstance(bench, dict):
            raise UsageError(f"{path}: malformed pytest-benchmark file: {where}not an object")
        info = bench.get("extra_info", {})
        if not isinstance(info, dict):
            raise UsageError(f"{path}: malformed pytest-benchmark file: {where}'extra_info' is not an object")
        if all(k in info for k in OURS):
            ours.append((bench, info, where))
        else:
            foreign += 1
    if not ours:
        raise UsageError(f"{path}: no lossbench benchmarks in this pytest-benchmark file")
    if foreign:
        warnings.warn(f"{path}: {foreign} benchmarks without lossbench's extra_info (not from "
                      f"tests/test_benchmarks.py) skipped", stacklevel=2)
    run = _run(path, data)
    lb = data["machine_info"].get("lossbench")
    names = lb.get("devices") if isinstance(lb, dict) and isinstance(lb.get("devices"), dict) else {}
    return pd.DataFrame([_row(path, run, names, b, info, where) for b, info, where in ours], columns=COLUMNS)
