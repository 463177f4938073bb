"""`--device all` on a machine with several GPUs: every CUDA device measured at once, one worker per device.

The units are split into lanes by device. Each CUDA device's lane runs in its own thread, driving its
own worker process (runners.isolation), so the devices measure side by side; a device whose worker
crashes or hangs costs its own units' rows (crash/timeout rows, as always), never another device's.
The CPU's units run after every GPU lane is done, alone: GPU workers' host threads would otherwise take
CPU time from the CPU's samples. With one CUDA device or none, everything is one lane, as before.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from .sweep import Emit, Unit

Measure = Callable[[Any, Unit, Emit], None]  # (runner, unit, emit): measure one unit with that lane's runner


def split(units: list[Unit]) -> tuple[list[list[Unit]], list[Unit]]:
    """(the CUDA devices' lanes, run at once when there are two or more; the units run after them)."""
    by_device: dict[str, list[Unit]] = {}
    for unit in units:
        by_device.setdefault(unit.case.device, []).append(unit)
    cuda = [lane for device, lane in by_device.items() if device.startswith("cuda")]
    if len(cuda) < 2:
        return [], units
    return cuda, [u for u in units if not u.case.device.startswith("cuda")]


def run_concurrently(lanes: list[list[Unit]], make_runner: Callable[[], Any], measure: Measure, emit: Emit) -> None:
    """Each lane in its own thread with its own runner (closed at the end). `emit` may be called from any
    of them at once: it is serialised here. A lane that fails stops alone; the first failure is raised once
    every lane has ended. Ctrl-C stops every lane after its current unit and is raised here."""
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[BaseException] = []

    def locked_emit(row: dict) -> None:
        with lock:
            emit(row)

    def drive(lane: list[Unit]) -> None:
        runner = make_runner()
        try:
            for unit in lane:
                if stop.is_set():
                    return
                measure(runner, unit, locked_emit)
        except BaseException as exc:  # a harness fault in this lane: the others go on
            failures.append(exc)
        finally:
            close = getattr(runner, "close", None)
            if close:
                close()

    threads = [threading.Thread(target=drive, args=(lane,), name=f"lane-{lane[0].case.device}", daemon=True)
               for lane in lanes if lane]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)  # joining in slices keeps Ctrl-C deliverable to this thread
    except KeyboardInterrupt:
        stop.set()
        for t in threads:
            t.join()
        raise
    if failures:
        raise failures[0]
