"""The sweep: for every case, every implementation, every mode -> rows in the store.

Per case the float64 reference is computed once; torch_functional's accuracy is measured first
(the yardstick for err_ratio_vs_torch, even when --impl leaves it out of the table); then each
implementation gets one accuracy call (which also detects writes into inputs) and a timing per mode.
A failure costs that implementation's rows for that case, never the sweep.
"""
from __future__ import annotations

import gc
import math
import warnings
from typing import Any, Callable, Iterable

import torch

from . import devices, records, reference
from .cases import Case, make_inputs
from .registry import Implementation, get
from .runners import accuracy, stats
from .runners.calls import ModeCall
from .runners.timing import time_callable
from .suites import Plan

BASELINE = "torch_functional"


def _status_of(exc: BaseException) -> str:
    if isinstance(exc, NotImplementedError):
        return "unsupported"
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return "oom"
    return "error"


def _message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


class Sweep:
    def __init__(self, plan: Plan, impls_for: Callable[[str], list[Implementation]],
                 prov_for: Callable[[str], dict[str, Any]], write: Callable[[dict[str, Any]], None],
                 advance: Callable[[str], None] = lambda _: None):
        self.plan, self.impls_for, self.prov_for = plan, impls_for, prov_for
        self.write, self.advance = write, advance

    def run(self) -> None:
        with warnings.catch_warnings():
            # torch warns on every kl_div(reduction="mean") call; the row records the reduction.
            warnings.filterwarnings("ignore", message=".*divides the total loss by both.*")
            for case, modes in self.plan.items:
                self._run_case(case, modes)

    def _rows(self, case: Case, impl: Implementation, modes: Iterable[str], **fields: Any) -> None:
        prov = self.prov_for(case.device)
        for mode in modes:
            self.write(records.row(prov, case, impl.name, mode, grad_in_forward=impl.grad_in_forward, **fields))
            self.advance(f"{case.family} {impl.name} {mode}")

    def _run_case(self, case: Case, modes: tuple[str, ...]) -> None:
        pristine = make_inputs(case)
        ref = reference.compute(case.family, pristine)
        measured: dict[str, accuracy.AccuracyResult | Exception] = {}

        def accuracy_of(impl: Implementation) -> accuracy.AccuracyResult | Exception:
            # One accuracy call per implementation and case; the baseline's serves every ratio.
            if impl.name not in measured:
                try:
                    measured[impl.name] = accuracy.measure(impl.fn, pristine, ref, case.dtype)
                except Exception as exc:
                    measured[impl.name] = exc
            return measured[impl.name]

        baseline = accuracy_of(get(case.family, BASELINE))
        # torch itself unable to run the case: no ratio (NaN), and its own rows say why.
        torch_err = math.nan if isinstance(baseline, Exception) else baseline.grad_row_err_max
        for impl in self.impls_for(case.family):
            self._run_impl(case, impl, modes, pristine, accuracy_of, torch_err)
            gc.collect()
            devices.release_memory(case.device)

    def _run_impl(self, case: Case, impl: Implementation, modes, pristine, accuracy_of, torch_err: float) -> None:
        reason = impl.why_unsupported(case)
        if reason:
            return self._rows(case, impl, modes, status="unsupported", error=reason)
        acc = accuracy_of(impl)
        if isinstance(acc, Exception):
            return self._rows(case, impl, modes, status=_status_of(acc), error=_message(acc))
        mutates = acc.mutates_inputs or impl.mutates_inputs
        acc_fields = dict(
            loss_rel_err=acc.loss_rel_err, grad_rel_err=acc.grad_rel_err, grad_row_err_max=acc.grad_row_err_max,
            grad_max_abs_err=acc.grad_max_abs_err, err_vs_floor=acc.err_vs_floor,
            err_ratio_vs_torch=accuracy.ratio(acc.grad_row_err_max, torch_err),
            accuracy_ok=acc.accuracy_ok, mutates_inputs=mutates,
        )
        # The accuracy call was this implementation's first call with gradients: for a compiled one it
        # paid the forward and backward compilation, which compile_ms reports apart from steady state.
        first_grad_call_ms = acc.first_call_ms
        fwd_bwd_median = None
        for mode in sorted(modes, key=lambda m: m != "fwd_bwd"):  # fwd_bwd first: bwd's compile_ms uses it
            try:
                call = ModeCall(impl.fn, pristine, mode, fresh_inputs=mutates)
                timing = time_callable(call, setup=call.setup, device=case.device, budget_s=self.plan.budget_s)
                summary = stats.summarize(timing.samples_ms)
            except Exception as exc:
                self._rows(case, impl, [mode], status=_status_of(exc), error=_message(exc), **acc_fields)
                continue
            median = summary["time_median_ms"]
            if mode == "fwd_bwd":
                fwd_bwd_median = median
            compile_ms = None
            if impl.compiles:
                first = timing.first_call_ms if mode == "fwd" else first_grad_call_ms
                steady = median if mode == "fwd" else (fwd_bwd_median or median)
                compile_ms = max(first - steady, 0.0)
            self._rows(case, impl, [mode], status="ok", error=None, compile_ms=compile_ms,
                       converged=timing.converged, raw_ms=[round(s, 6) for s in timing.samples_ms],
                       **summary, **acc_fields)
