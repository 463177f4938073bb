"""One result row per case x implementation x mode: the schema, and the provenance every row carries."""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import secrets
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

from . import devices

PROVENANCE = ["run_id", "timestamp", "git_sha", "host", "device", "device_name", "torch_version",
              "triton_version", "cuda_version", "threads", "copy_gbps", "world_size"]
CASE = ["family", "impl", "n", "c", "h", "dtype", "mode", "options", "input_dist", "label"]
TIME = ["time_median_ms", "time_p20_ms", "time_p80_ms", "time_ci_low_ms", "time_ci_high_ms", "samples",
        "converged", "compile_ms", "raw_ms", "evict_ms"]
# Paired rounds (runners/pairing.py). In a run: the row's time against torch_functional's, sampled in the
# same rounds (speedup = its time over this row's, with a 95% CI). In an ab run: the row's side (base or
# head) and, per raw sample, the round it was taken in, the block of rounds (fresh inputs) of that round and
# the pass (a fresh pair of processes) of that block.
PAIRED = ["speedup_vs_torch", "speedup_ci_low", "speedup_ci_high", "side", "pair_round", "pair_block", "pair_pass"]
BANDWIDTH = ["gbps", "pct_peak_bw"]
MEMORY = ["peak_mem_bytes", "extra_mem_bytes", "min_mem_bytes", "reserved_mem_bytes", "extra_mem_max_bytes"]
ACCURACY = ["loss_rel_err", "grad_rel_err", "grad_row_err_max", "grad_max_abs_err", "err_vs_floor",
            "err_ratio_vs_torch", "accuracy_ok", "accuracy_note", "mutates_inputs", "grad_in_forward", "convention"]
OUTCOME = ["status", "error"]
COLUMNS = PROVENANCE + CASE + TIME + PAIRED + BANDWIDTH + MEMORY + ACCURACY + OUTCOME
# What identifies a row within a run: resume measures exactly the keys that are missing.
KEY = ["device", "family", "impl", "mode", "n", "c", "h", "dtype", "options", "input_dist"]
STATUSES = ("ok", "unsupported", "error", "oom", "timeout", "crash")


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_sha() -> str | None:
    """HEAD of the checkout lossbench runs from, '+dirty' when it has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _triton_version() -> str | None:
    # From the package metadata: importing triton just for its version costs a second and, at
    # interpreter exit, prints nanobind leak reports after everything else.
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(run_id: str, device: str, threads: int, copy_gbps: float | None = None) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "git_sha": git_sha(),
        "host": socket.gethostname(),
        "device": device,
        "device_name": devices.device_name(device),
        "torch_version": torch.__version__,
        "triton_version": _triton_version(),
        "cuda_version": torch.version.cuda,
        "threads": threads,
        "copy_gbps": copy_gbps,  # the device's measured copy bandwidth, for pct_peak_bw
        # ranks of the process group the row was measured in (torchrun), 1 alone: a collective
        # implementation's time (vocab_parallel) is for that many ranks
        "world_size": _world_size(),
    }


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# What must not change within one run: the code, the libraries, the hardware and the thread count.
COMPARABLE = ("git_sha", "torch_version", "triton_version", "cuda_version", "device_name", "threads")


def provenance_difference(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first COMPARABLE field that differs, as 'git_sha was X, is now Y'; None when none does."""
    for field in COMPARABLE:
        if stored.get(field) != current.get(field):
            return f"{field} was {stored.get(field)}, is now {current.get(field)}"
    return None


def key(case, impl: str, mode: str) -> tuple:
    return (case.device, case.family, impl, mode, case.n, case.c, case.h, case.dtype, case.options_json, case.input_dist)


def key_of(row: dict[str, Any]) -> tuple:
    return tuple(row.get(col) for col in KEY)


def row(prov: dict[str, Any], case, impl: str, mode: str, **fields: Any) -> dict[str, Any]:
    """A full row: every column present (None where not measured), in schema order."""
    base = {
        **prov,
        "timestamp": now(),
        "family": case.family,
        "impl": impl,
        "n": case.n,
        "c": case.c,
        "h": case.h,
        "dtype": case.dtype,
        "mode": mode,
        "options": case.options_json,
        "input_dist": case.input_dist,
        "label": case.label(),
    }
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not result columns: {sorted(unknown)}")
    merged = {**base, **fields}
    return {col: merged.get(col) for col in COLUMNS}
