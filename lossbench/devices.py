"""Which devices exist, what they are called, and `--device` parsing."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from .errors import UsageError


def cuda_devices() -> list[str]:
    # device_count asks NVML first and makes no CUDA context (is_available may): asv's forkserver lists
    # the devices once and forks a process per benchmark, and a context made before a fork breaks CUDA
    # in the children.
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def best_device() -> str:
    cuda = cuda_devices()
    return cuda[0] if cuda else "cpu"


def resolve(spec: str | None) -> list[str]:
    """'cpu' | 'cuda' | 'cuda:N' | 'all' (comma-separated) -> concrete device names; default: the best one."""
    if not spec:
        return [best_device()]
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part == "cpu":
            found = ["cpu"]
        elif part == "all":
            found = ["cpu", *cuda_devices()]
        elif part == "cuda":
            found = cuda_devices()[:1]
            if not found:
                raise UsageError("device 'cuda' is not available: torch sees no CUDA device")
        elif part.startswith("cuda:") and part[5:].isdigit():
            if part not in cuda_devices():
                raise UsageError(f"device {part!r} is not available (CUDA devices: {', '.join(cuda_devices()) or 'none'})")
            found = [part]
        else:
            raise UsageError(f"unknown device {part!r}: use cpu, cuda, cuda:N or all")
        out += [d for d in found if d not in out]
    return out


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_bytes(device: str | torch.device) -> int:
    """The largest cache a working set can stay in between two calls: the L2 of a CUDA device, the
    last-level cache of the CPU (from sysfs; 32 MiB when the kernel does not say)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).L2_cache_size or 64 << 20  # some builds report 0
    return _cpu_last_level_cache()


@functools.cache
def _cpu_last_level_cache() -> int:
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            kind = (index / "type").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction" or not text:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1].upper(), 1)
        sizes.append(int(text.rstrip("KMGkmg")) * unit)
    return max(sizes, default=32 << 20)


def synchronize(device: str | torch.device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: str) -> None:
    """Between implementations: return cached blocks so one implementation's cache is not the next one's."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
