"""What pytest-benchmark records of the machine, lossbench's part: tests/conftest.py puts machine_info()
under the JSON's machine_info["lossbench"], and importers/pytest_benchmark.py reads the provenance of
its rows from there."""
from __future__ import annotations

from typing import Any

import torch

from .. import devices, records

# The provenance fields that are the same for every device of the process.
SHARED = ("git_sha", "host", "torch_version", "triton_version", "cuda_version", "threads")


def machine_info() -> dict[str, Any]:
    """{devices: {device: device_name}, torch_version, triton_version, cuda_version, threads, git_sha, host}
    for the CPU and every CUDA device, the values records.provenance gives lossbench's own runs."""
    prov = records.provenance("", "cpu", torch.get_num_threads())
    names = {dev: devices.device_name(dev) for dev in ["cpu", *devices.cuda_devices()]}
    return {"devices": names, **{k: prov[k] for k in SHARED}}
