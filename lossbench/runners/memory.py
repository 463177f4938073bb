"""Peak memory of one call: absolute, extra over the state after set-up, and the analytic floor.

CUDA: the caching allocator's statistics. Peak statistics are reset after set-up, and the extra is
max_memory_allocated minus the bytes allocated at that moment; reserved bytes are reported too.

CPU: torch keeps no allocator statistics, tracemalloc does not see its allocations, and the
profiler's memory events come back empty. We read the kernel's own count of resident pages instead.
After set-up: garbage-collect, `malloc_trim(0)` (glibc hands freed pages back, so RSS equals live
memory), then reset the process's RSS high-water mark by writing 5 to /proc/self/clear_refs. The
call's extra peak is VmHWM minus that VmRSS. This is exact to a page, in the measuring process itself:
a fresh process per measurement would cost a torch import each time, and forcing every allocation
through mmap (the other exact route) would change what the timings measure. Pages that are
allocated but never touched cost nothing on a CPU and are not counted.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import os
from dataclasses import dataclass

import torch

from ..families import get_family
from ..inputs import Inputs
from ..devices import synchronize


@dataclass
class MemoryResult:
    peak_mem_bytes: int  # absolute peak during the call: the whole process's RSS on CPU
    extra_mem_bytes: int  # peak over the state after set-up (inputs, and the graph for bwd, included)
    reserved_mem_bytes: int | None  # CUDA: peak bytes the caching allocator held from the driver
    extra_mem_max_bytes: int | None = None  # the largest extra over measure_call's repeats


def _proc_status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024  # the kernel reports kB
    return values


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may then include freed-but-cached pages
        pass


@functools.cache
def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM" in _proc_status()
    except OSError:
        return False


class CpuProbe:
    def start(self) -> None:
        gc.collect()
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
        self.base = _proc_status()["VmRSS"]

    def stop(self) -> MemoryResult:
        peak = _proc_status()["VmHWM"]
        return MemoryResult(peak, max(peak - self.base, 0), None)


class CudaProbe:
    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        synchronize(self.device)
        gc.collect()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def stop(self) -> MemoryResult:
        synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return MemoryResult(peak, peak - self.base, torch.cuda.max_memory_reserved(self.device))


def probe_for(device: str | torch.device):
    device = torch.device(device)
    if device.type == "cuda":
        return CudaProbe(device)
    if not cpu_peak_supported():
        raise NotImplementedError("CPU peak memory needs Linux's /proc/self/clear_refs")
    return CpuProbe()


# The same call's CPU peak varies from call to call by whole tensors: eager KL at 2048x1000 peaks at
# 24, 32 or 40 MB over twelve identical calls in one process (one 8 MB temporary alive at the peak
# or not), with glibc's mmap threshold fixed too. One call per row would make memory verdicts cry
# wolf, so each row measures MEMORY_REPEATS calls: the smallest peak is the call's need (each is a
# real call: none can be under the floor), the largest its observed worst case.
MEMORY_REPEATS = 5


def measure_call(call, device: str | torch.device, repeats: int = MEMORY_REPEATS) -> MemoryResult:
    """Peak memory of a mode call (runners.calls.ModeCall) over `repeats` calls, each after its own
    set-up (untimed and unmeasured): the smallest extra, and the largest as extra_mem_max_bytes."""
    probe = probe_for(device)
    results = []
    for _ in range(repeats):
        call.setup()
        probe.start()
        call()
        results.append(probe.stop())
    best = min(results, key=lambda r: r.extra_mem_bytes)
    best.extra_mem_max_bytes = max(r.extra_mem_bytes for r in results)
    return best


PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def visible_bytes(nbytes: int, device: str | torch.device) -> int:
    """The least growth the device's memory counter must show for a new tensor of `nbytes`.
    CUDA's allocator counts every byte (rounded up). The CPU probe counts resident pages, and a new
    buffer may share up to two partly used pages (its first and last) with memory already resident,
    so a scalar loss can cost no new page at all: its floor there is nbytes - 2 pages, never below 0."""
    if torch.device(device).type == "cuda":
        return nbytes
    return max(0, nbytes - 2 * PAGE_BYTES)


def floor_bytes(family: str, inputs: Inputs, loss_shape: tuple[int, ...], mode: str, device: str | torch.device, *,
                grad_in_forward: bool = False, overwritten: tuple = ()) -> int:
    """What the implementation must allocate in this mode, as the device's memory counter sees it
    (the family states the bytes of its loss and of each gradient: Family.output_bytes):
    - fwd: the loss it returns;
    - bwd: the gradient of every differentiable input, except for implementations that compute the
      gradient in forward (grad_in_forward): theirs exists before bwd starts, so their bwd floor is 0
      and their gradient counts in fwd_bwd;
    - fwd_bwd: both.
    A gradient an implementation writes into the storage of an input it overwrites (`overwritten`:
    positions or names, as the accuracy call detected them; Liger writes into the logits) costs no new
    memory and is not counted."""
    loss_b, grad_b = get_family(family).output_bytes(inputs, torch.Size(loss_shape).numel())
    loss = visible_bytes(loss_b, device)
    grads = sum(visible_bytes(b, device) for k, b in grad_b.items() if k not in overwritten)
    bwd = 0 if grad_in_forward else grads
    return {"fwd": loss, "bwd": bwd, "fwd_bwd": loss + grads}[mode]
