"""Cut Cross-Entropy (cut_cross_entropy, Apple) adapter: linear + cross-entropy.

Registered only when cut_cross_entropy imports. On CUDA it runs the package's default
implementation, impl="cce" (Triton kernels that never materialise the logits, with the default
gradient filtering filter_eps="high": logit-gradient blocks below finfo(dtype).eps / 32 are skipped).
On the CPU it runs impl="torch_compile" (torch.compile of matmul + F.cross_entropy on float32 logits;
inductor's C++ backend, no Triton). The first call of either compiles.

What it cannot express, and so declares unsupported: a bias (it takes hidden and classifier only) and
label smoothing. On CUDA a `mean` over zero kept targets raises NotImplementedError: impl="cce"
returns NaN but its backward divides by the number of kept rows (ZeroDivisionError).
Its loss is float32 for any input dtype; torch returns the input dtype, so the adapter casts it back.
"""
from __future__ import annotations

from ...implementation import builtin

IMPORT_ERROR: str | None = None
try:
    from cut_cross_entropy import linear_cross_entropy
except BaseException as exc:  # a peer may fail in any way at import, SystemExit included
    if isinstance(exc, KeyboardInterrupt):
        raise
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

IMPLS = {"cuda": "cce", "cpu": "torch_compile"}
_limits_raised = False


def _raise_recompile_limits() -> None:
    """cut_cross_entropy's torch.compile'd functions are specialised per reduction, dtype and
    ignore_index; dynamo's default limit of 8 recompiles would silently fall back to eager in a
    sweep. Raised as lossbench's own torch_compile does (never lowered)."""
    global _limits_raised
    if _limits_raised:
        return
    import torch._dynamo

    for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                  "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 4096))
    _limits_raised = True


if IMPORT_ERROR is None:

    @builtin(family="linear_ce", name="cce", devices=("cuda", "cpu"), unsupported=("bias", "label_smoothing"),
              compiles=True,
              description='cut_cross_entropy.linear_cross_entropy: impl="cce" (Triton, filter_eps="high") on '
                          'CUDA, impl="torch_compile" on CPU; no bias, no label smoothing')
    def cce_linear_ce(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                      label_smoothing=0.0):
        if bias is not None:
            raise NotImplementedError("cut_cross_entropy takes no bias")
        if label_smoothing:
            raise NotImplementedError("cut_cross_entropy has no label smoothing")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"{reduction} is not a valid value for reduction")
        kind = hidden.device.type
        impl = IMPLS.get(kind)
        if impl is None:
            raise NotImplementedError(f"cut_cross_entropy does not run on {kind}")
        if impl == "cce" and reduction == "mean" and not bool((target != ignore_index).any()):
            raise NotImplementedError("cut_cross_entropy's backward divides by the number of kept targets "
                                      "(ZeroDivisionError) when every target is ignored")
        _raise_recompile_limits()
        out = linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index, reduction=reduction,
                                   impl=impl)
        return out.to(hidden.dtype)
