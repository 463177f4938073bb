"""`--device all` with several CUDA devices (lossbench/lanes.py): each device's units in its own lane, the
lanes at once, a failing device costing only its own rows, the CPU after them. No GPU is needed: the
runners here are stand-ins that record when and where each unit ran."""
import threading
import time

import pytest

from lossbench import lanes
from lossbench.cases import Case
from lossbench.sweep import Unit


def _units(device, n):
    return [Unit(Case.make("ce", 8, 10 + i, "float32", device), "torch_functional", ("fwd_bwd",)) for i in range(n)]


class FakeRunner:
    log: list = []
    broken: set = set()

    def __init__(self):
        self.closed = False

    def run(self, unit, emit):
        start = time.perf_counter()
        if unit.case.device in self.broken:
            raise RuntimeError(f"{unit.case.device} is gone")
        time.sleep(0.2)
        emit({"device": unit.case.device, "c": unit.case.c})
        self.log.append((unit.case.device, threading.current_thread().name, start, time.perf_counter()))

    def close(self):
        self.closed = True


def _measure(runner, unit, emit):
    runner.run(unit, emit)


@pytest.fixture(autouse=True)
def fresh():
    FakeRunner.log, FakeRunner.broken = [], set()


def test_split_puts_each_cuda_device_in_a_lane_and_the_cpu_after():
    cpu, c0, c1 = _units("cpu", 2), _units("cuda:0", 3), _units("cuda:1", 3)
    at_once, after = lanes.split(cpu[:1] + c0 + c1 + cpu[1:])
    assert at_once == [c0, c1] and after == cpu
    # one CUDA device (or none): one lane, the order kept, nothing at once
    assert lanes.split(cpu + c0) == ([], cpu + c0)


def test_lanes_run_at_once_and_every_unit_once():
    at_once, _ = lanes.split(_units("cuda:0", 3) + _units("cuda:1", 3))
    rows, runners = [], []

    def make():
        runners.append(FakeRunner())
        return runners[-1]

    t0 = time.perf_counter()
    lanes.run_concurrently(at_once, make, _measure, rows.append)
    wall = time.perf_counter() - t0
    assert sorted((r["device"], r["c"]) for r in rows) == sorted(
        (d, 10 + i) for d in ("cuda:0", "cuda:1") for i in range(3))
    assert len(runners) == 2 and all(r.closed for r in runners)
    # side by side: the two devices' units overlap in time, and the whole takes about one lane's time
    threads = {(d, name) for d, name, _, _ in FakeRunner.log}
    assert len({name for _, name in threads}) == 2
    a = [(s, e) for d, _, s, e in FakeRunner.log if d == "cuda:0"]
    b = [(s, e) for d, _, s, e in FakeRunner.log if d == "cuda:1"]
    assert any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)
    assert wall < 1.0  # 6 units of 0.2 s one after another would take 1.2 s


def test_a_failing_device_costs_only_its_own_rows():
    FakeRunner.broken = {"cuda:1"}
    at_once, _ = lanes.split(_units("cuda:0", 3) + _units("cuda:1", 3))
    rows = []
    with pytest.raises(RuntimeError, match="cuda:1 is gone"):
        lanes.run_concurrently(at_once, FakeRunner, _measure, rows.append)
    assert sorted(r["c"] for r in rows if r["device"] == "cuda:0") == [10, 11, 12]
    assert not [r for r in rows if r["device"] == "cuda:1"]


def test_emit_is_serialised():
    at_once, _ = lanes.split(_units("cuda:0", 4) + _units("cuda:1", 4) + _units("cuda:2", 4))
    inside, overlaps, rows = [0], [], []

    def emit(row):
        inside[0] += 1
        overlaps.append(inside[0])
        time.sleep(0.01)
        rows.append(row)
        inside[0] -= 1

    lanes.run_concurrently(at_once, FakeRunner, _measure, emit)
    assert len(rows) == 12 and max(overlaps) == 1
