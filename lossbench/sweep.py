"""The sweep, cut into units: one implementation on one case, in the modes the plan asks for.

A unit is what fails alone. `UnitRunner.run` executes it in the current process (a worker, under
runners.isolation, or the CLI itself with --in-process): one accuracy call (which also detects writes
into inputs), then per mode a timing and a peak-memory call, each emitted as a row.
Per case the float64 reference and torch_functional's accuracy (the yardstick for
err_ratio_vs_torch, even when --impl leaves it out) are computed once and kept while that case's
units run.
"""
from __future__ import annotations

import gc
import math
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from . import bandwidth, devices, records, reference
from .cases import Case, Inputs, make_inputs
from .registry import BASELINE, Implementation, get
from .runners import accuracy, memory, pairing, stats
from .runners.calls import ModeCall
from .runners.timing import TimingResult, one_sample, time_callable
from .suites import Plan

Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Unit:
    case: Case
    impl: str
    modes: tuple[str, ...]


def units(plan: Plan, impls_for: Callable[[str], list[Implementation]],
          done: Iterable[tuple] = ()) -> Iterator[Unit]:
    """The plan's units, less the (case, impl, mode) rows already in `done` (keys from records.key)."""
    done = set(done)
    for case, modes in plan.items:
        for impl in impls_for(case.family):
            missing = tuple(m for m in modes if records.key(case, impl.name, m) not in done)
            if missing:
                yield Unit(case, impl.name, missing)


def impl_rows(prov: dict[str, Any], case: Case, impl: Implementation, modes: Iterable[str],
              **fields: Any) -> Iterator[dict[str, Any]]:
    """Rows for `impl` on `case`, one per mode, with what it declares about itself filled in."""
    for mode in modes:
        yield records.row(prov, case, impl.name, mode, grad_in_forward=impl.grad_in_forward,
                          convention=impl.convention_for(case), **fields)


def status_of(exc: BaseException) -> str:
    if isinstance(exc, NotImplementedError):
        return "unsupported"
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return "oom"
    if isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc):  # torch's CPU allocator
        return "oom"
    return "error"


def message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


@dataclass
class _CaseState:
    case: Case
    pristine: Inputs | None
    ref: reference.Reference | None
    # (impl, "fwd" | "fwd_bwd") -> the accuracy of that call, or what it raised
    measured: dict[tuple[str, str], accuracy.AccuracyResult | Exception]
    failure: Exception | None = None  # the inputs or the reference could not be built
    failure_stage: str = ""
    # mode -> torch_functional's call on this case, the other side of every row's paired rounds (None:
    # it cannot run the case, and rows are timed alone)
    baseline_calls: dict[str, ModeCall | None] = field(default_factory=dict)


# Samples per timed row of a `collective` implementation: a fixed count, so that every rank makes the same
# calls (an adaptive count would end on one rank while another still waits in a collective).
COLLECTIVE_SAMPLES = 20


# Paired rounds against torch_functional: blocks of this many ABBA rounds (4 samples each, 2 of the
# row's), each block on fresh inputs; at least pairing.MIN_BLOCKS blocks, more while the budget lasts.
PAIRED_BLOCK_ROUNDS = 1
PAIRED_MAX_BLOCKS = 100


