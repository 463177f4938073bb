"""Accuracy of the loss and of every input gradient against the float64 reference.

Metrics (all relative errors are L2 norms; every gradient of a case is folded in by taking the worst):
- loss_rel_err      |loss - ref| / |ref| over the whole output
- grad_rel_err      relative L2 error of the whole gradient
- grad_row_err_max  the worst sample row's relative L2 error. A global norm is dominated by the large
                    gradients of unsure rows and hides a 100% error on confident rows, whose gradient
                    is about 1 - p_y. A row whose reference gradient is zero (an ignored row) must be
                    exactly zero, or its error is infinite.
- grad_max_abs_err  largest absolute difference
- err_vs_floor      grad_row_err_max over the same metric of the float64 reference rounded once to
                    the input dtype: the best any implementation can return (NaN in float64). Where the
                    dtype holds the reference gradient exactly (NLL's -w/N: the floor is 0), 1 for an
                    exact gradient and infinity for any other, so a wrong one never hides as NaN
NaN or Inf where the reference is finite, or finite where it is NaN, is an infinite error.
accuracy_ok compares these with per-dtype budgets, never with torch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..cases import Inputs
from ..devices import synchronize
from ..reference import Reference

# Relative L2 budgets, for the whole gradient and for its worst row. float32 keeps ~7 digits: 1e-4
# leaves room for reduction order and a few roundings per element; bfloat16/float16 keep 2-3 digits,
# and their rounding floor alone is ~0.2-0.4% per row.
BUDGETS = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}


class ImplementationFault(Exception):
    """The implementation returned something unusable (wrong shape, no gradient): an `error` row."""


def _nonfinite_mismatch(x: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool(((x.isnan() != ref.isnan()) | (ref.isfinite() & ~x.isfinite())).any())


def _diff(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x - ref with positions that are NaN in both (a matching convention) counted as equal."""
    return torch.where(ref.isnan() & x.isnan(), torch.zeros_like(ref), x - ref)


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    if _nonfinite_mismatch(x, ref):
        return math.inf
    num = _diff(x, ref).norm().item()
    den = torch.nan_to_num(ref, nan=0.0).norm().item()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def worst_row_err(x: torch.Tensor, ref: torch.Tensor, class_dim: int = 1) -> float:
    if _nonfinite_mismatch(x, ref):
        return math.inf
    if ref.dim() < 2:
        return rel_l2(x, ref)
    rows_d = _diff(x, ref).movedim(class_dim, -1).reshape(-1, ref.shape[class_dim])
    rows_r = ref.movedim(class_dim, -1).reshape(-1, ref.shape[class_dim])
    num, den = rows_d.norm(dim=1), rows_r.norm(dim=1)
    zero_ref = den == 0
    per_row = torch.where(zero_ref, torch.where(num == 0, 0.0, math.inf), num / torch.where(zero_ref, 1.0, den))
    return per_row.max().item() if per_row.numel() else 0.0


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if _nonfinite_mismatch(x, ref):
        return math.inf
    d = _diff(x, ref)
    return d.abs().max().item() if d.numel() else 0.0


# Gradients are compared in slices along dim 0, so that a float64 copy of one slice, not of the whole
# gradient, exists at a time: at 16384 x 131072 a whole float64 copy is 16 GiB, beside a 16 GiB reference.
COMPARE_CHUNK_BYTES = 256 << 20


@dataclass
class GradErrors:
    rel: float  # relative L2 error of the whole gradient
    row_max: float  # worst sample row's relative L2 error
    abs_max: float
    floor_row_max: float  # the worst-row error of the reference rounded once to the input dtype
    nonfinite: bool  # NaN/Inf where the reference is finite (or finite where it is NaN)


