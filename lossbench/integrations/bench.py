"""One implementation on one case, timed by another tool's timer (asv, pytest-benchmark) with lossbench's
semantics, and the grid of cases those tools sweep.

What a sample is, whoever holds the stopwatch:
- before it (untimed): the inputs are restored from a pristine copy, so an implementation that writes
  into its inputs (Liger writes the gradient into the logits) is never timed on data it overwrote;
  gradients are cleared; the device's caches are evicted; the device is synchronised;
- the sample: forward + backward (fwd_bwd, what a training step pays), then a device synchronisation,
  so that on CUDA the sample ends when the kernels do, not when they were queued.
A tool's wall clock then includes the launch overhead that lossbench's own CUDA timer (events) leaves
out: on a GPU the numbers of the two differ by a few microseconds per call.
The first call (torch.compile's compilation) is made when a Bench is built, never inside a sample.
Memory comes from lossbench's probe and accuracy from its float64 reference, the same as in its runs.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch

from .. import devices, records, reference, registry
from ..cases import Case, make_inputs, parse_dtype, parse_shape
from ..errors import UsageError
from ..families import FAMILIES
from ..runners import accuracy, memory
from ..runners.calls import ModeCall
from ..runners.timing import flush_caches

MODE = "fwd_bwd"
# The default grid: each family's default_shape (the quick suite's small case; a full `asv run` of it:
# 7.5 min on 2 cores).
DTYPES = ["float32", "bfloat16"]
# What a user sets to widen the grid or add implementations; asv's and pytest's processes both read them.
ENV_PLUGIN = "LOSSBENCH_PLUGIN"   # modules or .py files, separated by os.pathsep (':')
ENV_SHAPES = "LOSSBENCH_SHAPES"   # comma-separated, as --shape: NxC, or NxHxV for linear_ce
ENV_DTYPES = "LOSSBENCH_DTYPES"   # comma-separated dtype names
ENV_DEVICES = "LOSSBENCH_DEVICES"  # as --device: cpu, cuda, cuda:N, all (default: cpu and every CUDA device)
ENV_IMPLS = "LOSSBENCH_IMPLS"     # comma-separated implementation names (default: every registered one)


def _env_list(name: str, sep: str = ",") -> list[str] | None:
    value = os.environ.get(name, "").strip()
    return [v.strip() for v in value.split(sep) if v.strip()] or None


def load_plugins() -> None:
    for spec in _env_list(ENV_PLUGIN, os.pathsep) or []:
        registry.load_plugin(spec)


@dataclass(frozen=True)
class Grid:
    """What one family is swept over: the tools' parameters (asv params, pytest ids)."""
    family: str
    impls: list[str]
    shapes: list[str]
    dtypes: list[str]
    devices: list[str]


def grid(family: str) -> Grid:
    """The family's grid: every registered implementation (plugins from LOSSBENCH_PLUGIN included), the
    shapes and dtypes of the environment or the defaults, and CPU plus every CUDA device there is."""
    load_plugins()
    fam = FAMILIES[family]
    shapes = _env_list(ENV_SHAPES) or [fam.default_shape]
    shapes = [s for s in shapes if len(parse_shape(s)) == fam.shape_dims]
    dtypes = _env_list(ENV_DTYPES) or DTYPES
    for d in dtypes:
        parse_dtype(d)  # an unknown dtype is a UsageError naming it
    devs = devices.resolve(os.environ.get(ENV_DEVICES) or "all")  # makes no CUDA context (devices.cuda_devices)
    impls = [i.name for i in registry.implementations(family)]
    wanted = _env_list(ENV_IMPLS)
    if wanted:
        known = {i.name for i in registry.implementations()}
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise UsageError(f"{ENV_IMPLS}: unknown implementation {unknown[0]!r} (known: {', '.join(sorted(known))})")
        impls = [i for i in impls if i in wanted]
    return Grid(family, impls, shapes, dtypes, devs)


