"""Achieved bandwidth: an analytic byte count per family and mode, over the measured time, and the
device's own copy bandwidth (measured once per run) to read it against.

The byte counts are what an ideal fused implementation must move, so gbps compares implementations
on the same yardstick. For fused cross-entropy fwd_bwd: the logits read once and the gradient written
once. An implementation that makes more passes shows a lower gbps; it is not charged for its own
traffic.
"""
from __future__ import annotations

import torch

from . import devices
from .cases import Case, Inputs
from .families import get_family


def bytes_moved(case: Case, inputs: Inputs, loss_numel: int, mode: str) -> int:
    """What an ideal fused implementation of the case's family reads and writes (Family.bytes_moved)."""
    return get_family(case.family).bytes_moved(inputs, loss_numel, mode)


# A working set must be this many times the device's largest cache for a rate to count: below it, written
# bytes can stay dirty in the cache when the timer stops (the copy that measures copy_gbps pays every
# write), and a rate above 100% of the copy bandwidth would follow.
CACHE_MULTIPLE = 4


def exceeds_cache(nbytes: int, device: str) -> bool:
    """Whether a working set of `nbytes` is large enough that its rate can be read against copy_gbps."""
    return nbytes >= CACHE_MULTIPLE * devices.cache_bytes(device)


def copy_gbps(device: str, nbytes: int = 256 * 2**20) -> float:
    """The device's copy bandwidth in GB/s (bytes read + bytes written per second), median of samples."""
    from .runners.stats import summarize
    from .runners.timing import time_callable

    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timing = time_callable(lambda: dst.copy_(src), device=device, budget_s=0.5, min_samples=5)
    median_s = summarize(timing.samples_ms)["time_median_ms"] / 1e3
    return 2 * nbytes / median_s / 1e9
