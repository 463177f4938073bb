"""Implementations that write into their inputs are detected, and never timed on overwritten data."""
import torch
import torch.nn.functional as F

from lossbench import reference
from lossbench.cases import make_inputs
from lossbench.runners import accuracy
from lossbench.runners.calls import ModeCall


class GradIntoLogits(torch.autograd.Function):
    """Liger's pattern: the gradient is computed in forward and written over the logits."""

    @staticmethod
    def forward(ctx, logits, target):
        loss = F.cross_entropy(logits, target)
        grad = logits.softmax(1)
        grad[torch.arange(len(target)), target] -= 1
        logits.data.copy_(grad / len(target))  # .data: no version bump, as a Triton kernel writes
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g, None


def grad_into_logits(logits, target, **kw):
    return GradIntoLogits.apply(logits, target)


def test_writing_into_input_is_flagged(case):
    c = case("ce")
    inputs = make_inputs(c)
    r = accuracy.measure(grad_into_logits, inputs, reference.compute("ce", inputs), c.dtype)
    assert r.mutates_inputs
    assert r.accuracy_ok  # its answer is right: mutation is recorded, not an accuracy failure
    assert not accuracy.measure(F.cross_entropy, inputs, reference.compute("ce", inputs), c.dtype).mutates_inputs


def test_pristine_inputs_survive_a_mutating_call(case):
    inputs = make_inputs(case("ce"))
    before = inputs.args[0].clone()
    accuracy.measure(grad_into_logits, inputs, reference.compute("ce", inputs), "float32")
    assert torch.equal(inputs.args[0], before)


def _seen_inputs(mode, fresh, calls=6):
    seen = []

    def recorder(logits, target, **kw):
        seen.append(logits.detach().clone())
        return grad_into_logits(logits, target)

    call = ModeCall(recorder, make_inputs_for_test(), mode, fresh_inputs=fresh)
    for _ in range(calls):
        call.setup()
        call()
    return seen


def make_inputs_for_test():
    from lossbench.cases import Case

    return make_inputs(Case.make("ce", 32, 10, "float32", "cpu"))


def test_fresh_inputs_for_every_sample_of_a_mutating_impl():
    for mode in ("fwd", "fwd_bwd", "bwd"):
        seen = _seen_inputs(mode, fresh=True)
        assert all(torch.equal(s, seen[0]) for s in seen), mode
        # Without restoring, later calls see the gradient written by earlier ones: what the anchors time.
        stale = _seen_inputs(mode, fresh=False)
        assert not torch.equal(stale[-1], stale[0]), mode


def test_bwd_mode_builds_a_fresh_graph_each_sample():
    call = ModeCall(F.cross_entropy, make_inputs_for_test(), "bwd", fresh_inputs=False)
    for _ in range(3):
        call.setup()
        assert call.out is not None and call.out.grad_fn is not None
        call()
        assert call.out is None
    assert call.leaves[0].grad is not None


def test_sweep_detects_mutation_and_times_on_fresh_inputs():
    from lossbench import registry
    from lossbench.cases import Case
    from lossbench.sweep import Unit, UnitRunner

    seen = []

    def undeclared_scribbler(logits, target, **kw):
        seen.append(logits.detach().clone())
        return grad_into_logits(logits, target)

    registry.register(family="ce", name="test_scribbler")(undeclared_scribbler)  # mutation not declared
    case = Case.make("ce", 32, 10, "float32", "cpu")
    rows = []
    runner = UnitRunner(lambda d: {}, budget_s=0.01)
    for impl in ("torch_functional", "test_scribbler"):
        runner.run(Unit(case, impl, ("fwd", "fwd_bwd", "bwd")), rows.append)
    mine = [r for r in rows if r["impl"] == "test_scribbler"]
    assert [r["status"] for r in mine] == ["ok"] * 3
    assert all(r["mutates_inputs"] and r["accuracy_ok"] for r in mine)
    assert not any(r["mutates_inputs"] for r in rows if r["impl"] == "torch_functional")
    assert len(seen) > 3 * 5 and all(torch.equal(s, seen[0]) for s in seen)
