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
from dataclasses import dataclass, field

import numpy as np
import torch

from ..devices import cache_bytes, synchronize
from .stats import median_ci, summarize

# Between samples, so that no sample starts with its operands already in the cache:
# CUDA: a buffer of 4x the L2 is zero-filled; CPU: a buffer of 2x the last-level cache is read (a read
# leaves no dirty lines behind whose write-back would land in the next timed sample).
_FLUSH_BUFFERS: dict[str, torch.Tensor] = {}


@dataclass
class TimingResult:
    samples_ms: list[float]  # raw timed samples, milliseconds, in order
    first_call_ms: float  # the very first (warm-up) call; includes torch.compile compilation
    converged: bool  # the CI criterion was met (False: budget or max_samples ran out first)
    # Per sample, how long the untimed cache eviction just before it took (empty without cold_cache):
    # a fixed read of 2x the LLC (CPU) or a fill of 4x the L2 (CUDA), so the machine's memory speed
    # at that moment. On a shared host it drifts by 15-20% within seconds and slows every memory-bound
    # sample with it; `lossbench compare` adjusts each row's change for it (report/compare.py).
    evict_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        """summarize() fields plus first_call_ms and converged, ready for a results row."""
        return {
            **summarize(self.samples_ms),
            "first_call_ms": self.first_call_ms,
            "converged": self.converged,
        }


def flush_caches(device: torch.device) -> None:
    """Evict the device's caches (untimed): L2 on CUDA, the last-level cache on the CPU."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buf = _FLUSH_BUFFERS.get(str(device))
    if buf is None:
        multiple = 4 if device.type == "cuda" else 2
        buf = torch.zeros(multiple * cache_bytes(device) // 4, dtype=torch.float32, device=device)
        _FLUSH_BUFFERS[str(device)] = buf
    if device.type == "cuda":
        buf.zero_()
    else:
        buf.sum()



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


def one_sample(fn: Callable[[], object], setup: Callable[[], None] | None, device: torch.device | str,
               cold_cache: bool = True) -> tuple[float, float]:
    """One timed sample of ``fn()`` as time_callable takes them (setup, then eviction, both untimed):
    (ms, eviction ms). For paired rounds (runners/pairing.py), which alternate two callables."""
    device = torch.device(device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        sample = _cuda_sampler(fn, device) if device.type == "cuda" else _cpu_sampler(fn)
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        if cold_cache:
            flush_caches(device)
        synchronize(device)
        evict = (time.perf_counter() - t0) * 1e3
        return sample(), evict


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
    cold_cache: bool = True,
) -> TimingResult:
    """Time ``fn()`` until the 95% CI of its median is within ``rel_ci`` of it, or the budget ends.

    Every call (warm-up and sample) is preceded by ``setup()``, which is never timed; with
    ``cold_cache`` the device's caches are then evicted, untimed, before every sample (CPU and CUDA
    alike), so no sample reads what the previous one left in the cache.
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
            if cold_cache:  # as before a sample (and the eviction buffer is made here, untimed)
                flush_caches(device)
            synchronize(device)  # setup's queued GPU work must not count towards the first call
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            if i == 0:
                first_call_ms = (time.perf_counter() - t0) * 1e3

        samples: list[float] = []
        evict: list[float] = []
        converged = False
        next_check = min_samples
        gc_was_enabled = gc.isenabled()
        gc.disable()  # as timeit does: a collection would land inside one sample
        try:
            t_start = time.perf_counter()
            while True:
                if setup is not None:
                    setup()
                if cold_cache:
                    t0 = time.perf_counter()
                    flush_caches(device)
                    synchronize(device)
                    evict.append((time.perf_counter() - t0) * 1e3)
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
    return TimingResult(samples_ms=samples, first_call_ms=first_call_ms, converged=converged, evict_ms=evict)