class UnitRunner:
    def __init__(self, prov_for: Callable[[str], dict[str, Any]], budget_s: float,
                 collective_samples: int = COLLECTIVE_SAMPLES, paired: bool = True):
        self.prov_for, self.budget_s = prov_for, budget_s
        self.collective_samples = collective_samples
        self.paired = paired
        self._state: _CaseState | None = None

    def _case_state(self, case: Case) -> _CaseState:
        if self._state is None or self._state.case != case:
            self._state = None  # free the previous case's tensors before making this one's
            # One full collection per case, then freeze the survivors: with inductor loaded a full
            # collection scans ~500k long-lived objects (0.2 s), and the timer and memory probe
            # collect before every measurement. Frozen objects are still freed by refcounting.
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self._state = _CaseState(case, None, None, {})
            # A case too large for this machine fails here once: every implementation and mode of it
            # gets an oom/error row naming the cause, and the worker lives on to the next case.
            stage = "inputs"
            try:
                self._state.pristine = make_inputs(case)
                stage = "float64 reference"
                self._state.ref = reference.compute(case.family, self._state.pristine)
            except Exception as exc:
                self._state = _CaseState(case, None, None, {}, exc, stage)  # frees what was built
                devices.release_memory(case.device)
        return self._state

    def _accuracy(self, st: _CaseState, impl: Implementation, call: str = "fwd_bwd"
                  ) -> accuracy.AccuracyResult | Exception:
        """The accuracy of one call of `impl`: "fwd_bwd" (forward and backward, the gradients) or
        "fwd" (the loss of the no_grad call, which a `fwd` row times and may take another path)."""
        key = (impl.name, call)
        if key not in st.measured:
            measure = accuracy.measure if call == "fwd_bwd" else accuracy.measure_forward
            try:
                st.measured[key] = measure(impl.fn, st.pristine, st.ref, st.case.dtype)
            except Exception as exc:
                st.measured[key] = exc
        return st.measured[key]

    def run(self, unit: Unit, emit: Emit) -> None:
        impl = get(unit.case.family, unit.impl)
        with warnings.catch_warnings():
            # torch warns on every kl_div(reduction="mean") call; the row records the reduction.
            warnings.filterwarnings("ignore", message=".*divides the total loss by both.*")
            try:
                self._run(unit.case, impl, unit.modes, emit)
            finally:
                gc.collect()
                devices.release_memory(unit.case.device)

    def _emit(self, emit: Emit, case: Case, impl: Implementation, modes: Iterable[str], **fields: Any) -> None:
        for row in impl_rows(self.prov_for(case.device), case, impl, modes, **fields):
            emit(row)

    def _run(self, case: Case, impl: Implementation, modes: tuple[str, ...], emit: Emit) -> None:
        reason = impl.why_unsupported(case)
        if reason:
            return self._emit(emit, case, impl, modes, status="unsupported", error=reason)
        st = self._case_state(case)
        if st.failure is not None:
            return self._emit(emit, case, impl, modes, status=status_of(st.failure),
                              error=f"the case's {st.failure_stage} cannot be built: {message(st.failure)}")
        # Each mode's accuracy describes the call that mode times: fwd the no_grad call's loss,
        # fwd_bwd and bwd the forward + backward call's loss and gradients.
        calls = {m: "fwd" if m == "fwd" else "fwd_bwd" for m in modes}
        # In mode order, never a set's: a set of strings iterates in a per-process (hash-seeded) order, and
        # the ranks of a collective implementation must make their calls in the same order.
        acc = {call: self._accuracy(st, impl, call) for call in dict.fromkeys(calls.values())}
        acc_fields = {}
        for call, result in acc.items():
            if isinstance(result, Exception):
                continue
            if call == "fwd":
                ratio = None  # no gradient in this call: the gradient columns stay empty
            else:
                baseline = self._accuracy(st, get(case.family, BASELINE))
                # torch itself unable to run the case: no ratio (NaN), and its own rows say why.
                torch_err = math.nan if isinstance(baseline, Exception) else baseline.grad_row_err_max
                ratio = accuracy.ratio(result.grad_row_err_max, torch_err)
            acc_fields[call] = dict(
                loss_rel_err=result.loss_rel_err, grad_rel_err=result.grad_rel_err,
                grad_row_err_max=result.grad_row_err_max, grad_max_abs_err=result.grad_max_abs_err,
                err_vs_floor=result.err_vs_floor, err_ratio_vs_torch=ratio, accuracy_ok=result.accuracy_ok,
                accuracy_note=result.note, mutates_inputs=result.mutates_inputs or impl.mutates_inputs,
            )
        # The accuracy call was this implementation's first call of its kind: for a compiled one it
        # paid the compilation, which compile_ms reports apart from steady state.
        fwd_bwd_median = None
        for mode in sorted(modes, key=lambda m: m != "fwd_bwd"):  # fwd_bwd first: bwd's compile_ms uses it
            result = acc[calls[mode]]
            if isinstance(result, Exception):
                self._emit(emit, case, impl, [mode], status=status_of(result), error=message(result))
                continue
            fields = acc_fields[calls[mode]]
            try:
                call = ModeCall(impl.fn, st.pristine, mode, fresh_inputs=fields["mutates_inputs"])
                base_call = self._baseline_call(st, impl, mode)
                if base_call is not None:
                    timing, paired_fields = self._paired(call, base_call, case, impl, mode)
                else:
                    fixed = {"min_samples": self.collective_samples, "max_samples": self.collective_samples}
                    timing = time_callable(call, setup=call.setup, device=case.device, budget_s=self.budget_s,
                                           **(fixed if impl.collective else {}))
                    paired_fields = {}
                summary = stats.summarize(timing.samples_ms)
                mem_fields = self._memory(call, case, st, impl, mode, result.mutated)
            except Exception as exc:
                self._emit(emit, case, impl, [mode], status=status_of(exc), error=message(exc), **fields)
                continue
            median = summary["time_median_ms"]
            bw_fields = self._bandwidth(case, st, mode, median)
            if mode == "fwd_bwd":
                fwd_bwd_median = median
            compile_ms = None
            if impl.compiles:
                steady = median if mode == "fwd" else (fwd_bwd_median or median)
                compile_ms = max(result.first_call_ms - steady, 0.0)
            self._emit(emit, case, impl, [mode], status="ok", error=None, compile_ms=compile_ms,
                       converged=timing.converged, raw_ms=[round(s, 6) for s in timing.samples_ms],
                       evict_ms=[round(s, 6) for s in timing.evict_ms],
                       **summary, **paired_fields, **bw_fields, **mem_fields, **fields)

    def _baseline_call(self, st: _CaseState, impl: Implementation, mode: str) -> ModeCall | None:
        """torch_functional's call on the case in `mode`, warmed up: the other side of `impl`'s paired
        rounds. None for the baseline itself, a collective implementation (its ranks must make the same
        calls), or a baseline that cannot run the case."""
        if not self.paired or impl.name == BASELINE or impl.collective:
            return None
        if mode not in st.baseline_calls:
            base = get(st.case.family, BASELINE)
            call = None
            if base.why_unsupported(st.case) is None and not isinstance(self._accuracy(st, base), Exception):
                try:
                    call = ModeCall(base.fn, st.pristine, mode, fresh_inputs=base.mutates_inputs)
                    for _ in range(2):
                        call.setup()
                        call()
                except Exception:  # noqa: BLE001 - the row is then timed alone; torch's own row says why
                    call = None
            st.baseline_calls[mode] = call
        return st.baseline_calls[mode]

    def _paired(self, call: ModeCall, base_call: ModeCall, case: Case, impl: Implementation, mode: str):
        """The row's samples taken in ABBA rounds with torch_functional's (runners/pairing.py): the row's
        speedup over torch_functional is a paired ratio, both sides having seen the same machine. Rounds
        come in blocks, each on fresh copies of both sides' inputs (where buffers land moves a call's time
        by ~2% for as long as they lie there); the speedup's CI is over the blocks."""
        for _ in range(2):  # warm-up, as time_callable's
            call.setup()
            call()
        rng = np.random.default_rng(zlib.crc32(f"{case.seed()}|{impl.name}|{mode}".encode()))
        paired = pairing.Paired()
        calls = (base_call, call)
        start = time.perf_counter()
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()  # as in time_callable: a collection would land inside one sample
        try:
            for blk in range(PAIRED_MAX_BLOCKS):
                if blk:  # fresh inputs (new addresses) for both
                    calls = tuple(ModeCall(c.fn, c.pristine, mode, fresh_inputs=c.fresh) for c in calls)
                a, b = calls
                paired.extend(pairing.abba(lambda: one_sample(a, a.setup, case.device),
                                           lambda: one_sample(b, b.setup, case.device), rng=rng,
                                           rounds=PAIRED_BLOCK_ROUNDS, warmup_rounds=0,
                                           first_round=blk * PAIRED_BLOCK_ROUNDS, block=blk))
                if blk + 1 >= pairing.MIN_BLOCKS and time.perf_counter() - start >= self.budget_s:
                    break
        finally:
            if enabled:
                gc.enable()
        for c in calls:
            for leaf in c.leaves:
                leaf.grad = None  # no gradient kept between rows
        m_b = -pairing.block_log_ratios(paired.a_ms, paired.a_round, paired.a_block,
                                        paired.b_ms, paired.b_round, paired.b_block)  # torch's time over this row's
        s = pairing.summarize_blocks(m_b, len(paired.orders), 0.0)
        paired.converged = (math.log(s.ci_high) - math.log(s.ci_low)) / 2 <= 0.02
        timing = TimingResult(samples_ms=paired.b_ms, first_call_ms=math.nan, converged=paired.converged,
                              evict_ms=paired.b_evict_ms)
        return timing, {"speedup_vs_torch": s.ratio, "speedup_ci_low": s.ci_low, "speedup_ci_high": s.ci_high}

    def _bandwidth(self, case: Case, st: _CaseState, mode: str, median_ms: float) -> dict[str, Any]:
        moved = bandwidth.bytes_moved(case, st.pristine, st.ref.loss.numel(), mode)
        if not bandwidth.exceeds_cache(moved, case.device):
            # Written bytes can stay in the cache past the timed region: a rate against the copy
            # bandwidth (which pays every write) would not be a physical one.
            return {"gbps": None, "pct_peak_bw": None}
        gbps = moved / (median_ms * 1e-3) / 1e9 if median_ms > 0 else None
        peak = self.prov_for(case.device).get("copy_gbps")
        return {"gbps": gbps, "pct_peak_bw": 100 * gbps / peak if gbps and peak else None}

    def _memory(self, call: ModeCall, case: Case, st: _CaseState, impl: Implementation, mode: str,
                overwritten: tuple) -> dict[str, Any]:
        floor = memory.floor_bytes(case.family, st.pristine, tuple(st.ref.loss.shape), mode, case.device,
                                   grad_in_forward=impl.grad_in_forward, overwritten=overwritten)
        try:
            mem = memory.measure_call(call, case.device)
        except NotImplementedError:  # no exact probe on this platform: leave it unmeasured
            return {"min_mem_bytes": floor}
        return {"peak_mem_bytes": mem.peak_mem_bytes, "extra_mem_bytes": mem.extra_mem_bytes,
                "extra_mem_max_bytes": mem.extra_mem_max_bytes, "reserved_mem_bytes": mem.reserved_mem_bytes, "min_mem_bytes": floor}
