"""What one call receives (`Inputs`), and the generators the families build their inputs from.

No family knowledge lives here: each family's module (lossbench/families/) says which tensors it
takes and draws them with these helpers. Inputs are generated in float32 on the CPU from the case's
seed, then cast and placed, so every implementation and every device sees the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .cases import Case

IGNORE_INDEX = -100


@dataclass
class Inputs:
    """What one call receives: positional tensors, keyword arguments, and the upstream gradient."""

    args: list[torch.Tensor]
    kwargs: dict[str, Any]
    differentiable: tuple[int | str, ...]  # positions in args, or keyword names (bias), that get gradients
    grad_output: torch.Tensor  # non-uniform for reduction="none" (catches per-row scaling bugs)
    class_dim: int = 1

    def get(self, key: int | str) -> torch.Tensor:
        return self.args[key] if isinstance(key, int) else self.kwargs[key]

    def grad_inputs(self) -> list[torch.Tensor]:
        return [self.get(k) for k in self.differentiable]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the implementation could write into (mutation detection)."""
        extra = [v for v in self.kwargs.values() if isinstance(v, torch.Tensor)]
        return [*self.args, *extra]

    def clone(self) -> "Inputs":
        # preserve_format keeps the strides of non-contiguous (transposed) inputs.
        def cp(t: Any) -> Any:
            return t.detach().clone(memory_format=torch.preserve_format) if isinstance(t, torch.Tensor) else t

        return Inputs([cp(a) for a in self.args], {k: cp(v) for k, v in self.kwargs.items()},
                      self.differentiable, cp(self.grad_output), self.class_dim)


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def class_last_shape(case: "Case") -> tuple[int, ...]:
    d = case.options.get("spatial", 0)
    return (case.n, d, case.c) if d else (case.n, case.c)


def to_class_dim1(x: torch.Tensor, noncontig: bool) -> torch.Tensor:
    """Generated tensors keep classes last; torch wants them in dim 1. `noncontig` keeps the
    class-last storage (strided class dimension) instead of making the result contiguous."""
    if x.dim() == 2:
        return x if not noncontig else x.t().contiguous().t()
    moved = x.movedim(-1, 1)
    return moved if noncontig else moved.contiguous()


def logits(case: "Case", gen: torch.Generator, true_class: torch.Tensor) -> torch.Tensor:
    """float32 logits, classes last. `peaked`: the true class's softmax drawn from U(0.9, 0.999)."""
    x = torch.randn(*class_last_shape(case), generator=gen)
    if case.input_dist == "peaked":
        p = 0.9 + 0.099 * torch.rand(true_class.shape, generator=gen, dtype=torch.float64)
        others = x.double().scatter(-1, true_class.unsqueeze(-1), -math.inf).logsumexp(-1)
        # softmax_y = e^z / (e^z + S)  =>  z = log(p / (1 - p)) + log S
        z = torch.log(p / (1 - p)) + others
        x.scatter_(-1, true_class.unsqueeze(-1), z.float().unsqueeze(-1))
    return x


def ignored(target: torch.Tensor, frac: float, gen: torch.Generator) -> torch.Tensor:
    """Exactly round(frac * rows) targets set to ignore_index, at random rows."""
    target = target.clone()
    n_ignored = round(float(frac) * target.numel())
    if n_ignored:
        flat = target.view(-1)
        flat[torch.randperm(flat.numel(), generator=gen)[:n_ignored]] = IGNORE_INDEX
    return target


def scalar_grad_output(gen: torch.Generator) -> torch.Tensor:
    """The upstream gradient of a scalar loss: not 1, so a missing grad_output scaling shows."""
    return 0.5 + 1.5 * torch.rand((), generator=gen)
