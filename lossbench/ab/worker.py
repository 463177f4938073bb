"""One side's worker of `lossbench ab`: run by path, with the side's python, in the side's directory.

It imports `lossbench` from the side's checkout when that has one (the side's directory comes first on
PYTHONPATH), else the side's python's installed lossbench: so two commits of lossbench, or two commits
of a user's plugin under one lossbench, can be set against each other. This file is the driver's and is
never imported from the side; it uses only lossbench modules that every side must have (plan, sweep,
inputs, timing's cache eviction).

Requests and replies are JSON lines on two pipes (file descriptors in LOSSBENCH_AB_FDS), so that
whatever the side prints (torch, inductor, a plugin) cannot garble them:
  init {spec, run_id, side, git_sha}   -> {units, lossbench, provenance}
  prepare {unit}                        -> {rows}   accuracy, memory and status of the unit, untimed calls
                                                   warmed up for each mode that ran
  calls {unit, mutates}                 -> {}       a later pass: the unit's calls only, warmed up
  refresh                               -> {}       the unit's calls rebuilt on fresh copies of the inputs
  sample {mode}                         -> {ms, evict_ms}   one timed sample, caches evicted before it
  quit
Every reply is {"ok": ...} or {"error": one line, "usage": true when it is the user's input}.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback


def _send(out, payload: dict) -> None:
    out.write(json.dumps(payload) + "\n")
    out.flush()


class _Side:
    def __init__(self, init: dict):
        import torch

        from lossbench import bandwidth, records, run, sweep

        spec = init["spec"]
        self.torch = torch
        torch.set_num_threads(spec["threads"])
        plan, impls = run.plan_of(spec)  # loads the side's plugins: UsageError when one fails
        self.units = {}
        for unit in sweep.units(plan, lambda fam: impls[fam]):
            self.units[_unit_key(unit)] = unit
        self.provs = {}
        for device in spec["devices"]:
            prov = records.provenance(init["run_id"], device, spec["threads"])
            # The side's commit, whichever checkout lossbench itself was imported from.
            prov["git_sha"] = init["git_sha"]
            prov["copy_gbps"] = bandwidth.copy_gbps(device)
            self.provs[device] = prov
        try:  # no rounds against torch_functional: the driver replaces the timing anyway
            self.runner = sweep.UnitRunner(self.provs.__getitem__, budget_s=0.0, paired=False)
        except TypeError:  # a lossbench from before paired rounds
            self.runner = sweep.UnitRunner(self.provs.__getitem__, budget_s=0.0)
        self.calls, self.pristine = {}, None

    def describe(self) -> dict:
        import lossbench

        return {"units": [_unit_json(u) for u in self.units.values()], "lossbench": lossbench.__file__,
                "provenance": self.provs}

    def prepare(self, unit_json: dict) -> dict:
        unit = self.units[_key_of_json(unit_json)]
        self.calls, self.pristine = {}, None  # the previous unit's tensors freed first
        gc.collect()
        rows = []
        # The side's own sweep: accuracy, memory and status, with its own few unpaired samples (the
        # driver replaces the timing with the paired samples).
        self.runner.run(unit, rows.append)
        self.calls_for(unit_json, {r["mode"]: bool(r.get("mutates_inputs")) for r in rows if r["status"] == "ok"})
        return {"rows": rows}

    def calls_for(self, unit_json: dict, mutates: dict) -> dict:
        """The unit's calls, per mode that ran (a later pass: the rows are the first pass's)."""
        from lossbench.cases import make_inputs

        self.unit = self.units[_key_of_json(unit_json)]
        self.mutates = mutates
        self.calls, self.pristine = {}, None
        # One full collection, then the survivors frozen (as the sweep does per case): refresh collects
        # before every block, and in a fresh process (a later pass) a full collection of torch's
        # long-lived objects took 0.24 s per block and side, a third of the blocks the budget allowed.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.pristine = make_inputs(self.unit.case) if mutates else None
        return self.refresh()

    def refresh(self) -> dict:
        """The unit's calls made anew: fresh copies of the inputs, at new addresses (a block of rounds
        starts with this on both sides, so that where the buffers landed is not one side's luck)."""
        from lossbench.registry import get
        from lossbench.runners.calls import ModeCall

        self.calls = {}
        gc.collect()
        if self.mutates:
            impl = get(self.unit.case.family, self.unit.impl)
            for mode, mutates in self.mutates.items():
                call = ModeCall(impl.fn, self.pristine, mode, fresh_inputs=mutates)  # clones: new addresses
                for _ in range(2):  # warm-up: the runner already compiled; caches and allocator settle
                    call.setup()
                    call()
                self.calls[mode] = (call, self.unit.case.device)
        return {}

    def sample(self, mode: str) -> dict:
        from lossbench.devices import synchronize
        from lossbench.runners.timing import flush_caches

        call, device = self.calls[mode]
        dev = self.torch.device(device)
        call.setup()
        t0 = time.perf_counter()
        flush_caches(dev)
        synchronize(dev)
        evict_ms = (time.perf_counter() - t0) * 1e3
        enabled = gc.isenabled()
        gc.disable()  # a collection would land inside the sample
        try:
            if dev.type == "cuda":
                with self.torch.cuda.device(dev):  # events on that device's current stream
                    start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
                    start.record()
                    call()
                    end.record()
                    synchronize(dev)
                    ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                call()
                ms = (time.perf_counter() - t0) * 1e3
        finally:
            if enabled:
                gc.enable()
        return {"ms": ms, "evict_ms": evict_ms}


