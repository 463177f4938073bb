"""The loss families: one module each, every piece stated, nothing answered for another family."""
import math
import re
from pathlib import Path

import pytest
import torch

from lossbench import bandwidth, reference, registry
from lossbench.cases import Case, make_inputs
from lossbench.errors import UsageError
from lossbench.families import FAMILIES, get_family
from lossbench.families.base import Family
from lossbench.families.kl import KL
from lossbench.runners import memory

D = torch.float64
PACKAGE = Path(__file__).resolve().parents[1] / "lossbench"


def test_a_family_missing_a_method_cannot_be_instantiated():
    class NoBytes(KL):  # every attribute inherited, one method taken away
        bytes_moved = None

    NoBytes.__abstractmethods__ = frozenset({"bytes_moved"})
    with pytest.raises(TypeError, match="bytes_moved"):
        NoBytes()

    with pytest.raises(TypeError, match="abstract"):
        class Half(Family):  # states everything but implements nothing
            name, title, signature = "half", "Half", "fn(x)"
            reductions, default_reduction, options = ("sum",), "sum", {"reduction": "sum"}
            shape_form, default_shape, axis_label, baseline_description, row_args = "NxC", "2x2", "c", "", (0,)

        Half()


def test_a_family_missing_an_attribute_fails_when_defined():
    with pytest.raises(TypeError, match="default_shape"):
        class NoShape(Family):
            name, title, signature = "x", "X", "fn(x)"
            reductions, default_reduction, options = ("sum",), "sum", {"reduction": "sum"}
            shape_form, axis_label, baseline_description, row_args = "NxC", "c", "", (0,)


def test_every_family_has_its_baseline_registered():
    for name, fam in FAMILIES.items():
        assert registry.get(name, registry.BASELINE).fn is fam.baseline


def test_no_module_outside_the_families_branches_on_a_family_name():
    """What a family answers lives in its module: the harness never tests `family == "ce"` (which
    would answer for a new family with another's answer)."""
    pattern = re.compile(r"""family\s*(==|!=|in)\s*\(?["'](nll|ce|kl|linear_ce|jsd)["']""")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "families":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_answers_for_itself(family):
    fam = get_family(family)
    dims = [int(d) for d in fam.default_shape.split("x")]
    dims[0], dims[-1] = 8, 16
    inputs = make_inputs(Case.from_shape(family, tuple(dims), "float32", "cpu"))
    ref = reference.compute(family, inputs)
    assert torch.isfinite(ref.loss).all() and len(ref.grads) == len(inputs.differentiable)
    loss_b, grad_b = fam.output_bytes(inputs, ref.loss.numel())
    assert set(grad_b) == set(inputs.differentiable) and loss_b > 0
    assert memory.floor_bytes(family, inputs, tuple(ref.loss.shape), "fwd_bwd", "cuda") == loss_b + sum(grad_b.values())
    moved = {m: bandwidth.bytes_moved(Case.from_shape(family, tuple(dims), "float32", "cpu"), inputs,
                                      ref.loss.numel(), m) for m in ("fwd", "fwd_bwd", "bwd")}
    assert 0 < moved["fwd"] < moved["fwd_bwd"]
    with torch.no_grad():
        torch.testing.assert_close(fam.baseline(*inputs.args, **inputs.kwargs).double(), ref.loss,
                                   rtol=1e-4, atol=1e-6)


# --- jsd ------------------------------------------------------------------------------------------
def _jsd(log_q, log_p, grad_output=1.0, **kwargs):
    from lossbench.cases import Inputs

    go = grad_output if isinstance(grad_output, torch.Tensor) else torch.tensor(grad_output, dtype=D)
    return reference.compute("jsd", Inputs([log_q, log_p], kwargs, (0,), go))


def test_jsd_hand_computed():
    q, p = torch.tensor([[0.5, 0.5]], dtype=D), torch.tensor([[0.9, 0.1]], dtype=D)
    x, y = q.log(), p.log()
    m = 0.5 * p + 0.5 * q  # beta = 0.5
    half = 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)) + \
        0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3))
    assert _jsd(x, y, beta=0.5).loss.item() == pytest.approx(half, rel=1e-12)
    # Liger's ends: beta 0 is the forward KL(P || Q), beta 1 the reverse KL(Q || P)
    assert _jsd(x, y, beta=0.0).loss.item() == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), rel=1e-12)
    assert _jsd(x, y, beta=1.0).loss.item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5), rel=1e-12)
    # the gradient, against its closed form (1 - beta) Q (log Q - log M)
    beta = 0.3
    m = beta * p + (1 - beta) * q
    torch.testing.assert_close(_jsd(x, y, beta=beta).grads[0], (1 - beta) * q * (x - m.log()), rtol=1e-12, atol=0)
    torch.testing.assert_close(_jsd(x, y, beta=0.0).grads[0], -p, rtol=1e-12, atol=0)
    torch.testing.assert_close(_jsd(x, y, beta=1.0).grads[0], q * (x - y + 1), rtol=1e-12, atol=0)


def test_jsd_labels_batchmean_and_empty_mean():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=gen, dtype=D).log_softmax(1)
    y = torch.randn(4, 6, generator=gen, dtype=D).log_softmax(1)
    label = torch.tensor([1, -100, 2, -100])
    rows = _jsd(x, y, torch.ones(4, dtype=D), reduction="none").loss
    kept = _jsd(x, y, label=label, reduction="batchmean")
    assert kept.loss.item() == pytest.approx((rows[0] + rows[2]).item() / 2, rel=1e-12)
    assert kept.grads[0][1].abs().max() == 0 and kept.grads[0][0].abs().max() > 0
    none = _jsd(x, y, torch.ones(4, dtype=D), label=label, reduction="none").loss
    assert none[1] == 0 and none[3] == 0
    empty = _jsd(x, y, label=torch.full((4,), -100), reduction="batchmean")
    assert math.isnan(empty.loss.item()) and empty.grads[0].abs().max() == 0


def test_jsd_options_are_checked():
    with pytest.raises(UsageError, match="beta"):
        Case.make("jsd", 4, 8, "float32", "cpu", options={"beta": 1.5})
    with pytest.raises(UsageError, match="beta"):
        Case.make("jsd", 4, 8, "float32", "cpu", options={"beta": "half"})
    with pytest.raises(UsageError, match="reduction"):
        Case.make("jsd", 4, 8, "float32", "cpu", options={"reduction": "mean"})
    with pytest.raises(UsageError, match="no option"):
        Case.make("jsd", 4, 8, "float32", "cpu", options={"weight": True})
    inputs = make_inputs(Case.make("jsd", 40, 8, "float32", "cpu", options={"ignore_frac": 0.25}))
    assert int((inputs.kwargs["label"] == -100).sum()) == 10
    assert make_inputs(Case.make("jsd", 4, 8, "float32", "cpu")).kwargs["label"] is None


def test_the_built_in_implementations_never_import_the_registry():
    """registry -> impls, never back: the built-ins declare themselves in lossbench/implementation.py."""
    import ast

    offenders = []
    for path in (PACKAGE / "impls").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            names += [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[-1] == "registry" for n in names):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []
    # and every built-in still reaches the registry
    from lossbench.implementation import BUILTINS

    assert {(i.family, i.name) for i in BUILTINS} <= {(i.family, i.name) for i in registry.implementations()}
