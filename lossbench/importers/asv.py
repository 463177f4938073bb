"""asv's results, from the suites of benchmarks/ (integrations/asv_suite.py), as lossbench rows.

asv writes results/asv/<machine>/<commit[:8]>-<env>.json: per benchmark, a value per parameter set (the
product of its params, in order) and, with --record-samples, the samples. One file is one run: its rows
are keyed like lossbench's own fwd_bwd rows of the same default case, so `lossbench compare` can set a
file against another (or against a lossbench run of the same code, with --force for the versions).
- time_fwd_bwd gives the time columns: from the raw samples when recorded (the same summaries as a
  lossbench run), else asv's median only (asv keeps a 99% interval; ours are 95%, so it is not copied).
- track_extra_mem_bytes gives extra_mem_bytes; track_err_vs_floor gives err_vs_floor.
- Provenance: the commit, asv's machine name and, from the benchmark's `version` (asv_suite.version_info:
  asv stores it per result), the torch/triton/CUDA versions, the thread count and the device names.
- A parameter set with no value was skipped or failed: asv's file does not say which. Where the
  registry's declarations exclude it, the row is `unsupported`; otherwise `error`, saying so.
"""
from __future__ import annotations

import ast
import datetime as dt
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from .. import records, registry
from ..cases import Case, parse_shape
from ..errors import UsageError
from ..families import FAMILIES
from ..runners import stats

BENCHMARKS = {"time_fwd_bwd": "time", "track_extra_mem_bytes": "extra_mem_bytes", "track_err_vs_floor": "err_vs_floor"}
PARAM_NAMES = ["impl", "shape", "dtype", "device"]


def is_results_dir(p: Path) -> bool:
    """asv's results root (machine folders, and benchmarks.json, which git ignores here: asv rewrites it on
    every run) or one machine's folder (machine.json)."""
    return ((p / "benchmarks.json").is_file() or (p / "machine.json").is_file()
            or any((d / "machine.json").is_file() for d in p.iterdir() if d.is_dir()))


def result_files(p: Path) -> list[Path]:
    machines = [p] if (p / "machine.json").is_file() else sorted(d for d in p.iterdir() if (d / "machine.json").is_file())
    return [f for d in machines for f in sorted(d.glob("*.json")) if f.name != "machine.json"]


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is corrupt: not JSON ({getattr(exc, 'msg', exc)})") from None


def is_result_file(p: Path) -> bool:
    if p.suffix != ".json" or p.name in ("machine.json", "benchmarks.json") or not (p.parent / "machine.json").is_file():
        return False
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True  # in asv's folder with asv's name: a corrupt result file, which rows() reports
    return isinstance(data, dict) and "result_columns" in data


def _family_of(bench_name: str) -> tuple[str, str] | None:
    """'losses.LinearCE.time_fwd_bwd' -> ('linear_ce', 'time_fwd_bwd'); None for benchmarks not ours."""
    from ..integrations.asv_suite import class_name
    parts = bench_name.split(".")
    if len(parts) < 2 or parts[-1] not in BENCHMARKS:
        return None
    families = {class_name(f): f for f in FAMILIES}
    return (families[parts[-2]], parts[-1]) if parts[-2] in families else None


def _declared_unsupported(family: str, impl: str, case: Case) -> str | None:
    try:
        implementation = registry.get(family, impl)
    except UsageError:
        return None
    if case.device == "cpu" and implementation.triton:
        return f"{impl} runs Triton kernels: no value on the CPU outside Triton's interpreter"
    if implementation.collective:
        return f"{impl} needs a process group of 2 or more ranks: asv runs one process"
    return implementation.why_unsupported(case)


