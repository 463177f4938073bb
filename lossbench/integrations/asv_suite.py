"""asv benchmark classes generated from the registry: one class per family, its implementations, shapes,
dtypes and devices as asv parameters (integrations.bench.grid). benchmarks/losses.py exposes them.

Per class, three benchmarks over the same parameters:
- time_fwd_bwd: forward + backward, a sample as integrations.bench defines it (fresh inputs, cold caches,
  the device synchronised). asv re-runs `setup` before every timed call (asv_runner >= 0.3), which is
  where the untimed restoring and evicting happens; Bench itself is built once per process.
- track_extra_mem_bytes: the call's peak memory over its inputs, from lossbench's probe. Not asv's
  `peakmem_`: that is the whole process's peak RSS, set-up, inputs and torch's import included, and it
  cannot see CUDA memory at all; a loss that allocates nothing would still read hundreds of megabytes.
- track_err_vs_floor: the worst row's gradient error against the float64 reference, over the error of
  that reference rounded once to the dtype (1 is the best any implementation can do; NaN in float64).
`version` is set (version_info): asv keys a benchmark's history by a hash of its source unless told
otherwise, and these methods are one-liners whose meaning lives in lossbench; SEMANTICS changes when a
sample does.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import torch

from .. import records
from ..families import FAMILIES
from . import bench

SEMANTICS = "lossbench-fwd_bwd-1"
PARAM_NAMES = ["impl", "shape", "dtype", "device"]


def _cuda_names() -> dict[str, str]:
    """CUDA device names from nvidia-smi: asv's forkserver imports this module once and forks a process per
    benchmark, and a CUDA context made here would break every child (torch's own names need one)."""
    if not torch.backends.cuda.is_built() or not shutil.which("nvidia-smi"):
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {f"cuda:{i}": name.strip() for i, name in enumerate(out.splitlines()) if name.strip()}


def version_info() -> str:
    """The benchmarks' asv `version`: the sample's semantics, then as JSON what makes two results comparable
    (records.COMPARABLE less the commit). asv stores it with every result, so lossbench's importer reads the
    provenance from it; and asv keeps results of another version apart, as lossbench's compare refuses to
    set a torch 2.12 run against a torch 2.13 one."""
    prov = records.provenance("", "cpu", torch.get_num_threads())
    info = {k: prov[k] for k in ("torch_version", "triton_version", "cuda_version", "threads")}
    info["device_names"] = {"cpu": prov["device_name"], **_cuda_names()}
    return f"{SEMANTICS} {json.dumps(info, sort_keys=True)}"


def class_name(family: str) -> str:
    """nll -> NLL, linear_ce -> LinearCE: asv names a benchmark losses.<class>.<method>."""
    return "".join(p.upper() if len(p) <= 3 else p.capitalize() for p in family.split("_"))


class FamilySuite:
    family = ""
    param_names = PARAM_NAMES
    version = ""              # version_info(), set per class
    timeout = 600.0          # one parameter set's process: torch.compile compiles in it (tens of seconds on a CPU)
    warmup_time = 0.0        # the first call is made when the Bench is built, outside any sample
    repeat = (5, 20, 5.0)    # samples per round: at least 5, at most 20, stop adding after 5 s
    rounds = 2               # asv's default: two processes per parameter set, interleaved

    def setup(self, impl: str, shape: str, dtype: str, device: str) -> None:
        self.bench = bench.get(self.family, impl, shape, dtype, device)
        self.bench.before_sample()

    def time_fwd_bwd(self, *params) -> None:
        self.bench.sample()

    def track_extra_mem_bytes(self, *params) -> float:
        return float(self.bench.memory().get("extra_mem_bytes", float("nan")))

    track_extra_mem_bytes.unit = "bytes"

    def track_err_vs_floor(self, *params) -> float:
        return float(self.bench.accuracy.err_vs_floor)

    track_err_vs_floor.unit = "x rounding floor"


def suites() -> dict[str, type]:
    """{class name: class}: NLL, CE, KL, LinearCE, each with its family's grid as asv params."""
    out = {}
    version = version_info()
    for family in FAMILIES:
        g = bench.grid(family)
        if not (g.impls and g.shapes):  # narrowed away by LOSSBENCH_IMPLS or LOSSBENCH_SHAPES
            continue
        name = class_name(family)
        out[name] = type(name, (FamilySuite,), {
            "family": family, "params": [g.impls, g.shapes, g.dtypes, g.devices], "version": version,
            "__module__": "benchmarks.losses", "__doc__": f"{FAMILIES[family].title}: {family} implementations",
        })
    return out
