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
_SHAPE = re.compile(r"^\s*\d+(\s*[xX]\s*\d+){1,2}\s*$")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})") from None


def parse_shape(text: str) -> tuple[int, ...]:
    """'4096x32000' -> (4096, 32000) for nll/ce/kl; '4096x1024x32000' -> (N, H, V) for linear_ce."""
    dims = tuple(int(d) for d in re.split(r"[xX]", text.replace(" ", ""))) if _SHAPE.match(text) else ()
    if not dims or min(dims) < 1:
        raise UsageError(f"malformed shape {text!r}: expected NxC (or NxHxV for linear_ce) with positive "
                         "integers, e.g. 4096x32000")
    return dims


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
    h: int | None = None  # linear_ce: the hidden size (c is then the vocabulary V)

    @classmethod
    def make(cls, family: str, n: int, c: int, dtype: str, device: str,
             input_dist: str = "normal", options: dict[str, Any] | None = None, h: int | None = None) -> "Case":
        fam = get_family(family)
        parse_dtype(dtype)
        if input_dist not in INPUT_DISTS:
            raise UsageError(f"unknown input_dist {input_dist!r} (known: {', '.join(INPUT_DISTS)})")
        if (h is not None) != (fam.shape_dims == 3):
            raise UsageError(f"family {family!r} takes shapes of the form {fam.shape_form}")
        full = normalize_options(fam, dict(options or {}))
        return cls(family, n, c, dtype, device, input_dist, tuple(sorted(full.items())), h)

    @classmethod
    def from_shape(cls, family: str, dims: tuple[int, ...], dtype: str, device: str,
                   input_dist: str = "normal", options: dict[str, Any] | None = None) -> "Case":
        n, *middle, c = dims
        return cls.make(family, n, c, dtype, device, input_dist, options, h=middle[0] if middle else None)

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
        return f"{self.shape} {self.dtype} {self.input_dist} {opts}"

    @property
    def shape(self) -> str:
        if self.h is not None:
            return f"{self.n}x{self.h}x{self.c}"
        spatial = self.options.get("spatial")
        return f"{self.n}x{self.c}" + (f"x{spatial}" if spatial else "")

    def seed(self) -> int:
        h = f"|{self.h}" if self.h is not None else ""
        key = f"{self.family}|{self.n}|{self.c}{h}|{self.dtype}|{self.input_dist}|{self.options_json}"
        return zlib.crc32(key.encode())


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


def _class_last_shape(case: Case) -> tuple[int, ...]:
    d = case.options.get("spatial", 0)
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


def _ignored(target: torch.Tensor, frac: float, gen: torch.Generator) -> torch.Tensor:
    """Exactly round(frac * rows) targets set to ignore_index, at random rows."""
    target = target.clone()
    n_ignored = round(float(frac) * target.numel())
    if n_ignored:
        flat = target.view(-1)
        flat[torch.randperm(flat.numel(), generator=gen)[:n_ignored]] = IGNORE_INDEX
    return target


def _linear_ce_inputs(case: Case, gen: torch.Generator, true_class: torch.Tensor) -> Inputs:
    """hidden [N, H], weight [V, H] (scaled so logits are ~N(0, 1)), optional bias, targets.
    `peaked`: each hidden row is pushed along its target's weight row until the true class's softmax
    reaches a draw from U(0.9, 0.999) (exact for the first-order logit, close after the push)."""
    opts, dtype, device = case.options, case.torch_dtype, torch.device(case.device)
    hidden = torch.randn(case.n, case.h, generator=gen)
    weight = torch.randn(case.c, case.h, generator=gen) / math.sqrt(case.h)
    bias = 0.1 * torch.randn(case.c, generator=gen) if opts["bias"] else None
    if case.input_dist == "peaked":
        logits = torch.nn.functional.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
        p = 0.9 + 0.099 * torch.rand(case.n, generator=gen, dtype=torch.float64)
        others = logits.scatter(1, true_class.unsqueeze(1), -math.inf).logsumexp(1)
        want = torch.log(p / (1 - p)) + others
        w_y = weight.double()[true_class]
        push = (want - logits.gather(1, true_class.unsqueeze(1)).squeeze(1)) / (w_y * w_y).sum(1)
        hidden = (hidden.double() + push.unsqueeze(1) * w_y).float()
    target = _ignored(true_class, opts["ignore_frac"], gen).to(device)
    kwargs: dict[str, Any] = {"bias": None if bias is None else bias.to(dtype).to(device),
                              "ignore_index": IGNORE_INDEX, "reduction": opts["reduction"],
                              "label_smoothing": float(opts["label_smoothing"])}
    grad_output = (torch.randn(case.n, generator=gen) if opts["reduction"] == "none"
                   else 0.5 + 1.5 * torch.rand((), generator=gen))
    differentiable = (0, 1, "bias") if bias is not None else (0, 1)
    return Inputs([hidden.to(dtype).to(device), weight.to(dtype).to(device), target], kwargs, differentiable,
                  grad_output.to(dtype).to(device))


def make_inputs(case: Case) -> Inputs:
    fam, opts = case.family, case.options
    dtype, device = case.torch_dtype, torch.device(case.device)
    gen = torch.Generator().manual_seed(case.seed())
    row_shape = _class_last_shape(case)[:-1]
    true_class = torch.randint(0, case.c, row_shape, generator=gen)
    if fam == "linear_ce":
        return _linear_ce_inputs(case, gen, true_class)
    noncontig = bool(opts["noncontig"])

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
            target = _ignored(true_class, opts["ignore_frac"], gen).to(device)
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
