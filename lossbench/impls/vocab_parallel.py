"""vocab_parallel: cross-entropy with the vocabulary split across the ranks of torch.distributed's default
process group (Megatron's vocab-parallel cross-entropy), on gloo (CPU) or NCCL (GPU).

Each rank reads only its slice of the classes, [rank * C / W, (rank + 1) * C / W), and three collectives
make the loss: an all-reduce MAX of the row maxima m, then one all-reduce SUM of, per row, the sum of
exp(x - m) over the classes that are not the target (q), the target's logit x_y and its exp(x_y - m) (e_y;
each from the one rank that holds the target, zero elsewhere). As in our fused kernels, q is a sum of
positive terms with the target's entry left out, never 1 - p_y formed as a difference: the loss is
log1p(q / e_y) = -log p_y and the target's gradient -q / (q + e_y), both accurate on confident rows.
Where e_y underflows (a target logit ~88 below the row's maximum in float32) the loss is log(q) + m - x_y.

The family's contract is F.cross_entropy's: full logits in, the full gradient out. Every rank receives the
same logits (lossbench's inputs are seeded per case) and computes its slice's gradient; backward then
all-gathers the slices so that every rank's logits.grad is complete. Megatron keeps each slice's gradient
on its rank (the logits come out of a column-parallel linear already split): this all-gather is the price
of the drop-in contract and is in the measured time, with the three all-reduces.

In a process without a process group of two or more ranks it raises NotImplementedError: an `unsupported`
row saying why.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..implementation import builtin

NEEDS_GROUP = ("vocab_parallel splits the vocabulary across the ranks of a torch.distributed process group: "
               "run under torchrun with 2 or more ranks")


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def vocab_range(n_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's classes: contiguous, sizes differing by at most one."""
    base, extra = divmod(n_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def target_grad(q: torch.Tensor, e_y: torch.Tensor) -> torch.Tensor:
    """The target's gradient entry, p_y - 1, as -q / (q + e_y): from the sum q, never 1 - p_y."""
    return -q / (q + e_y)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction):
        rank, world_size = world()
        n, c = logits.shape
        start, end = vocab_range(c, rank, world_size)
        compute = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        x = logits[:, start:end].to(compute)
        m = x.max(dim=1).values if end > start else torch.full((n,), -torch.inf, dtype=compute, device=x.device)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        kept = target != ignore_index
        here = kept & (target >= start) & (target < end)
        local = torch.where(here, target - start, 0).unsqueeze(1)
        e = torch.exp(x - m.unsqueeze(1))
        x_y = torch.where(here, x.gather(1, local).squeeze(1) if end > start else m, 0.0)
        e_y = torch.where(here, e.gather(1, local).squeeze(1) if end > start else m, 0.0)
        # q: the target's entry zeroed before the sum, so that q never is (total - e_y)
        q = e.scatter(1, local, torch.where(here, 0.0, e.gather(1, local).squeeze(1)).unsqueeze(1)).sum(1) \
            if end > start else torch.zeros_like(m)
        packed = torch.stack([q, x_y, e_y])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        q, x_y, e_y = packed
        tiny = torch.finfo(compute).tiny
        loss_rows = torch.where(e_y > tiny, torch.log1p(q / e_y.clamp_min(tiny)), torch.log(q) + m - x_y)
        loss_rows = torch.where(kept, loss_rows, 0.0)
        kept_count = int(kept.sum())
        if reduction == "mean":
            loss = loss_rows.sum() / kept_count if kept_count else loss_rows.sum() * torch.nan
        elif reduction == "sum":
            loss = loss_rows.sum()
        else:
            loss = loss_rows
        ctx.save_for_backward(e, q, e_y, here, kept, local)
        ctx.shape, ctx.range, ctx.reduction, ctx.kept_count = (n, c), (start, end), reduction, kept_count
        ctx.dtype = logits.dtype
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        e, q, e_y, here, kept, local = ctx.saved_tensors
        (n, c), (start, end) = ctx.shape, ctx.range
        total = q + e_y
        g = e / total.unsqueeze(1)  # p_j of this rank's classes
        if end > start:
            g.scatter_(1, local, torch.where(here, target_grad(q, e_y), g.gather(1, local).squeeze(1)).unsqueeze(1))
        go = grad_out.to(g.dtype)
        if ctx.reduction == "mean":
            go = go / ctx.kept_count
        row_scale = torch.where(kept, go if go.dim() else go.expand(n), 0.0)
        g = (g * row_scale.unsqueeze(1)).to(ctx.dtype)
        # every rank's slice into every rank's full gradient (slices differ in size by at most one class)
        world_size = world()[1]
        widths = [e - s for s, e in (vocab_range(c, r, world_size) for r in range(world_size))]
        padded = torch.zeros(n, max(widths), dtype=g.dtype, device=g.device)
        padded[:, : end - start] = g
        slices = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(slices, padded)
        full = torch.cat([s[:, :w] for s, w in zip(slices, widths)], dim=1)
        return full, None, None, None


@builtin(family="ce", name="vocab_parallel", unsupported=("weight", "label_smoothing", "target=prob", "spatial"),
          collective=True, description="vocabulary split across the process group's ranks (3 all-reduces, "
                                       "an all-gather of the gradient)")
def vocab_parallel(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    if world()[1] < 2:
        raise NotImplementedError(NEEDS_GROUP)
    if weight is not None or label_smoothing or logits.dim() != 2 or target.dim() != 1:
        raise NotImplementedError("vocab_parallel takes (N, C) logits, class targets, no weight, no smoothing")
    return _VocabParallelCE.apply(logits, target, ignore_index, reduction)
