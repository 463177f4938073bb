"""lossbench's own fused implementations, in the one registry:

- fused_triton: the Triton kernels (lossbench/kernels/triton). On CUDA; on the CPU only under
  TRITON_INTERPRET=1, for correctness (an interpreter's times mean nothing), else `unsupported`.
- fused:        the fused CPU paths (lossbench/kernels/cpu): gradient computed in the forward pass
  over row chunks that stay in cache; on CUDA it dispatches to the Triton kernels. Where a compiled
  kernel exists (lossbench/kernels/native) it runs; without a compiler the Python path does, and the
  row's convention says so (the `note` hook).
Both compute the gradient during the forward pass (grad_in_forward): their `fwd` time includes
gradient work and is not comparable with torch's forward alone; compare `fwd_bwd`.
Kernels are imported on first call: importing triton costs a second, and the interpreter must be
chosen from the environment at call time.
"""
from __future__ import annotations

from ..implementation import builtin
from ..kernels.native import cpu_row_note


def _triton(device):
    try:
        from ..kernels import triton as kernels
    except ImportError as exc:
        raise NotImplementedError(f"triton is not importable: {exc}") from None
    if not kernels.available(device):
        raise NotImplementedError("fused_triton needs CUDA, or TRITON_INTERPRET=1 on the CPU")
    return kernels


def _for(device):
    if device.type == "cuda":
        return _triton(device)
    from ..kernels import cpu as kernels

    return kernels


_CE_UNSUPPORTED = ("target=prob", "spatial")


@builtin(family="ce", name="fused_triton", devices=("cuda", "cpu"), triton=True, unsupported=_CE_UNSUPPORTED,
          grad_in_forward=True, description="Triton: one online-softmax pass per row, cancellation-free p_y - 1")
def ce_fused_triton(logits, target, **kwargs):
    return _triton(logits.device).cross_entropy(logits, target, **kwargs)


@builtin(family="ce", name="fused", unsupported=_CE_UNSUPPORTED, grad_in_forward=True,
          description="CPU: compiled kernel, gradient in forward, one read of each row; CUDA: the Triton kernel",
          note=cpu_row_note("cross_entropy"))
def ce_fused(logits, target, **kwargs):
    return _for(logits.device).cross_entropy(logits, target, **kwargs)


@builtin(family="kl", name="fused_triton", devices=("cuda", "cpu"), triton=True, grad_in_forward=True,
          description="Triton: loss and gradient in one pass")
def kl_fused_triton(input, target, **kwargs):
    return _triton(input.device).kl_div(input, target, **kwargs)


@builtin(family="kl", name="fused", grad_in_forward=True,
          description="CPU: compiled kernel, loss in one read of input and target, gradient in backward from the "
                      "target; CUDA: the Triton kernel",
          note=cpu_row_note("kl_div"))
def kl_fused(input, target, **kwargs):
    return _for(input.device).kl_div(input, target, **kwargs)


@builtin(family="linear_ce", name="fused_triton", devices=("cuda", "cpu"), triton=True, grad_in_forward=True,
          description="chunked over tokens: the N x V logits never exist; Triton cross-entropy per chunk")
def linear_ce_fused_triton(hidden, weight, target, **kwargs):
    return _triton(hidden.device).linear_cross_entropy(hidden, weight, target, **kwargs)


@builtin(family="linear_ce", name="fused", grad_in_forward=True,
          description="CPU: chunked over tokens, memory independent of N x V; CUDA: the Triton version")
def linear_ce_fused(hidden, weight, target, **kwargs):
    return _for(hidden.device).linear_cross_entropy(hidden, weight, target, **kwargs)


@builtin(family="jsd", name="fused_triton", devices=("cuda", "cpu"), triton=True, grad_in_forward=True,
          description="Triton: loss and gradient in one pass per row, log M without forming M")
def jsd_fused_triton(log_q, log_p, **kwargs):
    return _triton(log_q.device).jsd(log_q, log_p, **kwargs)


@builtin(family="jsd", name="fused", grad_in_forward=True,
          description="CPU: loss and gradient in one pass over cache-sized row chunks; CUDA: the Triton kernel")
def jsd_fused(log_q, log_p, **kwargs):
    return _for(log_q.device).jsd(log_q, log_p, **kwargs)
