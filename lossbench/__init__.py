"""lossbench: time, memory and gradient accuracy of PyTorch loss implementations."""
from .registry import register
from .store import load_results

__all__ = ["register", "load_results"]
__version__ = "0.1.0"
