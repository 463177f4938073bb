"""Adaptive timing of one callable on CPU or CUDA.

We do not use torch.utils.benchmark.Timer or triton.testing.do_bench: neither runs an
untimed setup before every sample, and we need one to rebuild the autograd graph before
timing backward alone and to restore inputs that an implementation overwrote in place.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..devices import synchronize
from .stats import median_ci, summarize

# Zero-filled between CUDA samples so no sample starts with its operands already in L2.
_L2_FLUSH_BUFFERS: dict[int, torch.Tensor] = {}


@dataclass
class TimingResult:
    samples_ms: list[float]  # raw timed samples, milliseconds, in order
    first_call_ms: float  # the very first (warm-up) call; includes torch.compile compilation
    converged: bool  # the CI criterion was met (False: budget or max_samples ran out first)

    def summary(self) -> dict:
        """summarize() fields plus first_call_ms and converged, ready for a results row."""
        return {
            **summarize(self.samples_ms),
            "first_call_ms": self.first_call_ms,
            "converged": self.converged,
        }


def _flush_l2(device: torch.device) -> None:
    index = device.index if device.index is not None else torch.cuda.current_device()
    buf = _L2_FLUSH_BUFFERS.get(index)
    if buf is None:
        # Some builds report 0: fall back to a 64 MiB guess rather than flush nothing.
        l2_bytes = torch.cuda.get_device_properties(index).L2_cache_size or 64 << 20
        buf = torch.empty(4 * l2_bytes, dtype=torch.uint8, device=torch.device("cuda", index))
        _L2_FLUSH_BUFFERS[index] = buf
    buf.zero_()



def _cpu_sampler(fn: Callable[[], object]) -> Callable[[], float]:
    def sample() -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return sample


def _cuda_sampler(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    # Events are reused: we synchronize after every sample, so neither is ever in flight twice.
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)

    def sample() -> float:
        stream = torch.cuda.current_stream(device)
        start.record(stream)
        fn()  # no host sync in here: only the kernels fn enqueues lie between the two events
        end.record(stream)
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)

    return sample


def _ci_converged(samples_ms: list[float], rel_ci: float) -> bool:
    low, high = median_ci(samples_ms)
    return (high - low) / 2.0 <= rel_ci * float(np.median(samples_ms))


def time_callable(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    setup: Callable[[], None] | None = None,
    budget_s: float = 1.0,
    min_samples: int = 5,
    max_samples: int = 10_000,
    rel_ci: float = 0.02,
    warmup: int = 2,
    flush_l2: bool = True,
) -> TimingResult:
    """Time ``fn()`` until the 95% CI of its median is within ``rel_ci`` of it, or the budget ends.

    Every call (warm-up and sample) is preceded by ``setup()``, which is never timed; on
    CUDA an L2 flush (if ``flush_l2``) also runs untimed between setup and the sample.
    At least ``min_samples`` samples are taken even over budget, never more than ``max_samples``.
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device type {device.type!r}")
    if warmup < 1:
        raise ValueError("warmup must be >= 1: the first call is reported as first_call_ms")
    if not 1 <= min_samples <= max_samples:
        raise ValueError(f"need 1 <= min_samples <= max_samples, got {min_samples}, {max_samples}")

    cuda = device.type == "cuda"
    with torch.cuda.device(device) if cuda else contextlib.nullcontext():
        sample = _cuda_sampler(fn, device) if cuda else _cpu_sampler(fn)

        gc.collect()
        first_call_ms = 0.0
        for i in range(warmup):
            if setup is not None:
                setup()
            synchronize(device)  # setup's queued GPU work must not count towards the first call
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            if i == 0:
                first_call_ms = (time.perf_counter() - t0) * 1e3

        samples: list[float] = []
        converged = False
        next_check = min_samples
        gc_was_enabled = gc.isenabled()
        gc.disable()  # as timeit does: a collection would land inside one sample
        try:
            t_start = time.perf_counter()
            while True:
                if setup is not None:
                    setup()
                if cuda and flush_l2:
                    _flush_l2(device)
                samples.append(sample())
                n = len(samples)
                if n < min_samples:
                    continue
                out_of_budget = time.perf_counter() - t_start >= budget_s
                if n >= next_check or out_of_budget or n == max_samples:
                    converged = _ci_converged(samples, rel_ci)
                    # A check is O(n): do it every sample while n is small, then every ~10% growth.
                    next_check = n + (1 if n < 30 else n // 10)
                if converged or out_of_budget or n == max_samples:
                    break
        finally:
            if gc_was_enabled:
                gc.enable()
    return TimingResult(samples_ms=samples, first_call_ms=first_call_ms, converged=converged)
