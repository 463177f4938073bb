"""A plugin for the compare/nightly end-to-end tests: torch's cross-entropy, made slower or wrong on
demand through the environment (read at call time, in the sweep's worker process).

LOSSBENCH_TEST_SLOWDOWN=F makes every call F times as long: after its forward, and after its
backward, it spins for (F - 1) times what that part took. LOSSBENCH_TEST_WRONG_GRAD=1 scales the
gradient by 1.01 (the loss stays right)."""
import os
import time

import torch
import torch.nn.functional as F

import lossbench


def _spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _SlowBackward(torch.autograd.Function):
    """Identity on the logits. Its backward runs after cross-entropy's, and spins for (F - 1) times
    the time since backward started (marked by a hook on the loss)."""

    @staticmethod
    def forward(ctx, x, clock, factor, scale):
        ctx.clock, ctx.factor, ctx.scale = clock, factor, scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.factor > 1 and "start" in ctx.clock:
            _spin((ctx.factor - 1) * (time.perf_counter() - ctx.clock["start"]))
        return g * ctx.scale if ctx.scale != 1 else g, None, None, None


@lossbench.register(family="ce", name="adjustable", description="torch cross-entropy, slowed or wrong on demand")
def adjustable(logits, target, **kw):
    factor = float(os.environ.get("LOSSBENCH_TEST_SLOWDOWN", "1"))
    scale = 1.01 if os.environ.get("LOSSBENCH_TEST_WRONG_GRAD") == "1" else 1.0
    clock = {}
    if logits.requires_grad and torch.is_grad_enabled():
        logits = _SlowBackward.apply(logits, clock, factor, scale)
    t0 = time.perf_counter()
    loss = F.cross_entropy(logits, target, **kw)
    if factor > 1:
        _spin((factor - 1) * (time.perf_counter() - t0))
    if loss.requires_grad:
        loss.register_hook(lambda g: clock.__setitem__("start", time.perf_counter()))
    return loss
