"""KLDivLoss: pointwise target * (log target - input) over log-probability inputs, or log targets."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..inputs import Inputs, class_last_shape, logits, nbytes, scalar_grad_output
from .base import Family
from .nll import LAYOUT_OPTIONS, placer, validate_layout


class KL(Family):
    name = "kl"
    title = "KLDivLoss"
    signature = 'fn(input, target, *, reduction="batchmean", log_target=False)'
    reductions = ("none", "batchmean", "sum", "mean")
    default_reduction = "batchmean"
    options = {"reduction": "batchmean", "log_target": False, **LAYOUT_OPTIONS}
    shape_form = "NxC"
    default_shape = "2048x1000"
    axis_label = "classes c"
    baseline_description = "F.kl_div"
    row_args = (0, 1)

    def validate(self, options):
        validate_layout(options)

    def inputs(self, case, gen):
        opts, dtype, device = case.options, case.torch_dtype, torch.device(case.device)
        true_class = torch.randint(0, case.c, class_last_shape(case)[:-1], generator=gen)
        place = placer(case, bool(opts["noncontig"]))
        log_q = F.log_softmax(logits(case, gen, true_class), -1)
        p_logits = logits(case, gen, true_class)
        target = F.log_softmax(p_logits, -1) if opts["log_target"] else F.softmax(p_logits, -1)
        args = [place(log_q), place(target)]
        kwargs = {"reduction": opts["reduction"], "log_target": bool(opts["log_target"])}
        # reduction="none": one loss per element
        grad_output = (torch.randn(tuple(args[0].shape), generator=gen) if opts["reduction"] == "none"
                       else scalar_grad_output(gen))
        return Inputs(args, kwargs, (0,), grad_output.to(dtype).to(device))

    def reference(self, input, target, *, reduction="batchmean", log_target=False):
        # 0 * log 0 = 0 (xlogy); "mean" divides by every element, "batchmean" by dim 0
        pointwise = target.exp() * (target - input) if log_target else torch.xlogy(target, target) - target * input
        if reduction == "none":
            return pointwise
        total = pointwise.sum()
        if reduction == "sum":
            return total
        return total / (pointwise.numel() if reduction == "mean" else input.shape[0])

    def mean_denominator(self, inputs):
        x = inputs.args[0]
        return torch.tensor(float(x.numel() if inputs.kwargs["reduction"] == "mean" else x.shape[0]),
                            dtype=torch.float64)

    def bytes_moved(self, inputs, loss_numel, mode):
        # the gradient needs only the target: -t (or -exp(t)) over the scale
        x, target = inputs.args
        xb, extra, out = nbytes(x), nbytes(target), loss_numel * x.element_size()
        return {"fwd": xb + extra + out, "fwd_bwd": 2 * xb + extra + out, "bwd": xb + extra}[mode]

    def output_bytes(self, inputs, loss_numel):
        return self.dense_output_bytes(inputs, loss_numel)

    @property
    def baseline(self):
        return F.kl_div


FAMILY = KL()