class Bench:
    """A prepared fwd_bwd call of `impl` on the family's default case at (shape, dtype, device).

    Raises NotImplementedError (asv skips the parameter, the pytest benchmark is skipped) when the
    implementation declares the case unsupported or says so on its first call."""

    def __init__(self, family: str, impl: str, shape: str, dtype: str, device: str):
        self.impl = registry.get(family, impl)
        self.case = Case.from_shape(family, parse_shape(shape), dtype, device)
        reason = self.impl.why_unsupported(self.case) or _interpreted(self.impl, device)
        if reason:
            raise NotImplementedError(reason)
        self.device = torch.device(device)
        self.pristine = make_inputs(self.case)
        self.call = ModeCall(self.impl.fn, self.pristine, MODE, fresh_inputs=True)
        self.evict_ms: list[float] = []
        self.before_sample()
        t0 = time.perf_counter()
        self.sample()  # the first call: compilation, lazy initialisation
        self.first_call_ms = (time.perf_counter() - t0) * 1e3

    def before_sample(self) -> None:
        """Untimed: fresh inputs, no gradients, cold caches, an idle device. The eviction's own time is
        kept (evict_ms): `lossbench compare` paces CPU samples by it (report/compare.py)."""
        self.call.setup()
        t0 = time.perf_counter()
        flush_caches(self.device)
        devices.synchronize(self.device)
        self.evict_ms.append((time.perf_counter() - t0) * 1e3)

    def sample(self) -> None:
        self.call()
        devices.synchronize(self.device)

    def memory(self) -> dict:
        """extra_mem_bytes (the call's peak over its inputs, the smallest of memory.MEMORY_REPEATS calls),
        extra_mem_max_bytes and the analytic floor min_mem_bytes; empty where the platform has no probe."""
        floor = memory.floor_bytes(self.case.family, self.pristine, tuple(self.reference.loss.shape), MODE, self.case.device,
                                   grad_in_forward=self.impl.grad_in_forward, overwritten=self.accuracy.mutated)
        try:
            mem = memory.measure_call(self.call, self.case.device)
        except NotImplementedError:
            return {"min_mem_bytes": floor}
        return {"extra_mem_bytes": mem.extra_mem_bytes, "extra_mem_max_bytes": mem.extra_mem_max_bytes,
                "peak_mem_bytes": mem.peak_mem_bytes, "min_mem_bytes": floor}

    @functools.cached_property
    def reference(self) -> reference.Reference:
        return reference.compute(self.case.family, self.pristine)

    @functools.cached_property
    def accuracy(self) -> accuracy.AccuracyResult:
        return accuracy.measure(self.impl.fn, self.pristine, self.reference, self.case.dtype)

    def accuracy_fields(self) -> dict:
        a = self.accuracy
        return {"loss_rel_err": a.loss_rel_err, "grad_rel_err": a.grad_rel_err,
                "grad_row_err_max": a.grad_row_err_max, "grad_max_abs_err": a.grad_max_abs_err,
                "err_vs_floor": a.err_vs_floor, "accuracy_ok": a.accuracy_ok, "accuracy_note": a.note,
                "mutates_inputs": a.mutates_inputs or self.impl.mutates_inputs}

    def case_fields(self) -> dict:
        """The row's case columns, as records.row writes them for lossbench's own runs."""
        row = records.row({}, self.case, self.impl.name, MODE, grad_in_forward=self.impl.grad_in_forward,
                          convention=self.impl.convention_for(self.case))
        return {k: row[k] for k in (*records.CASE, "grad_in_forward", "convention")}


def _interpreted(impl: registry.Implementation, device: str) -> str | None:
    """Triton kernels on the CPU run under Triton's interpreter (the tests set TRITON_INTERPRET=1): its
    time is numpy's, not a kernel's, and a 2048-row case takes minutes."""
    if device == "cpu" and impl.triton and os.environ.get("TRITON_INTERPRET") == "1":
        return f"{impl.name} on the CPU would run under Triton's interpreter (TRITON_INTERPRET=1): not timed"
    return None


_BENCHES: dict[tuple, Bench | BaseException] = {}


def get(family: str, impl: str, shape: str, dtype: str, device: str) -> Bench:
    """One Bench per parameter set and process: asv re-runs its setup before every sample, and building a
    Bench (inputs, the first call's compilation) must happen once. A failure is remembered and re-raised."""
    key = (family, impl, shape, dtype, device)
    if key not in _BENCHES:
        _BENCHES.clear()  # one case's tensors alive at a time
        try:
            _BENCHES[key] = Bench(*key)
        except UsageError as exc:
            _BENCHES[key] = NotImplementedError(str(exc))
        except BaseException as exc:
            _BENCHES[key] = exc
    found = _BENCHES[key]
    if isinstance(found, BaseException):
        raise found
    return found
