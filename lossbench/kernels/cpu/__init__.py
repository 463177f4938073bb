"""Fused CPU loss kernels: loss and gradient in one chunked forward sweep, backward only scales.

cross_entropy, kl_div and linear_cross_entropy take the arguments of F.cross_entropy, F.kl_div and
F.linear followed by F.cross_entropy, and raise NotImplementedError for what they do not support
(probability targets, inputs that are not 2-D, ...).
"""
from .cross_entropy import cross_entropy
from .jsd import jsd
from .kl_div import kl_div
from .linear_cross_entropy import linear_cross_entropy

__all__ = ["cross_entropy", "jsd", "kl_div", "linear_cross_entropy"]
