"""A plugin for the compare/nightly end-to-end tests: torch's cross-entropy, made slower or wrong on
demand through the environment (read at call time, in the sweep's worker process):
LOSSBENCH_TEST_SLOWDOWN=K runs the computation K times (K-fold slower); LOSSBENCH_TEST_WRONG_GRAD=1
scales the gradient by 1.01 (the loss stays right)."""
import os

import torch
import torch.nn.functional as F

import lossbench


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


@lossbench.register(family="ce", name="adjustable", description="torch cross-entropy, slowed or wrong on demand")
def adjustable(logits, target, **kw):
    for _ in range(int(os.environ.get("LOSSBENCH_TEST_SLOWDOWN", "1")) - 1):
        F.cross_entropy(logits.detach(), target, **kw)
    if os.environ.get("LOSSBENCH_TEST_WRONG_GRAD") == "1":
        logits = _ScaleGrad.apply(logits)
    return F.cross_entropy(logits, target, **kw)