def _num(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def rows(path: Path) -> pd.DataFrame:
    data = _load(path)
    try:
        columns = data["result_columns"]
        results = data["results"]
        commit = str(data["commit_hash"])
    except (KeyError, TypeError):
        raise UsageError(f"{path} is not an asv result file: no result_columns, results or commit_hash") from None
    machine = _load(path.parent / "machine.json") if (path.parent / "machine.json").is_file() else {}
    col = {name: i for i, name in enumerate(columns)}
    cells: dict[tuple, dict[str, Any]] = {}
    started = []
    for bench_name, entry in results.items():
        ours = _family_of(bench_name)
        if ours is None or not isinstance(entry, list):
            continue
        family, which = ours[0], BENCHMARKS[ours[1]]

        def field(name: str):
            i = col.get(name)
            return entry[i] if i is not None and i < len(entry) else None

        try:
            params = [[ast.literal_eval(v) for v in values] for values in field("params")]
        except (TypeError, ValueError, SyntaxError):
            raise UsageError(f"{path}: {bench_name} has unreadable params") from None
        if len(params) != len(PARAM_NAMES):
            raise UsageError(f"{path}: {bench_name} has {len(params)} params, not {', '.join(PARAM_NAMES)}")
        values = field("result") or [None] * math.prod(len(p) for p in params)
        samples = field("samples") or [None] * len(values)
        repeats = field("stats_repeat") or [None] * len(values)
        info = version_fields(field("version"))
        if field("started_at"):
            started.append(field("started_at"))
        for combo, value, sample, repeat in zip(itertools.product(*params), values, samples, repeats):
            cell = cells.setdefault((family, *combo), {"info": info})
            cell[which] = (_num(value), sample, repeat)
            cell["info"] = cell["info"] or info
    if not cells:
        raise UsageError(f"{path}: no lossbench benchmarks in this asv result file")
    when = dt.datetime.fromtimestamp(min(started) / 1e3 if started else data.get("date", 0) / 1e3, dt.timezone.utc)
    run_id = when.strftime("%Y%m%dT%H%M%SZ") + "-" + (commit[:6] if commit else "000000")
    out = [_row(key, cell, run_id, when, commit, machine, data) for key, cell in cells.items()]
    df = pd.DataFrame(out)
    return df[records.COLUMNS]


def _row(key: tuple, cell: dict, run_id: str, when: dt.datetime, commit: str, machine: dict, data: dict) -> dict:
    family, impl, shape, dtype, device = key
    case = Case.from_shape(family, parse_shape(shape), dtype, device)
    info = cell.get("info") or {}
    prov = {"run_id": run_id, "git_sha": commit, "host": machine.get("machine"), "device": device,
            "device_name": (info.get("device_names") or {}).get(device) or (machine.get("cpu") if device == "cpu" else None),
            "torch_version": info.get("torch_version"), "triton_version": info.get("triton_version"),
            "cuda_version": info.get("cuda_version"), "threads": info.get("threads"), "copy_gbps": None}
    fields: dict[str, Any] = {}
    value, sample, repeat = cell.get("time", (None, None, None))
    if sample:
        fields.update(stats.summarize([s * 1e3 for s in sample]), raw_ms=[round(s * 1e3, 6) for s in sample])
    elif value is not None:
        fields.update(time_median_ms=value * 1e3, samples=repeat)
    mem = cell.get("extra_mem_bytes", (None,))[0]
    err = cell.get("err_vs_floor", (None,))[0]
    fields.update(extra_mem_bytes=None if mem is None else int(mem), err_vs_floor=err)
    if value is None and mem is None and err is None:
        reason = _declared_unsupported(family, impl, case)
        fields.update(status="unsupported" if reason else "error",
                      error=reason or "asv recorded no value: skipped or failed (asv's result file does not say "
                                      "which; its run log does)")
    else:
        fields.update(status="ok", error=None)
    row = records.row(prov, case, impl, "fwd_bwd", **fields)
    row["timestamp"] = when.isoformat(timespec="seconds")
    return row


def version_fields(version: Any) -> dict:
    """What asv_suite.version_info put in the benchmark's version string (JSON after the semantics tag)."""
    if not isinstance(version, str) or " " not in version:
        return {}
    try:
        info = json.loads(version.split(" ", 1)[1])
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}
