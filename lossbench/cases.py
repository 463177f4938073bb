"""A case is one measurable problem: family x shape x dtype x device x input distribution x options.

`make_inputs` turns a case into the tensors an implementation is called with: the case's family
(lossbench/families) draws them from a seed derived from the case (not the device), on the CPU, so
every implementation and every device sees the same numbers.
"""
from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UsageError
from .families import FAMILIES, INPUT_DISTS, get_family, normalize_options
from .inputs import Inputs

__all__ = ["Case", "DTYPES", "Inputs", "make_inputs", "parse_dtype", "parse_shape"]

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


def make_inputs(case: Case) -> Inputs:
    """The tensors one call of `case` receives: the family draws them from the case's seed."""
    return get_family(case.family).inputs(case, torch.Generator().manual_seed(case.seed()))
