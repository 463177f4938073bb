"""torch's own implementations, under the same names in every family:

- torch_module:     nn.NLLLoss / nn.CrossEntropyLoss / nn.KLDivLoss
- torch_functional: each family's baseline (F.nll_loss / F.cross_entropy / F.kl_div; jsd's from
                    primitives): the implementation every table compares with
- torch_composed:   the loss as a user would write it from primitives (log_softmax + gather, xlogy)
- torch_compile:    torch.compile of the functional form
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..families import FAMILIES
from ..families import jsd as jsd_family
from ..implementation import BASELINE, builtin

# --- torch_module -------------------------------------------------------------------------------
# Modules are built once per (class, options, weight) like a training loop does; building one per
# call would add tens of microseconds to every sample. The cache holds the weight tensor itself,
# so its id cannot be reused while the entry lives.
_modules: dict[tuple, tuple[nn.Module, torch.Tensor | None]] = {}


def _module(cls: type[nn.Module], weight: torch.Tensor | None = None, **kwargs) -> nn.Module:
    key = (cls, id(weight), tuple(sorted(kwargs.items())))
    hit = _modules.get(key)
    if hit is None or hit[1] is not weight:
        if len(_modules) > 64:
            _modules.clear()
        module = cls(weight=weight, **kwargs) if weight is not None else cls(**kwargs)
        _modules[key] = hit = (module, weight)
    return hit[0]


@builtin(family="nll", name="torch_module", description="nn.NLLLoss")
def nll_module(log_probs, target, *, weight=None, ignore_index=-100, reduction="mean"):
    return _module(nn.NLLLoss, weight, ignore_index=ignore_index, reduction=reduction)(log_probs, target)


@builtin(family="ce", name="torch_module", description="nn.CrossEntropyLoss")
def ce_module(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    return _module(nn.CrossEntropyLoss, weight, ignore_index=ignore_index, reduction=reduction,
                   label_smoothing=label_smoothing)(logits, target)


@builtin(family="kl", name="torch_module", description="nn.KLDivLoss")
def kl_module(input, target, *, reduction="batchmean", log_target=False):
    return _module(nn.KLDivLoss, reduction=reduction, log_target=log_target)(input, target)


# --- torch_functional ---------------------------------------------------------------------------
# Every family states its baseline (Family.baseline): registered here for all of them, so no family
# can lack the implementation every comparison is made against.
for _family in FAMILIES.values():
    builtin(family=_family.name, name=BASELINE, description=_family.baseline_description)(_family.baseline)


# --- torch_composed -----------------------------------------------------------------------------
def _reduce_kept(rows: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-row losses over the non-ignored rows. Selecting them (rather than multiplying by a
    0/1 mask) keeps torch's convention when every row is ignored: a NaN mean with a zero gradient,
    where mask-multiplying would send inf * 0 = NaN back into every row."""
    if reduction == "none":
        return rows * keep
    kept = rows[keep].sum()
    return kept if reduction == "sum" else kept / w[keep].sum()


def _picked(log_p, target, weight, ignore_index):
    """-w[y] * log p[y] per row (ignored rows read class 0 and are dropped later), w[y], and the mask."""
    keep = target != ignore_index
    safe = target.masked_fill(~keep, 0)
    w = weight[safe] if weight is not None else torch.ones_like(safe, dtype=log_p.dtype)
    return -log_p.gather(1, safe.unsqueeze(1)).squeeze(1) * w, w, keep


@builtin(family="nll", name="torch_composed", description="gather + weighted mean over kept rows")
def nll_composed(log_probs, target, *, weight=None, ignore_index=-100, reduction="mean"):
    rows, w, keep = _picked(log_probs, target, weight, ignore_index)
    return _reduce_kept(rows, w, keep, reduction)


