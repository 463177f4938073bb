"""The float64 reference: hand-computed values, and torch in float64 over the variant grid."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lossbench import reference
from lossbench.cases import Inputs, make_inputs
from lossbench.families import get_family

D = torch.float64


def _ref(family, args, grad_output=1.0, **kwargs):
    inputs = Inputs(list(args), kwargs, (0,), torch.tensor(grad_output, dtype=D))
    return reference.compute(family, inputs)


def test_nll_hand_computed():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=D)
    t = torch.tensor([1, 0])
    assert _ref("nll", (logp, t), reduction="mean").loss.item() == pytest.approx((2 + 0.5) / 2)
    assert _ref("nll", (logp, t), reduction="sum").loss.item() == pytest.approx(2.5)
    w = torch.tensor([2.0, 1.0], dtype=D)
    # weighted mean: (1*2 + 2*0.5) / (1 + 2)
    assert _ref("nll", (logp, t), weight=w).loss.item() == pytest.approx(1.0)
    r = _ref("nll", (logp, torch.tensor([-100, 0])), reduction="mean")
    assert r.loss.item() == pytest.approx(0.5)
    assert r.grads[0].tolist() == [[0.0, 0.0], [-1.0, 0.0]]


def test_ce_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=D)  # softmax = [1/4, 3/4]
    t = torch.tensor([0])
    r = _ref("ce", (logits, t))
    assert r.loss.item() == pytest.approx(math.log(4))
    torch.testing.assert_close(r.grads[0], torch.tensor([[-0.75, 0.75]], dtype=D))
    # label smoothing 0.5 over 2 classes: target (0.75, 0.25)
    r = _ref("ce", (logits, t), label_smoothing=0.5)
    assert r.loss.item() == pytest.approx(0.75 * math.log(4) + 0.25 * math.log(4 / 3))
    torch.testing.assert_close(r.grads[0], torch.tensor([[0.25 - 0.75, 0.75 - 0.25]], dtype=D))
    # probability target (0.5, 0.5)
    r = _ref("ce", (logits, torch.tensor([[0.5, 0.5]], dtype=D)))
    assert r.loss.item() == pytest.approx(0.5 * math.log(4) + 0.5 * math.log(4 / 3))


def test_ce_all_ignored_is_nan_with_zero_gradient():
    r = _ref("ce", (torch.randn(3, 4, dtype=D), torch.full((3,), -100)), label_smoothing=0.1)
    assert math.isnan(r.loss.item())
    assert torch.equal(r.grads[0], torch.zeros(3, 4, dtype=D))


def test_kl_hand_computed():
    log_q = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=D))
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=D)  # a zero target contributes 0 (0 log 0 = 0)
    expected = math.log(2) + 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)
    assert _ref("kl", (log_q, p), reduction="sum").loss.item() == pytest.approx(expected)
    r = _ref("kl", (log_q, p), reduction="batchmean")
    assert r.loss.item() == pytest.approx(expected / 2)
    torch.testing.assert_close(r.grads[0], -p / 2)
    assert _ref("kl", (log_q, p), reduction="mean").loss.item() == pytest.approx(expected / 4)
    r = _ref("kl", (log_q, torch.log(torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=D))), reduction="sum", log_target=True)
    assert r.loss.item() == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2) + 0.5 * math.log(2) + 0.5 * math.log(2 / 3))


GRID = {
    "nll": [dict(reduction=r, weight=w, ignore_frac=i) for r, w, i in
            itertools.product(["none", "mean", "sum"], [False, True], [0.0, 0.3, 1.0])],
    "ce": [dict(reduction=r, weight=w, ignore_frac=i, label_smoothing=s) for r, w, i, s in
           itertools.product(["none", "mean", "sum"], [False, True], [0.0, 0.3, 1.0], [0.0, 0.2])]
    + [dict(target="prob", reduction=r, weight=w, label_smoothing=s) for r, w, s in
       itertools.product(["none", "mean", "sum"], [False, True], [0.0, 0.2])]
    + [dict(spatial=3, noncontig=True, reduction="none", weight=True), dict(spatial=2, target="prob")],
    "kl": [dict(reduction=r, log_target=lt) for r, lt in
           itertools.product(["none", "batchmean", "sum", "mean"], [False, True])] + [dict(spatial=3, noncontig=True)],
}
GRID["linear_ce"] = [dict(reduction=r, ignore_frac=i, label_smoothing=s, bias=b) for r, i, s, b in
                     itertools.product(["none", "mean", "sum"], [0.0, 0.3, 1.0], [0.0, 0.2], [False, True])]


def _torch_linear_ce(hidden, weight, target, *, bias=None, **kw):
    return F.cross_entropy(F.linear(hidden, weight, bias), target, **kw)


TORCH = {"nll": F.nll_loss, "ce": F.cross_entropy, "kl": F.kl_div, "linear_ce": _torch_linear_ce}


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("dist", ["normal", "peaked"])
@pytest.mark.parametrize("family", list(GRID))
def test_reference_matches_torch_in_float64(case, family, dist):
    for options in GRID[family]:
        h = {"h": 5} if family == "linear_ce" else {}
        inputs = make_inputs(case(family, n=12, c=7, dtype="float64", dist=dist, **h, **options)).clone()
        ref = reference.compute(family, inputs)
        leaves = [t.requires_grad_(True) for t in inputs.grad_inputs()]
        out = TORCH[family](*inputs.args, **inputs.kwargs)
        out.backward(inputs.grad_output)
        torch.testing.assert_close(out, ref.loss, equal_nan=True, rtol=1e-12, atol=1e-14, msg=str(options))
        assert len(leaves) == len(ref.grads) == (3 if options.get("bias") else 1 + (family == "linear_ce"))
        for leaf, grad in zip(leaves, ref.grads):
            torch.testing.assert_close(leaf.grad, grad, rtol=1e-12, atol=1e-14, msg=str(options))


def test_linear_ce_hand_computed():
    hidden = torch.tensor([[1.0, 0.0]], dtype=D)
    weight = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=D)  # logits [0, ln 3]: softmax [1/4, 3/4]
    inputs = Inputs([hidden, weight, torch.tensor([0])], {"bias": torch.zeros(2, dtype=D)}, (0, 1, "bias"),
                    torch.tensor(1.0, dtype=D))
    r = reference.compute("linear_ce", inputs)
    assert r.loss.item() == pytest.approx(math.log(4))
    g_logits = torch.tensor([[-0.75, 0.75]], dtype=D)
    torch.testing.assert_close(r.grads[0], g_logits @ weight)  # d hidden
    torch.testing.assert_close(r.grads[1], g_logits.t() @ hidden)  # d weight
    torch.testing.assert_close(r.grads[2], g_logits[0])  # d bias


@pytest.mark.parametrize("family,shape,opts", [
    ("ce", (37, 50), {}),
    ("ce", (37, 50), {"reduction": "none"}),
    ("ce", (37, 50), {"reduction": "sum", "weight": True, "ignore_frac": 0.3, "label_smoothing": 0.1}),
    ("ce", (37, 50), {"weight": True, "ignore_frac": 0.3}),
    ("ce", (37, 50), {"ignore_frac": 1.0}),
    ("ce", (37, 50), {"target": "prob"}),
    ("ce", (9, 50), {"spatial": 3, "reduction": "none"}),
    ("nll", (37, 50), {"weight": True, "ignore_frac": 0.25}),
    ("kl", (37, 50), {}),
    ("kl", (37, 50), {"reduction": "mean", "log_target": True}),
    ("kl", (37, 50), {"reduction": "none"}),
    ("linear_ce", (37, 8, 50), {"bias": True, "label_smoothing": 0.1, "ignore_frac": 0.25}),
    ("linear_ce", (37, 8, 50), {"reduction": "none"}),
    ("jsd", (37, 50), {"ignore_frac": 0.25}),
    ("jsd", (37, 50), {"beta": 0.0, "reduction": "none", "ignore_frac": 0.25}),
    ("jsd", (37, 50), {"beta": 1.0, "reduction": "sum"}),
])
def test_chunked_reference_equals_the_whole_one(monkeypatch, family, shape, opts):
    """Large cases compute the reference in row slices: the same numbers as in one piece."""
    from lossbench.cases import Case, make_inputs

    inputs = make_inputs(Case.from_shape(family, shape, "float32", "cpu", "peaked", opts))
    whole = reference.compute(family, inputs)
    row_bytes = reference.row_bytes(get_family(family), inputs)
    monkeypatch.setattr(reference, "_compute_whole", None)  # the sliced path must be the one that runs
    sliced = reference.compute(family, inputs, chunk_bytes=5 * row_bytes)  # 5 rows per slice
    torch.testing.assert_close(sliced.loss, whole.loss, rtol=1e-12, atol=1e-14, equal_nan=True)
    for s, w in zip(sliced.grads, whole.grads):
        torch.testing.assert_close(s, w, rtol=1e-12, atol=1e-14)
