"""Built-in implementations; importing this package declares them (implementation.BUILTINS), and the
registry (lossbench/registry.py), which imports it, adds them before any plugin.

torch_impls: torch's own (torch_module, torch_functional, torch_composed, torch_compile).
fused:       ours (fused_triton, fused).
peers:       Liger-Kernel (liger) and Cut Cross-Entropy (cce), each only when importable.
vocab_parallel: cross-entropy with the vocabulary split across a torch.distributed process group.
"""
from . import fused, peers, torch_impls, vocab_parallel  # noqa: F401
