"""Sharded sweeps under torchrun: `torchrun --nproc-per-node K -m lossbench run ...` measures one run on K ranks.

Every rank builds the same plan and the same units; `assign` deals them out (longest processing time
first, on an estimate of each unit's cost), and each rank measures its share in its own process, on its
own device: the CPU, or cuda:LOCAL_RANK for a CUDA run. Units of `collective` implementations (they call
collectives, so every rank must make the same calls) are not dealt out: every rank runs all of them, in
the same order, after its share, and only rank 0's rows are kept.

Rank 0 alone writes the run (one run id, one file). The other ranks send each row to it as soon as it is
measured, over a gloo group of its own: the row's JSON as a uint8 tensor, after its length; a length of
zero says the rank is done. A receiver thread on rank 0 writes the rows as they arrive. A rank that dies
loses only its unfinished units: what it sent is written and fsynced, and --resume measures the rest.

Outside torchrun, `join` returns `Solo`: the same interface for one process, which does everything itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import heapq
import json
import os
import signal
import socket
import threading
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from . import devices as devices_mod
from . import records
from .errors import UsageError
from .registry import Implementation
from .sweep import Emit, Unit

TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Rows and control messages wait on the other ranks' measurements, which may take hours: gloo's default
# timeout (30 minutes) would end a healthy run. A dead rank is noticed at once (its sockets close).
PATIENCE = timedelta(days=7)
# Unit cost estimates (arbitrary units, bytes): a row's fixed cost (warm-up, the accuracy call, the
# sampling budget) as if it moved this many bytes, and how many times more a compiling implementation costs.
ROW_OVERHEAD_BYTES = 4 << 20
COMPILE_FACTOR = 10
_LENGTH_TAG, _ROW_TAG = 1, 2


def launched(environ=os.environ) -> bool:
    """Whether this process is one of several ranks started by torchrun."""
    return all(k in environ for k in TORCHRUN_ENV) and int(environ["WORLD_SIZE"]) > 1


# --- sharding: pure functions, the same on every rank ---------------------------------------------------

def input_bytes(unit: Unit) -> int:
    """The bytes of the unit's main inputs: the logits (N x C, x spatial), or hidden and weight for linear_ce."""
    case = unit.case
    size = torch.tensor([], dtype=case.torch_dtype).element_size()
    if case.h is not None:
        return size * (case.n * case.h + case.h * case.c)
    return size * case.n * case.c * max(int(case.options.get("spatial", 0) or 0), 1)


def cost(unit: Unit, impl: Implementation) -> int:
    """An estimate of the unit's measuring time: its bytes (plus a fixed cost per row) x its modes,
    x COMPILE_FACTOR for an implementation that compiles."""
    return len(unit.modes) * (input_bytes(unit) + ROW_OVERHEAD_BYTES) * (COMPILE_FACTOR if impl.compiles else 1)


def _stable_key(unit: Unit) -> str:
    return json.dumps([*records.key(unit.case, unit.impl, ""), list(unit.modes)])


def assign(units: list[Unit], impl_of: Callable[[Unit], Implementation], world_size: int) -> list[list[Unit]]:
    """Each rank's units, in plan order: the non-collective units dealt out longest processing time first
    (by cost, ties by a stable key; each to the least-loaded rank, ties to the lowest rank), then every
    collective unit, on every rank, in plan order."""
    order = {id(u): i for i, u in enumerate(units)}
    shared = [u for u in units if impl_of(u).collective]
    dealt = sorted((u for u in units if not impl_of(u).collective),
                   key=lambda u: (-cost(u, impl_of(u)), _stable_key(u)))
    loads = [(0, r) for r in range(world_size)]
    shares: list[list[Unit]] = [[] for _ in range(world_size)]
    for unit in dealt:
        load, r = heapq.heappop(loads)
        shares[r].append(unit)
        heapq.heappush(loads, (load + cost(unit, impl_of(unit)), r))
    return [sorted(share, key=lambda u: order[id(u)]) + shared for share in shares]


def planned_keys(keys: set[tuple], meta: dict[str, Any]) -> set[tuple]:
    """Row keys with each rank's device put back to the run's device it stood for (cuda:LOCAL_RANK ->
    the spec's CUDA device), so that a resumed sharded run finds its rows whatever rank measured them."""
    entries = [*meta.get("ranks", []), *(r for res in meta.get("resumes", []) for r in res.get("ranks", []))]
    planned = {physical: logical for e in entries for logical, physical in e.get("devices", {}).items()}
    at = records.KEY.index("device")
    return {k[:at] + (planned.get(k[at], k[at]),) + k[at + 1:] for k in keys}


