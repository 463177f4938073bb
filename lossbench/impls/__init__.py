"""Built-in implementations; importing this package registers them."""
from . import torch_impls  # noqa: F401
