"""Which devices exist, what they are called, and `--device` parsing."""
from __future__ import annotations

import platform

import torch

from .errors import UsageError


def cuda_devices() -> list[str]:
    if not torch.cuda.is_available():
        return []
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


def synchronize(device: str | torch.device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: str) -> None:
    """Between implementations: return cached blocks so one implementation's cache is not the next one's."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