def grad_errors(g: torch.Tensor, ref: torch.Tensor, class_dim: int, dtype: torch.dtype) -> GradErrors:
    """Every gradient metric of `g` against the float64 `ref`, in slices of rows along dim 0.
    The same numbers as rel_l2 / worst_row_err / max_abs_err on the whole tensors."""
    rows = ref.shape[0] if ref.dim() else 1
    # 1-d gradients (a bias) are one row: compared whole
    step = rows if ref.dim() < 2 else max(1, COMPARE_CHUNK_BYTES // (8 * ref[0].numel() or 1))
    num2 = den2 = 0.0
    row_max = abs_max = floor_max = 0.0
    nonfinite = False
    for s in range(0, rows, step):
        gc_, rc = (g.double(), ref) if ref.dim() < 2 else (g[s:s + step].double(), ref[s:s + step])
        if _nonfinite_mismatch(gc_, rc):
            nonfinite = True
            break
        d = _diff(gc_, rc)
        num2 += float(d.square().sum())
        den2 += float(torch.nan_to_num(rc, nan=0.0).square().sum())
        abs_max = max(abs_max, d.abs().max().item() if d.numel() else 0.0)
        row_max = max(row_max, worst_row_err(gc_, rc, class_dim))
        floor_max = max(floor_max, worst_row_err(rc.to(dtype).double(), rc, class_dim))
    if nonfinite:
        return GradErrors(math.inf, math.inf, math.inf, floor_max, True)
    num, den = math.sqrt(num2), math.sqrt(den2)
    rel = (0.0 if num == 0 else math.inf) if den == 0 else num / den
    return GradErrors(rel, row_max, abs_max, floor_max, False)


@dataclass
class AccuracyResult:
    loss_rel_err: float
    grad_rel_err: float | None  # None: the call computed no gradient (a `fwd` row)
    grad_row_err_max: float | None
    grad_max_abs_err: float | None
    err_vs_floor: float | None
    accuracy_ok: bool
    mutates_inputs: bool  # an input differed after the call
    first_call_ms: float  # the very first call (compilation included)
    note: str | None = None  # what made it fail, in one line, when something non-finite did
    # positions / names of the inputs the call wrote into (their gradient may live in their storage)
    mutated: tuple[int | str, ...] = ()


def _call(fn, inputs: Inputs) -> tuple[torch.Tensor, float]:
    device = inputs.args[0].device
    synchronize(device)
    start = time.perf_counter()
    out = fn(*inputs.args, **inputs.kwargs)
    return out, start


def _check_output(out, ref: Reference) -> None:
    if not isinstance(out, torch.Tensor):
        raise ImplementationFault(f"returned {type(out).__name__}, not a tensor")
    if tuple(out.shape) != tuple(ref.loss.shape):
        raise ImplementationFault(f"returned shape {tuple(out.shape)}, expected {tuple(ref.loss.shape)}")


def _mutated(inputs: Inputs, pristine: Inputs) -> tuple[int | str, ...]:
    keys = [*range(len(inputs.args)), *[k for k, v in inputs.kwargs.items() if isinstance(v, torch.Tensor)]]
    return tuple(k for k in keys if not torch.equal(inputs.get(k), pristine.get(k)))


def measure_forward(fn, pristine: Inputs, ref: Reference, dtype: str) -> AccuracyResult:
    """The loss of one call under no_grad (what a `fwd` row times) against the reference.
    Implementations may take a different path without gradients: this checks that path."""
    inputs = pristine.clone()
    with torch.no_grad():
        out, start = _call(fn, inputs)
        _check_output(out, ref)
        synchronize(inputs.args[0].device)
        first_call_ms = (time.perf_counter() - start) * 1e3
        loss_err = rel_l2(out.detach().double(), ref.loss)
        mutated = _mutated(inputs, pristine)
    note = None
    if _nonfinite_mismatch(out.detach().double(), ref.loss):
        note = "loss is NaN/Inf where the reference is finite (or finite where it is NaN)"
    return AccuracyResult(loss_rel_err=loss_err, grad_rel_err=None, grad_row_err_max=None, grad_max_abs_err=None,
                          err_vs_floor=None, accuracy_ok=math.isfinite(loss_err) and loss_err <= BUDGETS[dtype],
                          mutates_inputs=bool(mutated), first_call_ms=first_call_ms, note=note, mutated=mutated)


def vs_floor(row_max: float, floor: float, dtype: str) -> float:
    if floor > 0:
        return row_max / floor
    if dtype == "float64":  # the reference itself: no rounding floor
        return math.nan
    return 1.0 if row_max == 0 else math.inf


def measure(fn, pristine: Inputs, ref: Reference, dtype: str) -> AccuracyResult:
    """Call `fn` once (forward + backward) on a copy of `pristine` and compare with `ref`."""
    inputs = pristine.clone()
    leaves = [t.requires_grad_(True) for t in inputs.grad_inputs()]
    out, start = _call(fn, inputs)
    _check_output(out, ref)
    if not out.requires_grad:
        raise ImplementationFault("output does not require grad: no backward")
    out.backward(inputs.grad_output)
    synchronize(inputs.args[0].device)
    first_call_ms = (time.perf_counter() - start) * 1e3

    with torch.no_grad():
        mutated = _mutated(inputs, pristine)
        for i, leaf in zip(inputs.differentiable, leaves):
            if leaf.grad is None:
                raise ImplementationFault(f"no gradient reached input {i!r}")
        torch_dtype = inputs.args[0].dtype
        errs = [grad_errors(leaf.grad, r, inputs.class_dim, torch_dtype) for leaf, r in zip(leaves, ref.grads)]
        loss_err = rel_l2(out.detach().double(), ref.loss)
        grad_rel = max(e.rel for e in errs)
        row_max = max(e.row_max for e in errs)
        abs_max = max(e.abs_max for e in errs)
        floor = max(e.floor_row_max for e in errs)

    budget = BUDGETS[dtype]
    ok = all(math.isfinite(e) and e <= budget for e in (loss_err, grad_rel, row_max))
    note = None
    if _nonfinite_mismatch(out.detach().double(), ref.loss):
        note = "loss is NaN/Inf where the reference is finite (or finite where it is NaN)"
    elif any(e.nonfinite for e in errs):
        note = "gradient has NaN/Inf where the reference is finite"
    return AccuracyResult(
        loss_rel_err=loss_err,
        grad_rel_err=grad_rel,
        grad_row_err_max=row_max,
        grad_max_abs_err=abs_max,
        err_vs_floor=vs_floor(row_max, floor, dtype),
        accuracy_ok=ok,
        mutates_inputs=bool(mutated),
        first_call_ms=first_call_ms,
        note=note,
        mutated=mutated,
    )


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs for errors: NaN when both are zero, inf when only theirs is."""
    if theirs == 0:
        return math.nan if ours == 0 else math.inf
    return ours / theirs
