"""The contract of a loss family: everything the harness needs to know about one loss, in one class.

A family module defines one subclass and instantiates it at import (`FAMILY = ...`). Every piece is
abstract, so a family that forgets one fails at import (Python refuses to instantiate the class), and
nothing in the harness falls back to another family's answer. The pieces:

- the calling contract (title, signature, reductions, options and their defaults, shape form);
- validate(options): the family's own checks on a full option set;
- inputs(case, gen): the tensors one call receives, drawn from the case's seed;
- reference(*args, **kwargs): the loss written from its definition, evaluated in float64;
- row_args / mean_denominator(inputs): how the float64 reference is computed in slices of rows;
- bytes_moved(inputs, loss_numel, mode): what an ideal fused implementation must read and write;
- output_bytes(inputs, loss_numel): the loss's and each gradient's bytes (the memory floor's terms);
- default_shape, axis_label: the integrations' default grid and the plots' x axis;
- baseline: torch's own function for the loss, registered as `torch_functional`,
  the implementation every speedup, memory ratio and error ratio is measured against.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..errors import UsageError
from ..inputs import Inputs, nbytes

if TYPE_CHECKING:
    from ..cases import Case

MODES = ("fwd", "fwd_bwd", "bwd")

# Class attributes every family states (checked when the subclass is defined).
_REQUIRED = ("name", "title", "signature", "reductions", "default_reduction", "options", "shape_form",
             "default_shape", "axis_label", "baseline_description", "row_args")


class Family(ABC):
    name: ClassVar[str]
    title: ClassVar[str]
    signature: ClassVar[str]
    reductions: ClassVar[tuple[str, ...]]
    default_reduction: ClassVar[str]
    # option name -> default value; a case states only what differs from these.
    options: ClassVar[dict[str, Any]]
    shape_form: ClassVar[str]  # how --shape and suites give its sizes: "NxC", or "NxHxV" for linear_ce
    default_shape: ClassVar[str]  # the asv / pytest-benchmark grid's default shape
    axis_label: ClassVar[str]  # what the shape's last size is, on the plots' x axis
    baseline_description: ClassVar[str]
    # Arguments (positions, or keyword names) that are per row: the chunked float64 reference slices
    # them along dim 0; the others are shared by every row.
    row_args: ClassVar[tuple[int | str, ...]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [a for a in _REQUIRED if not hasattr(cls, a)]
        if missing:
            raise TypeError(f"loss family {cls.__name__} does not state {', '.join(missing)}")
        if cls.options.get("reduction") != cls.default_reduction or cls.default_reduction not in cls.reductions:
            raise TypeError(f"loss family {cls.__name__}: default reduction {cls.default_reduction!r} must be "
                            "options['reduction'] and one of its reductions")

    @property
    def shape_dims(self) -> int:
        return self.shape_form.count("x") + 1

    # --- options ---------------------------------------------------------------------------------
    @abstractmethod
    def validate(self, options: dict[str, Any]) -> None:
        """Raise UsageError for a value this family cannot take (options are complete: defaults filled)."""

    # --- inputs ----------------------------------------------------------------------------------
    @abstractmethod
    def inputs(self, case: "Case", gen: torch.Generator) -> Inputs:
        """The tensors one call receives, on case.device in case's dtype, and the upstream gradient
        (of the loss's shape: per row or per element for reduction="none")."""

    # --- the float64 reference -------------------------------------------------------------------
    @abstractmethod
    def reference(self, *args, **kwargs) -> torch.Tensor:
        """The loss from its definition (not torch's loss), called with float64 tensors."""

    @abstractmethod
    def mean_denominator(self, inputs: Inputs) -> torch.Tensor:
        """float64 denominator of the family's averaging reductions ("mean", "batchmean")."""

    # --- yardsticks ------------------------------------------------------------------------------
    @abstractmethod
    def bytes_moved(self, inputs: Inputs, loss_numel: int, mode: str) -> int:
        """Bytes an ideal fused implementation reads and writes in `mode`."""

    @abstractmethod
    def output_bytes(self, inputs: Inputs, loss_numel: int) -> tuple[int, dict[int | str, int]]:
        """(bytes of the loss, {differentiable input: bytes of its gradient}): what any implementation
        must allocate (runners.memory turns them into a mode's floor)."""

    # --- torch's own -----------------------------------------------------------------------------
    @property
    @abstractmethod
    def baseline(self) -> Callable[..., torch.Tensor]:
        """torch's function for this loss (F.cross_entropy, ...), registered as the `torch_functional`
        implementation: the callable itself, so the baseline's timings carry no wrapper."""

    # --- helpers a family may call explicitly (never implicit defaults) ---------------------------
    @staticmethod
    def dense_output_bytes(inputs: Inputs, loss_numel: int) -> tuple[int, dict[int | str, int]]:
        """The loss in the first input's dtype, and one gradient per differentiable input of its size."""
        loss = loss_numel * inputs.args[0].element_size()
        return loss, {k: nbytes(inputs.get(k)) for k in inputs.differentiable}

    @staticmethod
    def check_fraction(name: str, options: dict[str, Any]) -> None:
        if name in options and not 0.0 <= float(options[name]) <= 1.0:
            raise UsageError(f"{name} must be in [0, 1], not {options[name]}")