# --- the ranks ---------------------------------------------------------------------------------------

class Solo:
    """One process measuring the whole run: what every method does when there are no other ranks."""

    rank, local_rank, world_size, main, distributed = 0, 0, 1, True, False

    def device(self, planned: str) -> str:
        """Where this rank measures the run's device `planned`."""
        return planned

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        return obj

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, by rank, on rank 0 (None elsewhere)."""
        return [obj]

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """fn() on rank 0 (None elsewhere); a UsageError it raises is raised on every rank."""
        return fn()

    def share(self, units: list[Unit], impl_of: Callable[[Unit], Implementation]) -> tuple[list[Unit], list[Unit]]:
        """This rank's own units, and the collective units every rank runs after them; on its devices."""
        return units, []

    def run_together(self, units: list[Unit], run: Callable[[Unit, Emit], None], emit: Emit) -> None:
        """The collective units, run by every rank alike (`share`'s second list)."""
        for unit in units:
            run(unit, emit)

    @contextlib.contextmanager
    def rows(self, write: Emit) -> Iterator[Emit]:
        """An emit for this rank's rows; on rank 0, `write` receives every rank's rows (one at a time)."""
        yield write

    def close(self) -> None:
        pass


class RankLost(Exception):
    """A rank stopped before saying it was done: its unfinished units are missing from the run."""


class Ranks(Solo):
    """This process as one rank of torchrun's job: the process group, the sharding and the rows' transport."""

    distributed = True

    def __init__(self, run_devices: list[str], environ=os.environ):
        self.rank, self.world_size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        self.local_rank = int(environ["LOCAL_RANK"])
        self.main = self.rank == 0
        cuda = [d for d in run_devices if d.startswith("cuda")]
        if len(cuda) > 1:
            raise UsageError(f"under torchrun each rank measures on its own GPU (cuda:LOCAL_RANK): give --device "
                             f"cuda or cpu, not {len(cuda)} CUDA devices ({', '.join(cuda)})")
        self._cuda = None
        if cuda:
            if self.local_rank >= torch.cuda.device_count():
                raise UsageError(f"rank {self.rank} has LOCAL_RANK {self.local_rank} but its host has "
                                 f"{torch.cuda.device_count()} CUDA devices: one rank per GPU")
            self._cuda = f"cuda:{self.local_rank}"
            torch.cuda.set_device(self._cuda)
        self._dist = dist
        # NCCL for CUDA tensors; gloo for CPU ones (a CPU run, and the CPU cases of a run with both).
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        dist.init_process_group(backend, timeout=PATIENCE,
                                device_id=torch.device(self._cuda) if self._cuda else None)
        self._control = dist.new_group(backend="gloo", timeout=PATIENCE)  # this thread's objects
        self._transport = dist.new_group(backend="gloo", timeout=PATIENCE)  # rows, rank 0's receiver thread
        # torchrun stops the other ranks with SIGTERM when one fails: end as an interrupted run, rows kept.
        self._sigterm = signal.getsignal(signal.SIGTERM)
        if _on_main_thread():
            signal.signal(signal.SIGTERM, _interrupt)

    def device(self, planned: str) -> str:
        return self._cuda if planned.startswith("cuda") else planned

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        out = [None] * self.world_size if self.main else None
        self._dist.gather_object(obj, out, dst=0, group=self._control)
        return out

    def on_main(self, fn: Callable[[], Any]) -> Any:
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except UsageError as exc:
                error = str(exc)
        error = self.broadcast(error)
        if error is not None:
            raise UsageError(error if self.main else f"rank 0: {error}")
        return result

    def share(self, units: list[Unit], impl_of: Callable[[Unit], Implementation]) -> tuple[list[Unit], list[Unit]]:
        own = assign(units, impl_of, self.world_size)[self.rank]
        return ([self._here(u) for u in own if not impl_of(u).collective],
                [self._here(u) for u in own if impl_of(u).collective])

    def _here(self, unit: Unit) -> Unit:
        device = self.device(unit.case.device)
        if device == unit.case.device:
            return unit
        return dataclasses.replace(unit, case=dataclasses.replace(unit.case, device=device))

    def run_together(self, units: list[Unit], run: Callable[[Unit, Emit], None], emit: Emit) -> None:
        """Every rank runs every collective unit, in the same order; only rank 0's rows are written, and only
        once every rank is through the unit (a rank that died in it would otherwise leave error rows that
        --resume takes for measured)."""
        if units:
            self._wait_for_all()  # no rank waits inside a collective (and its timeout) for one still on its share
        for unit in units:
            rows: list[dict[str, Any]] = []
            run(unit, rows.append)
            self._wait_for_all()
            for row in rows if self.main else ():
                emit(row)

    def _wait_for_all(self) -> None:
        try:
            self._dist.barrier(group=self._control)
        except Exception as exc:  # a rank died: its sockets closed
            raise RankLost(f"a rank stopped before the collective units were through ({_first_line(exc)})") from None

    @contextlib.contextmanager
    def rows(self, write: Emit) -> Iterator[Emit]:
        if not self.main:
            try:
                yield self._send
            finally:  # done, even after an error: rank 0 would wait for this rank otherwise
                with contextlib.suppress(Exception):  # rank 0 is gone: nobody to tell
                    self._dist.send(torch.zeros(1, dtype=torch.int64), dst=0, group=self._transport,
                                    tag=_LENGTH_TAG)
            return
        receiver = _Receiver(self._dist, self._transport, self.world_size, write)
        try:
            yield receiver.write
            receiver.finish()  # every other rank's rows
        finally:
            receiver.stop()

    def _send(self, row: dict[str, Any]) -> None:
        data = json.dumps(row).encode()
        self._dist.send(torch.tensor([len(data)], dtype=torch.int64), dst=0, group=self._transport, tag=_LENGTH_TAG)
        self._dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=0, group=self._transport,
                        tag=_ROW_TAG)

    def close(self) -> None:
        if _on_main_thread() and self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


