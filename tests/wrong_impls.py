"""Deliberately wrong cross-entropy implementations: the accuracy runner must catch each one.

Each computes the correct forward loss, so only the gradient check can tell them apart."""
import torch
import torch.nn.functional as F


def _softmax_minus_onehot(logits, target):
    grad = logits.double().softmax(1)
    rows = torch.arange(len(target))
    grad[rows, target.clamp(min=0)] -= 1
    return grad, rows


class _CorrectForward(torch.autograd.Function):
    reduction = "mean"

    @classmethod
    def forward(cls, ctx, logits, target):
        ctx.save_for_backward(logits, target)
        return F.cross_entropy(logits, target, reduction=cls.reduction)


class IgnoresIgnoreIndexInGrad(_CorrectForward):
    """Backward treats ignored rows as if their target were class 0."""

    @staticmethod
    def backward(ctx, g):
        logits, target = ctx.saved_tensors
        grad, _ = _softmax_minus_onehot(logits, target)
        return (g * grad / (target != -100).sum()).to(logits.dtype), None


class RoundsTrueClassToBf16(_CorrectForward):
    """Liger's old bug: p_y rounded to bfloat16 before 1 is subtracted (float32 everywhere else)."""

    @staticmethod
    def backward(ctx, g):
        logits, target = ctx.saved_tensors
        p = logits.float().softmax(1)
        rows = torch.arange(len(target))
        grad = p.clone()
        grad[rows, target] = p[rows, target].bfloat16().float() - 1
        return (g * grad / len(target)).to(logits.dtype), None


class ScalesByFirstGradOutput(_CorrectForward):
    """Liger #968: reduction='none' backward scales every row by grad_output[0]."""

    reduction = "none"

    @staticmethod
    def backward(ctx, g):
        logits, target = ctx.saved_tensors
        grad, _ = _softmax_minus_onehot(logits, target)
        return (g[0] * grad).to(logits.dtype), None


def ignores_ignore_index(logits, target, **kw):
    return IgnoresIgnoreIndexInGrad.apply(logits, target)


def rounds_true_class(logits, target, **kw):
    return RoundsTrueClassToBf16.apply(logits, target)


def scales_by_first(logits, target, **kw):
    return ScalesByFirstGradOutput.apply(logits, target)


def returns_nan(logits, target, **kw):
    return F.cross_entropy(logits, target, **kw) * torch.tensor(float("nan"))


def wrong_without_grad(logits, target, **kw):
    """Right with gradients; without them (a `fwd` call under no_grad) its loss is 1% too large,
    as a kernel whose inference path differs from its training path can be."""
    loss = F.cross_entropy(logits, target, **kw)
    return loss if torch.is_grad_enabled() else loss * 1.01
