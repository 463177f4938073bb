"""A case is one measurable problem: family x shape x dtype x device x input distribution x options.

`make_inputs` turns a case into the tensors an implementation is called with. Inputs are generated
from a seed derived from the case (not the device), on the CPU, so every implementation and every
device sees the same numbers.
"""
from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import UsageError
from .families import FAMILIES, IGNORE_INDEX, INPUT_DISTS, get_family, normalize_options

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
_SHAPE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})") from None


def parse_shape(text: str) -> tuple[int, int]:
    """'4096x32000' -> (4096, 32000)."""
    m = _SHAPE.match(text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise UsageError(f"malformed shape {text!r}: expected NxC with positive integers, e.g. 4096x32000")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class Case:
    family: str
    n: int
    c: int
    dtype: str
    device: str
    input_dist: str = "normal"
    # Full option set (defaults filled), as sorted pairs so the case is hashable.
    options_items: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, family: str, n: int, c: int, dtype: str, device: str,
             input_dist: str = "normal", options: dict[str, Any] | None = None) -> "Case":
        fam = get_family(family)
        parse_dtype(dtype)
        if input_dist not in INPUT_DISTS:
            raise UsageError(f"unknown input_dist {input_dist!r} (known: {', '.join(INPUT_DISTS)})")
        full = normalize_options(fam, dict(options or {}))
        return cls(family, n, c, dtype, device, input_dist, tuple(sorted(full.items())))

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.options_items)

    @property
    def non_default_options(self) -> dict[str, Any]:
        defaults = FAMILIES[self.family].options
        return {k: v for k, v in self.options_items if defaults[k] != v}

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def options_json(self) -> str:
        return json.dumps(self.options, sort_keys=True, separators=(",", ":"))

    def label(self) -> str:
        """Short human label: shape, dtype, distribution and the options that differ from torch's defaults."""
        opts = ",".join(f"{k}={v}" for k, v in self.non_default_options.items()) or "default"
        spatial = self.options["spatial"]
        shape = f"{self.n}x{self.c}" + (f"x{spatial}" if spatial else "")
        return f"{shape} {self.dtype} {self.input_dist} {opts}"

    def seed(self) -> int:
        key = f"{self.family}|{self.n}|{self.c}|{self.dtype}|{self.input_dist}|{self.options_json}"
        return zlib.crc32(key.encode())


@dataclass
class Inputs:
    """What one call receives: positional tensors, keyword arguments, and the upstream gradient."""

    args: list[torch.Tensor]
    kwargs: dict[str, Any]
    differentiable: tuple[int, ...]  # positions in args that get gradients
    grad_output: torch.Tensor  # non-uniform for reduction="none" (catches per-row scaling bugs)
    class_dim: int = 1

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


def _class_last_shape(case: Case) -> tuple[int, ...]:
    d = case.options["spatial"]
    return (case.n, d, case.c) if d else (case.n, case.c)


def _to_class_dim1(x: torch.Tensor, noncontig: bool) -> torch.Tensor:
    """Generated tensors keep classes last; torch wants them in dim 1. `noncontig` keeps the
    class-last storage (strided class dimension) instead of making the result contiguous."""
    if x.dim() == 2:
        return x if not noncontig else x.t().contiguous().t()
    moved = x.movedim(-1, 1)
    return moved if noncontig else moved.contiguous()


def _logits(case: Case, gen: torch.Generator, true_class: torch.Tensor) -> torch.Tensor:
    """float32 logits, classes last. `peaked`: the true class's softmax drawn from U(0.9, 0.999)."""
    x = torch.randn(*_class_last_shape(case), generator=gen)
    if case.input_dist == "peaked":
        p = 0.9 + 0.099 * torch.rand(true_class.shape, generator=gen, dtype=torch.float64)
        others = x.double().scatter(-1, true_class.unsqueeze(-1), -math.inf).logsumexp(-1)
        # softmax_y = e^z / (e^z + S)  =>  z = log(p / (1 - p)) + log S
        z = torch.log(p / (1 - p)) + others
        x.scatter_(-1, true_class.unsqueeze(-1), z.float().unsqueeze(-1))
    return x


def make_inputs(case: Case) -> Inputs:
    fam, opts = case.family, case.options
    dtype, device = case.torch_dtype, torch.device(case.device)
    gen = torch.Generator().manual_seed(case.seed())
    row_shape = _class_last_shape(case)[:-1]
    noncontig = bool(opts["noncontig"])
    true_class = torch.randint(0, case.c, row_shape, generator=gen)

    def place(x: torch.Tensor) -> torch.Tensor:
        return _to_class_dim1(x.to(dtype), noncontig).to(device)

    kwargs: dict[str, Any] = {"reduction": opts["reduction"]}
    if fam == "kl":
        log_q = F.log_softmax(_logits(case, gen, true_class), -1)
        p_logits = _logits(case, gen, true_class)
        target = F.log_softmax(p_logits, -1) if opts["log_target"] else F.softmax(p_logits, -1)
        args = [place(log_q), place(target)]
        kwargs["log_target"] = bool(opts["log_target"])
    else:
        logits = _logits(case, gen, true_class)
        first = F.log_softmax(logits, -1) if fam == "nll" else logits
        if fam == "ce" and opts["target"] == "prob":
            target = place(F.softmax(2 * torch.randn(row_shape + (case.c,), generator=gen), -1))
        else:
            target = true_class.clone()
            n_ignored = round(float(opts["ignore_frac"]) * target.numel())
            if n_ignored:
                flat = target.view(-1)
                flat[torch.randperm(flat.numel(), generator=gen)[:n_ignored]] = IGNORE_INDEX
            target = target.to(device)
        args = [place(first), target]
        weight = None
        if opts["weight"]:
            weight = (0.5 + 1.5 * torch.rand(case.c, generator=gen)).to(dtype).to(device)
        kwargs.update(weight=weight, ignore_index=IGNORE_INDEX)
        if fam == "ce":
            kwargs["label_smoothing"] = float(opts["label_smoothing"])

    if opts["reduction"] == "none":
        # ce/nll give one loss per row, in torch's order (N,) or (N, d); kl one per element.
        loss_shape = tuple(args[0].shape) if fam == "kl" else row_shape
        grad_output = torch.randn(loss_shape, generator=gen)
    else:
        grad_output = 0.5 + 1.5 * torch.rand((), generator=gen)
    return Inputs(args, kwargs, (0,), grad_output.to(dtype).to(device))