# The driver keys units the same way (session._unit_id); this file cannot import the driver's package,
# which need not be the lossbench the side runs.
def _unit_key(unit) -> str:
    import dataclasses

    return json.dumps([dataclasses.asdict(unit.case), unit.impl, list(unit.modes)], sort_keys=True)


def _unit_json(unit) -> dict:
    import dataclasses

    return {"case": dataclasses.asdict(unit.case), "impl": unit.impl, "modes": list(unit.modes)}


def _key_of_json(u: dict) -> str:
    return json.dumps([u["case"], u["impl"], u["modes"]], sort_keys=True)


def main() -> int:
    fd_in, fd_out = (int(x) for x in os.environ["LOSSBENCH_AB_FDS"].split(","))
    inp, out = os.fdopen(fd_in, "r"), os.fdopen(fd_out, "w")
    side = None
    for line in inp:
        req = json.loads(line)
        op = req.get("op")
        if op == "quit":
            break
        try:
            if op == "init":
                try:
                    side = _Side(req)
                except ImportError as exc:
                    _send(out, {"error": f"its lossbench cannot run ab's worker ({exc})", "usage": True})
                    continue
                reply = side.describe()
            elif op == "prepare":
                reply = side.prepare(req["unit"])
            elif op == "calls":
                reply = side.calls_for(req["unit"], req["mutates"])
            elif op == "refresh":
                reply = side.refresh()
            elif op == "sample":
                reply = side.sample(req["mode"])
            else:
                reply = {"error": f"unknown request {op!r}"}
                _send(out, reply)
                continue
            _send(out, {"ok": reply})
        except Exception as exc:  # noqa: BLE001 - every failure is a reply; the driver decides
            usage = type(exc).__name__ == "UsageError"
            text = str(exc).strip().splitlines()
            _send(out, {"error": f"{'' if usage else type(exc).__name__ + ': '}{text[0] if text else ''}",
                        "usage": usage, "traceback": "" if usage else traceback.format_exc()})
    # Run by path, outside the package: no relative import of exit_codes (its OK is 0).
    return 0


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if os.path.abspath(p) != os.path.dirname(os.path.abspath(__file__))]
    sys.exit(main())
