"""Liger-Kernel (liger_kernel) adapters: cross-entropy, KL divergence, fused linear + cross-entropy, JSD.

Registered only when liger_kernel imports. Its kernels are Triton: on CUDA they compile, on the CPU
they run only under the Triton interpreter. `triton.jit` chooses compile or interpret when liger's
modules are imported, so TRITON_INTERPRET=1 must be in the environment before liger_kernel is
first imported; otherwise the CPU adapters raise NotImplementedError (an `unsupported` row).

Conventions where liger differs from torch, and what the adapters do about them:
- a `mean` over zero contributing targets (every target ignored, or all their class weights zero):
  torch returns NaN with a zero gradient, liger 0 (or a NaN gradient with class weights). The
  adapters check for it (one host sync, which liger's own forward already pays several of) and
  raise NotImplementedError rather than return liger's value.
- liger's KL and fused linear + CE return a float32 loss for any input dtype; torch returns the
  input dtype, so the adapters cast the loss back (the gradient is unaffected).
- liger's KL computes target * log(max(target, eps)). Its default eps=1e-10 changes the loss of
  targets below 1e-10; the adapter passes the smallest normal float32 (~1.18e-38), which keeps
  0 * log 0 = 0 (eps=0 would give NaN) and changes nothing for any normal float32 target.
- liger computes in float32 whatever the input dtype (float64 rows are float32-accurate).
- liger's JSD has one reduction, the mean over kept rows (our "batchmean"); with every row ignored it
  returns 0 where the family's convention is NaN (an empty mean): refused like the `mean` above.
- logits with a strided class dimension: liger's cross-entropy copies them to a contiguous tensor
  inside its autograd Function, where the copy no longer requires grad, so its kernel computes no
  gradient and backward returns the logits themselves. Passed through as measured (the accuracy
  check flags it), not hidden by a copy in the adapter.

Under the Triton interpreter (CPU), two interpreter limitations (triton 3.9) raise
NotImplementedError rather than report the interpreter's errors as liger's: float kernel
arguments reach the kernel as Python floats (liger's KL and weighted cross-entropy call .to() on
one), and bfloat16 is kept as raw uint16 bits that arithmetic multiplies as integers (liger's
cross-entropy backward scales its bfloat16 gradient by a bfloat16 grad_output).
"""
from __future__ import annotations

import os

import torch

from ...implementation import builtin

IMPORT_ERROR: str | None = None
try:
    from liger_kernel.ops import cross_entropy as _ce_ops
    from liger_kernel.ops import jsd as _jsd_ops
    from liger_kernel.ops import kl_div as _kl_ops
    from liger_kernel.transformers.functional import (
        liger_cross_entropy,
        liger_fused_linear_cross_entropy,
        liger_jsd,
        liger_kl_div,
    )
except BaseException as exc:  # a peer may fail in any way at import, SystemExit included
    if isinstance(exc, KeyboardInterrupt):
        raise
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# The eps passed to liger's KL kernel: the smallest normal float32 (see the module docstring).
KL_EPS = torch.finfo(torch.float32).tiny


def _interpreted(kernel) -> bool | None:
    """Whether a Triton kernel object was built for the interpreter (None: cannot tell)."""
    if kernel is None:
        return None
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:
        return None
    return isinstance(kernel, InterpretedFunction)


def _check_device(t: torch.Tensor, kernel) -> None:
    kind = t.device.type
    if kind == "cuda":
        return
    if kind != "cpu":
        raise NotImplementedError(f"liger's Triton kernels do not run on {kind}")
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise NotImplementedError("liger's Triton kernels need TRITON_INTERPRET=1 on CPU")
    if _interpreted(kernel) is False:
        raise NotImplementedError("liger's Triton kernels need TRITON_INTERPRET=1 on CPU, set before "
                                  "liger_kernel is imported (it was imported without it)")


def _call(t: torch.Tensor, fn, *args, **kwargs):
    """Run a liger call; on the CPU, turn the Triton interpreter's float-argument limitation into
    NotImplementedError. The interpreter (triton 3.9) hands float scalar kernel arguments to the
    kernel as Python floats, and some liger kernels call `.to(tl.float32)` on one (KL's eps,
    cross-entropy's weight sums): those run on CUDA only."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        text = str(exc)
        if (t.device.type == "cpu" and type(exc).__name__ == "InterpreterError"
                and "'float' object has no attribute" in text):
            raise NotImplementedError(
                "the Triton interpreter passes float kernel arguments as Python floats, which this "
                "liger kernel cannot take (it calls .to() on one); runs on CUDA") from exc
        raise


def _empty_mean(target: torch.Tensor, ignore_index: int, weight: torch.Tensor | None) -> bool:
    """Whether a `mean` would divide by zero: no target kept, or kept targets' weights sum to 0."""
    kept = target != ignore_index
    if weight is None:
        return not bool(kept.any())
    return bool((weight[target.masked_fill(~kept, 0)] * kept).sum() == 0)