class _Receiver:
    """Rank 0's receiver thread: writes the other ranks' rows as they arrive, one at a time with rank 0's own."""

    def __init__(self, dist, group, world_size: int, write: Emit):
        self._dist, self._group, self._write = dist, group, write
        self._lock = threading.Lock()
        self._stopped = False
        self.error: str | None = None
        self._waiting = set(range(1, world_size))
        self._thread = threading.Thread(target=self._run, name="lossbench-rows", daemon=True)
        self._thread.start()

    def write(self, row: dict[str, Any]) -> None:
        with self._lock:
            if not self._stopped:
                self._write(row)

    def _run(self) -> None:
        length = torch.zeros(1, dtype=torch.int64)
        try:
            while self._waiting:
                src = self._dist.recv(length, group=self._group, tag=_LENGTH_TAG)
                n = int(length.item())
                if n == 0:
                    self._waiting.discard(src)
                    continue
                buf = torch.empty(n, dtype=torch.uint8)
                self._dist.recv(buf, src=src, group=self._group, tag=_ROW_TAG)
                self.write(json.loads(bytes(buf.numpy())))
        except Exception as exc:  # a rank died: its sockets closed
            self.error = _first_line(exc)

    def finish(self) -> None:
        """Wait until every other rank has said done (interruptible: a join with a timeout, in a loop)."""
        while self._thread.is_alive():
            self._thread.join(0.2)
        if self._waiting:
            ranks = ", ".join(map(str, sorted(self._waiting)))
            raise RankLost(f"rank{'s' if len(self._waiting) > 1 else ''} {ranks} stopped before finishing"
                           + (f" ({self.error})" if self.error else ""))

    def stop(self) -> None:
        """No row is written after this (the run file is about to be closed)."""
        with self._lock:
            self._stopped = True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def join(run_devices: list[str]) -> Solo:
    """torchrun's process group when this process is one of its ranks; otherwise Solo()."""
    return Ranks(run_devices) if launched() else Solo()


def rank_entry(ranks: Solo, planned_devices: list[str]) -> dict[str, Any]:
    """What the run's meta records about one rank: where it ran, and which device stood for each of the run's."""
    return {"rank": ranks.rank, "local_rank": ranks.local_rank, "host": socket.gethostname(),
            "devices": {d: ranks.device(d) for d in planned_devices},
            "device_names": {d: devices_mod.device_name(ranks.device(d)) for d in planned_devices}}
