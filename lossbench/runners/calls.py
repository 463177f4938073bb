"""What a timed sample of each mode runs, and the untimed set-up before it.

- fwd:     forward under no_grad
- fwd_bwd: forward then backward (the headline: what a training step pays)
- bwd:     backward only; the graph is rebuilt, untimed, before every sample
Implementations that write into their inputs get them restored, untimed, before every sample, so
no implementation is ever timed on data a previous call overwrote.
"""
from __future__ import annotations

import torch

from ..cases import Inputs
from ..families import MODES




class ModeCall:
    def __init__(self, fn, pristine: Inputs, mode: str, fresh_inputs: bool):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.fn, self.mode, self.fresh = fn, mode, fresh_inputs
        self.pristine = pristine
        self.inputs = pristine.clone()
        self.leaves = [t.requires_grad_(mode != "fwd") for t in self.inputs.grad_inputs()]
        self.out: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        return self.fn(*self.inputs.args, **self.inputs.kwargs)

    def setup(self) -> None:
        if self.fresh:
            with torch.no_grad():
                for t, p in zip(self.inputs.tensors(), self.pristine.tensors()):
                    t.copy_(p)
        for leaf in self.leaves:
            leaf.grad = None  # no accumulation add inside the timed region
        if self.mode == "bwd":
            self.out = self._forward()

    def __call__(self) -> None:
        if self.mode == "fwd":
            with torch.no_grad():
                self._forward()
        elif self.mode == "fwd_bwd":
            self._forward().backward(self.inputs.grad_output)
        else:
            out, self.out = self.out, None
            out.backward(self.inputs.grad_output)