_EMPTY_MEAN = ("liger returns 0 (torch: NaN with a zero gradient) for a mean over zero contributing "
               "targets")


if IMPORT_ERROR is None:

    @builtin(family="ce", name="liger", devices=("cuda", "cpu"), triton=True, unsupported=("target=prob", "spatial"),
              mutates_inputs=True, grad_in_forward=True, compiles=True,
              description="liger_kernel cross_entropy (LigerCrossEntropyFunction; the gradient is written "
                          "into the logits during forward)")
    def liger_ce(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        _check_device(logits, getattr(_ce_ops, "liger_cross_entropy_kernel", None))
        if logits.dim() != 2:
            raise NotImplementedError("liger's cross_entropy takes (N, C) logits only")
        if target.is_floating_point():
            raise NotImplementedError("liger's cross_entropy takes class-index targets only")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"{reduction} is not a valid value for reduction")
        if reduction == "mean" and _empty_mean(target, ignore_index, weight):
            raise NotImplementedError(_EMPTY_MEAN)
        if logits.device.type == "cpu" and logits.dtype == torch.bfloat16 and reduction != "none":
            # liger's backward scales the bfloat16 gradient by the bfloat16 grad_output inside a
            # kernel; the interpreter keeps bfloat16 as raw uint16 and multiplies those bits.
            raise NotImplementedError("the Triton interpreter multiplies bfloat16 values wrongly (it keeps "
                                      "them as raw uint16), which liger's backward does; runs on CUDA")
        return _call(logits, liger_cross_entropy, logits, target, weight=weight, ignore_index=ignore_index,
                     reduction=reduction, label_smoothing=float(label_smoothing))

    @builtin(family="kl", name="liger", devices=("cuda", "cpu"), triton=True, compiles=True,
              convention=f"target clamped at eps={KL_EPS:.3g} inside the log (liger's default eps: 1e-10)",
              description=f"liger_kernel kl_div (LigerKLDivLossFunction); clamps target at eps={KL_EPS:.3g} "
                          "(liger's default 1e-10) inside the log; float32 loss cast to the input dtype")
    def liger_kl(input, target, *, reduction="batchmean", log_target=False):
        _check_device(input, getattr(_kl_ops, "_kldiv_kernel_forward", None))
        if reduction not in ("none", "batchmean", "sum", "mean"):
            raise ValueError(f"{reduction} is not a valid value for reduction")
        shape = input.shape
        # liger takes (rows, columns); KL is pointwise, and "batchmean" divides by dim 0 in both,
        # so torch's (N, C, d) layout folds into (N, C*d). A 2-d input passes unchanged.
        x = input if input.dim() == 2 else input.reshape(shape[0], -1)
        t = target if target.dim() == 2 else target.reshape(shape[0], -1)
        out = _call(input, liger_kl_div, x, t, reduction=reduction, log_target=bool(log_target), eps=KL_EPS)
        if reduction == "none":
            out = out.view(shape)
        return out.to(input.dtype)

    @builtin(family="linear_ce", name="liger", devices=("cuda", "cpu"), triton=True, grad_in_forward=True, compiles=True,
              description="liger_kernel fused_linear_cross_entropy (chunked; gradients computed in forward "
                          "except for reduction=none); float32 loss cast to the input dtype")
    def liger_linear_ce(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                        label_smoothing=0.0):
        _check_device(hidden, getattr(_ce_ops, "liger_cross_entropy_kernel", None))
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"{reduction} is not a valid value for reduction")
        if reduction == "mean" and _empty_mean(target, ignore_index, None):
            raise NotImplementedError(_EMPTY_MEAN)
        out = _call(hidden, liger_fused_linear_cross_entropy, hidden, weight, target, bias=bias,
                    ignore_index=ignore_index, label_smoothing=float(label_smoothing), reduction=reduction)
        return out.to(hidden.dtype)

    @builtin(family="jsd", name="liger", devices=("cuda", "cpu"), triton=True, grad_in_forward=True, compiles=True,
              unsupported=("reduction=none", "reduction=sum"),
              description="liger_kernel jsd (LigerJSDFunction; loss and gradient in forward, beta a compile-time "
                          "constant)")
    def liger_jsd_adapter(log_q, log_p, *, label=None, beta=0.5, ignore_index=-100, reduction="batchmean"):
        _check_device(log_q, getattr(_jsd_ops, "_jsd_kernel", None))
        if reduction != "batchmean":
            raise NotImplementedError("liger's jsd only averages over the kept rows (batchmean)")
        if label is not None and _empty_mean(label, ignore_index, None):
            raise NotImplementedError(_EMPTY_MEAN)
        return _call(log_q, liger_jsd, log_q, log_p, label, beta=float(beta), ignore_index=ignore_index)