@builtin(family="ce", name="torch_composed", description="log_softmax + gather (+ smoothing term)")
def ce_composed(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    log_p = torch.log_softmax(logits, 1)
    n_classes = logits.shape[1]
    wc = weight.view(1, -1, *([1] * (logits.dim() - 2))) if weight is not None else 1.0
    if target.is_floating_point():
        t = target * (1 - label_smoothing) + label_smoothing / n_classes
        rows = -(t * wc * log_p).sum(1)
        if reduction == "none":
            return rows
        return rows.sum() if reduction == "sum" else rows.sum() / rows.numel()
    rows, w, keep = _picked(log_p, target, weight, ignore_index)
    if label_smoothing:
        smooth = -(log_p * wc).sum(1)
        rows = (1 - label_smoothing) * rows + (label_smoothing / n_classes) * smooth
    return _reduce_kept(rows, w, keep, reduction)


@builtin(family="kl", name="torch_composed", description="xlogy(t, t) - t * input, or exp(t) * (t - input)")
def kl_composed(input, target, *, reduction="batchmean", log_target=False):
    pointwise = target.exp() * (target - input) if log_target else torch.xlogy(target, target) - target * input
    if reduction == "none":
        return pointwise
    if reduction == "sum":
        return pointwise.sum()
    return pointwise.sum() / (pointwise.numel() if reduction == "mean" else input.shape[0])


# --- torch_compile ------------------------------------------------------------------------------
# One compiled callable per family, specialised on each shape (dynamic=False: a benchmark should see
# the best static kernel, not a dynamic-shape one chosen after the second shape). Every case is a
# new specialisation, so the recompile limit (8 by default, after which dynamo silently falls back
# to eager) is raised: a fallback would be timed as "compiled" without anyone knowing.
_compiled: dict[str, object] = {}


def _compile(family: str, fn):
    if family not in _compiled:
        import torch._dynamo

        for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                      "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 4096))
        if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
            torch._dynamo.config.fail_on_recompile_limit_hit = True  # an error row, never a silent eager run
        _compiled[family] = torch.compile(fn, dynamic=False)
    return _compiled[family]


def _nll_fn(log_probs, target, weight, ignore_index, reduction):
    return F.nll_loss(log_probs, target, weight=weight, ignore_index=ignore_index, reduction=reduction)


def _ce_fn(logits, target, weight, ignore_index, reduction, label_smoothing):
    return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)


def _kl_fn(input, target, reduction, log_target):
    return F.kl_div(input, target, reduction=reduction, log_target=log_target)


@builtin(family="nll", name="torch_compile", compiles=True, description="torch.compile(F.nll_loss)")
def nll_compile(log_probs, target, *, weight=None, ignore_index=-100, reduction="mean"):
    return _compile("nll", _nll_fn)(log_probs, target, weight, ignore_index, reduction)


@builtin(family="ce", name="torch_compile", compiles=True, description="torch.compile(F.cross_entropy)")
def ce_compile(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    return _compile("ce", _ce_fn)(logits, target, weight, ignore_index, reduction, label_smoothing)


@builtin(family="kl", name="torch_compile", compiles=True, description="torch.compile(F.kl_div)")
def kl_compile(input, target, *, reduction="batchmean", log_target=False):
    return _compile("kl", _kl_fn)(input, target, reduction, log_target)


# --- linear_ce: the projection to the vocabulary, then cross-entropy -----------------------------
@builtin(family="linear_ce", name="torch_module", description="F.linear + nn.CrossEntropyLoss")
def linear_ce_module(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    loss = _module(nn.CrossEntropyLoss, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    return loss(F.linear(hidden, weight, bias), target)


@builtin(family="linear_ce", name="torch_composed", description="matmul + log_softmax + gather")
def linear_ce_composed(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                       label_smoothing=0.0):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return ce_composed(logits, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)


def _linear_ce_fn(hidden, weight, target, bias, ignore_index, reduction, label_smoothing):
    return F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)


@builtin(family="linear_ce", name="torch_compile", compiles=True,
          description="torch.compile(F.linear + F.cross_entropy)")
def linear_ce_compile(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    return _compile("linear_ce", _linear_ce_fn)(hidden, weight, target, bias, ignore_index, reduction, label_smoothing)


# --- jsd: torch has no JSD; its baseline (torch_functional) is written from primitives --------------
def _jsd_fn(log_q, log_p, label, beta, ignore_index, reduction):
    return jsd_family.functional(log_q, log_p, label=label, beta=beta, ignore_index=ignore_index,
                                 reduction=reduction)


@builtin(family="jsd", name="torch_compile", compiles=True, description="torch.compile of the primitives' JSD")
def jsd_compile(log_q, log_p, *, label=None, beta=0.5, ignore_index=-100, reduction="batchmean"):
    return _compile("jsd", _jsd_fn)(log_q, log_p, label, beta, ignore_index, reduction)
