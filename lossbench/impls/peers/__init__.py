"""Adapters for other projects' loss kernels ("peers"), benchmarked next to torch's own.

- `liger`: Liger-Kernel (liger_kernel) cross-entropy, KL divergence and fused linear + cross-entropy
- `cce`:   Apple's Cut Cross-Entropy (cut_cross_entropy) linear + cross-entropy

Each submodule registers its implementations only when its peer package imports; a peer that is
missing, or that fails to import in any way, registers nothing (the reason is kept in the
submodule's IMPORT_ERROR) and never breaks lossbench itself.

Every adapter returns torch's value and gradient semantics for what it registers; what a peer
cannot express is declared unsupported or raises NotImplementedError at call time.
"""
from . import cce, liger  # noqa: F401

__all__ = ["cce", "liger"]
