"""pytest-benchmark over lossbench's registry: every family's grid (integrations.bench.grid), one test per
family x impl x shape x dtype x device, a sample as integrations.bench defines it.

    pytest --benchmark-only tests/test_benchmarks.py --benchmark-json out.json   # timed: ROUNDS samples each
    pytest --benchmark-disable tests/test_benchmarks.py                          # one untimed call each (make test)

Each benchmark's extra_info holds lossbench's columns (case, memory, accuracy, first_call_ms, the samples
in milliseconds and the eviction time before each), so that importers/pytest_benchmark.py turns the JSON
into lossbench rows; conftest.py adds the provenance under machine_info["lossbench"].
The grid is widened as for asv: LOSSBENCH_SHAPES, LOSSBENCH_DTYPES, LOSSBENCH_DEVICES, LOSSBENCH_PLUGIN.
"""
from __future__ import annotations

import os

import pytest

from lossbench import registry
from lossbench.families import FAMILIES
from lossbench.integrations import bench

ENV_ROUNDS = "LOSSBENCH_ROUNDS"


def _rounds() -> int:
    value = os.environ.get(ENV_ROUNDS, "").strip() or "15"
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{ENV_ROUNDS}={value!r}: expected a positive number of timed samples")
    return int(value)


ROUNDS = _rounds()


def _params() -> list:
    out = []
    for family in FAMILIES:
        g = bench.grid(family)
        for impl in g.impls:
            for shape in g.shapes:
                for dtype in g.dtypes:
                    for device in g.devices:
                        # One group per case: pytest-benchmark's table then ranks the implementations of a case.
                        marks = [pytest.mark.benchmark(group=f"{family}-{shape}-{dtype}-{device}")]
                        # An implementation that compiles (torch.compile: ~15 s for inductor's first
                        # compilation with a cold cache) runs in the slow tier only.
                        if registry.get(family, impl).compiles:
                            marks.append(pytest.mark.slow)
                        out.append(pytest.param(family, impl, shape, dtype, device,
                                                id=f"{family}-{impl}-{shape}-{dtype}-{device}", marks=marks))
    return out


@pytest.mark.parametrize(("family", "impl", "shape", "dtype", "device"), _params())
def test_fwd_bwd(benchmark, family, impl, shape, dtype, device):
    try:
        b = bench.get(family, impl, shape, dtype, device)
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    first = len(b.evict_ms)
    # setup runs before every round, outside the timer: one eviction per timed sample. Disabled
    # (--benchmark-disable), pedantic makes one untimed call and records nothing.
    benchmark.pedantic(b.sample, setup=b.before_sample, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    info = benchmark.extra_info
    info.update(b.case_fields(), device=device)  # device: a provenance column, not among the case's
    info["first_call_ms"] = b.first_call_ms
    info["compiles"] = b.impl.compiles  # the importer's compile_ms, as lossbench's runs report it
    if benchmark.stats is not None:
        raw_ms = [s * 1e3 for s in benchmark.stats.stats.data]  # seconds per call (iterations=1)
        evict_ms = b.evict_ms[first:]
        assert len(evict_ms) == len(raw_ms) == ROUNDS, (len(evict_ms), len(raw_ms))
        info["raw_ms"], info["evict_ms"] = raw_ms, evict_ms
    # After the timing: the memory probe and the accuracy call run the implementation again.
    info.update(b.memory())
    info.update(b.accuracy_fields())
