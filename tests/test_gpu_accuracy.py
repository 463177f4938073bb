"""The registry's fused_triton, fused, liger and cce through lossbench's own sweep, on a GPU.

Each (case, implementation) is one sweep unit (sweep.UnitRunner, fwd and fwd_bwd rows: accuracy,
timing, memory), as `lossbench run` takes it, on a grid of small cases: ce, kl and linear_ce, float32
and bfloat16, `normal` and `peaked` inputs, the main variants. Checked on every row (check_unit):
- the status is `ok` or `unsupported`, never error/oom/a crash; and `unsupported` only where the
  implementation declares the case unsupported, or for a peer's documented refusal (a mean over no
  kept target): a kernel that refuses to run at all (triton in the wrong mode, say) fails here;
- every `ok` row is accuracy_ok, ours and the peers' alike. The peers' documented defect (README
  "Peers": liger's cross-entropy gradient for non-contiguous logits) is left out of the grid; a peer
  failing anywhere else on a GPU is a finding, and its test fails;
- ours (fused_triton, and fused, which is the Triton kernels on CUDA) write into no input, and on
  `peaked` rows stay near the rounding floor: err_vs_floor within test_triton_kernels.py's bounds.

The GPU tests are marked `cuda` (`make gpu-check`). test_sweep_checks_on_the_interpreter runs the
same checks on the CPU under the Triton interpreter, on a few small cases, and shows that they catch
wrong implementations.
"""
import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F

import lossbench
from lossbench import reference, registry
from lossbench.cases import Case, make_inputs
from lossbench.runners.accuracy import worst_row_err
from lossbench.sweep import Unit, UnitRunner

OURS = ("fused_triton", "fused")
PEERS = ("liger", "cce")
MODES = ("fwd", "fwd_bwd")

# err_vs_floor bounds on peaked rows, test_triton_kernels.py's: float32 its PEAKED_RATIO (8); bfloat16
# its bound where the stored bf16 gradient is rounded a second time (2.5: a per-row grad_output in the
# cross-entropy grid, the logits' gradient rounded for the matmuls in linear_ce). A sweep's grad_output
# is never exactly 1, so every bf16 gradient here is rounded twice. For float32 linear_ce the floor
# also holds the float32 matmul's own error, as in test_linear_ce_peaked_rows_within_floor.
FLOOR_RATIO = {"float32": 8.0, "bfloat16": 2.5}

# Label smoothing 0.2: with smoothing the true class's gradient, (eps/C) sum_{c != y} w_c - (1 - p_y) a,
# vanishes where 1 - p_y ~ eps. eps = 0.2 puts that (p_y ~ 0.8) below `peaked`'s range (p_y >= 0.85); with 0.1 some
# peaked rows have a nearly vanishing exact gradient, whose relative error measures the case's
# conditioning rather than the kernel (under the interpreter: 30-90x the rounding floor in float32 ce,
# and in float32 linear_ce the float32 matmul's own error alone over the accuracy budget).
EPS = 0.2

SHAPES = {"ce": dict(n=32, c=5000), "kl": dict(n=16, c=3000), "linear_ce": dict(n=64, c=2000, h=128),
          "jsd": dict(n=16, c=3000)}
VARIANTS = {
    "ce": [dict(), dict(reduction="sum"), dict(reduction="none"), dict(ignore_frac=0.25), dict(ignore_frac=1.0),
           dict(ignore_frac=1.0, reduction="sum"), dict(weight=True),
           dict(weight=True, ignore_frac=0.25, reduction="none"), dict(label_smoothing=EPS),
           dict(label_smoothing=EPS, weight=True, ignore_frac=0.25, reduction="sum"), dict(noncontig=True),
           dict(spatial=3), dict(target="prob")],
    "kl": [dict(), dict(reduction="sum"), dict(reduction="mean"), dict(reduction="none"), dict(log_target=True),
           dict(log_target=True, reduction="none"), dict(noncontig=True), dict(spatial=3)],
    "linear_ce": [dict(), dict(reduction="sum"), dict(reduction="none"), dict(bias=True),
                  dict(bias=True, ignore_frac=0.25, label_smoothing=EPS),
                  dict(bias=True, ignore_frac=0.25, reduction="none"), dict(ignore_frac=1.0),
                  dict(ignore_frac=1.0, bias=True, reduction="none"), dict(label_smoothing=EPS, reduction="sum")],
    "jsd": [dict(), dict(beta=0.0), dict(beta=1.0), dict(beta=0.1, ignore_frac=0.25), dict(ignore_frac=1.0),
            dict(reduction="sum"), dict(reduction="none", ignore_frac=0.25)],
}
# Documented peer defects (README "Peers"), left out of the grid rather than loosened.
KNOWN_PEER_DEFECTS = {("ce", "liger", "noncontig")}
# Refusals at run time that the registry does not declare: the Triton KL takes 2-d inputs only
# (kernels/triton/kl_div.py), while kl's fused_triton declares no unsupported option (and `fused`
# dispatches to it on CUDA). Their rows are `unsupported`, as they should be; allowed here by name.
UNDECLARED_REFUSALS = {("kl", "fused_triton", "spatial"), ("kl", "fused", "spatial")}


def _registered(family, name):
    return any(i.family == family and i.name == name for i in registry.implementations(family))


def _known_defect(family, impl, options):
    return any((family, impl, opt) in KNOWN_PEER_DEFECTS for opt, v in options.items() if v)


def _grid():
    for family, variants in VARIANTS.items():
        impls = [i for i in OURS + PEERS if _registered(family, i)]
        for dtype in ("float32", "bfloat16"):
            for dist in ("normal", "peaked"):
                for options in variants:
                    case = Case.make(family, dtype=dtype, device="cuda:0", input_dist=dist, options=options,
                                     **SHAPES[family])
                    for impl in impls:
                        if not _known_defect(family, impl, options):
                            yield pytest.param(case, impl, id=f"{family}-{impl}-{case.label().replace(' ', '-')}")


# --- the checks ---------------------------------------------------------------------------------------
def sweep_unit(case, impl, runner=None):
    """The rows of one unit, as the sweep emits them."""
    rows = []
    (runner or UnitRunner(lambda d: {}, budget_s=0.01)).run(Unit(case, impl, MODES), rows.append)
    return rows


def _refusal_expected(case, impl):
    """Whether `impl` may answer `unsupported` for `case`: it declares so, or it is a peer's
    documented refusal of a mean over no kept target (lossbench/impls/peers)."""
    if registry.get(case.family, impl).why_unsupported(case):
        return True
    opts = case.options
    if any((case.family, impl, opt) in UNDECLARED_REFUSALS for opt, v in opts.items() if v):
        return True
    return impl in PEERS and opts.get("ignore_frac") == 1.0 and opts["reduction"] in ("mean", "batchmean")


@functools.lru_cache(maxsize=4)
def _matmul_floor(case):
    """float32 linear_ce: the worst-row error, against the float64 reference, of the exact maths on
    the float32 matmul's own logits (made on the case's device, as the kernels make theirs)."""
    inputs = make_inputs(case)
    ref = reference.compute(case.family, inputs)
    h, w, y = inputs.args
    bias = inputs.kwargs["bias"]
    logits = h @ w.T if bias is None else h @ w.T + bias
    leaf = logits.double().requires_grad_(True)
    with torch.enable_grad():
        loss = reference.definition("ce")(leaf, y, ignore_index=inputs.kwargs["ignore_index"], reduction=inputs.kwargs["reduction"],
                            label_smoothing=inputs.kwargs["label_smoothing"])
        (g,) = torch.autograd.grad(loss, leaf, inputs.grad_output.double())
    exact = [g @ w.double(), g.T @ h.double()] + ([g.sum(0)] if bias is not None else [])
    return max(worst_row_err(e, r) for e, r in zip(exact, ref.grads))


def floor_ratio(case, row):
    """The row's err_vs_floor; for float32 linear_ce, against the larger of the rounding floor and
    the matmul's (see FLOOR_RATIO). 0 for an exact gradient, inf for an error over a zero floor."""
    err, evf = row["grad_row_err_max"], row["err_vs_floor"]
    if err == 0:
        return 0.0
    if evf is None or not math.isfinite(evf) or evf <= 0:
        return math.inf
    if case.family == "linear_ce" and case.dtype == "float32":
        return err / max(err / evf, _matmul_floor(case))
    return evf


def problems(case, impl, rows, ours):
    """What is wrong with one unit's rows, one line each (empty: nothing)."""
    where = f"{impl} on {case.family} {case.label()}"
    if sorted(r["mode"] for r in rows) != sorted(MODES):
        return [f"{where}: rows for modes {[r['mode'] for r in rows]}, expected {list(MODES)}"]
    out = []
    for r in rows:
        at = f"{where} [{r['mode']}]"
        if r["status"] not in ("ok", "unsupported"):
            out.append(f"{at}: status {r['status']}: {r.get('error')}")
            continue
        if r["status"] == "unsupported":
            if not _refusal_expected(case, impl):
                out.append(f"{at}: unsupported at run time, undeclared: {r.get('error')}")
            continue
        if not r["accuracy_ok"]:
            out.append(f"{at}: not accuracy_ok: loss_rel_err={r['loss_rel_err']:.3g} "
                       f"grad_rel_err={r['grad_rel_err']} grad_row_err_max={r['grad_row_err_max']} "
                       f"({r.get('accuracy_note') or 'over budget'})")
        if ours and r["mutates_inputs"]:
            out.append(f"{at}: wrote into its inputs")
        if ours and r["mode"] == "fwd_bwd" and case.input_dist == "peaked":
            ratio, bound = floor_ratio(case, r), FLOOR_RATIO[case.dtype]
            if not ratio <= bound:
                out.append(f"{at}: gradient {ratio:.3g}x its rounding floor (bound {bound}x), "
                           f"grad_row_err_max={r['grad_row_err_max']:.3g}")
    return out


def check_unit(case, impl, ours, runner=None):
    """Sweeps one unit and asserts every check above; returns its rows."""
    rows = sweep_unit(case, impl, runner)
    bad = problems(case, impl, rows, ours)
    assert not bad, "\n".join(bad)
    return rows


# --- on the GPU ---------------------------------------------------------------------------------------
_runner = None  # one runner, as a sweep worker has: a case's inputs and reference serve its impls


@pytest.mark.cuda
@pytest.mark.parametrize("case, impl", list(_grid()))
def test_sweep_rows_on_gpu(case, impl):
    global _runner
    from lossbench.kernels import triton as tk

    assert tk.available("cuda") and os.environ.get("TRITON_INTERPRET") != "1", (
        "a CUDA device is present but triton is not in compiled mode: unset TRITON_INTERPRET")
    if _runner is None:
        _runner = UnitRunner(lambda d: {}, budget_s=0.01)
    check_unit(case, impl, ours=impl in OURS, runner=_runner)


@pytest.mark.cuda
def test_grid_covers_every_registered_implementation():
    ids = {(p.values[0].family, p.values[1]) for p in _grid()}
    for family in VARIANTS:
        for impl in OURS + PEERS:
            assert ((family, impl) in ids) == _registered(family, impl), (family, impl)


# --- the same checks on the CPU, under the Triton interpreter -------------------------------------------
class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward scales the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _grad_one_percent_off(logits, target, **kw):
    """The right loss with a gradient 1% too large."""
    return F.cross_entropy(_ScaleGrad.apply(logits, 1.01), target, **kw)


def _torch_ce(logits, target, **kw):
    """torch's own cross-entropy: within the float32 budget, but softmax - onehot cancels on confident rows."""
    return F.cross_entropy(logits, target, **kw)


def _overwrites_its_input(logits, target, **kw):
    """Right, but leaves its input zeroed (after reading it)."""
    loss = F.cross_entropy(logits, target, **kw)
    logits.detach().zero_()
    return loss


def _crashes(logits, target, **kw):
    raise RuntimeError("illegal memory access (simulated)")


def _refuses(logits, target, **kw):
    raise NotImplementedError("no kernel for this device (simulated)")


@pytest.mark.slow
def test_sweep_checks_on_the_interpreter(monkeypatch):
    """check_unit passes on correct kernels and fails on wrong ones. On the CPU, with the kernels
    under the Triton interpreter: small cases, and a few of the GPU grid's variants."""
    from lossbench.kernels import triton as tk

    if not tk.available("cpu"):
        pytest.skip("the Triton kernels cannot run on the CPU here (TRITON_INTERPRET is not 1)")
    runner = UnitRunner(lambda d: {}, budget_s=0.01)

    def case(family, dtype, dist, n, c, h=None, **options):
        return Case.make(family, n, c, dtype, "cpu", dist, options, h=h)

    good = [
        (case("ce", "float32", "peaked", 8, 700, label_smoothing=EPS, weight=True, ignore_frac=0.25), OURS),
        (case("ce", "bfloat16", "peaked", 8, 700, reduction="none"), OURS),
        (case("ce", "float32", "peaked", 8, 700, spatial=2), OURS),  # declared unsupported
        (case("kl", "float32", "peaked", 4, 500, log_target=True, reduction="none"), OURS),
        (case("linear_ce", "float32", "peaked", 8, 256, h=32, bias=True, ignore_frac=0.25), OURS),
        (case("jsd", "bfloat16", "peaked", 4, 500, beta=0.1, ignore_frac=0.25), OURS),
    ]
    if _registered("ce", "liger"):
        good.append((case("ce", "float32", "peaked", 8, 700, ignore_frac=0.25, reduction="sum"), ("liger",)))
    for c, impls in good:
        for impl in impls:
            check_unit(c, impl, ours=impl in OURS, runner=runner)

    # Wrong implementations, registered as plugins are (into a copy of the registry, restored after).
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    for name, fn in [("_grad_one_percent_off", _grad_one_percent_off), ("_torch_ce", _torch_ce),
                     ("_overwrites_its_input", _overwrites_its_input), ("_crashes", _crashes),
                     ("_refuses", _refuses)]:
        lossbench.register(family="ce", name=name)(fn)
    normal = case("ce", "float32", "normal", 8, 700)
    peaked = case("ce", "float32", "peaked", 8, 700)
    check_unit(normal, "_torch_ce", ours=True, runner=runner)  # torch is within budget and writes nothing
    assert check_unit(peaked, "_torch_ce", ours=False, runner=runner)[0]["accuracy_ok"]  # as a peer: passes
    with pytest.raises(AssertionError, match=r"fwd_bwd\]: not accuracy_ok") as caught:
        check_unit(normal, "_grad_one_percent_off", ours=True, runner=runner)
    assert "fwd]" not in str(caught.value)  # its loss is right
    with pytest.raises(AssertionError, match="its rounding floor") as caught:
        check_unit(peaked, "_torch_ce", ours=True, runner=runner)
    assert "accuracy_ok" not in str(caught.value)  # only the floor check catches the cancellation
    with pytest.raises(AssertionError, match="wrote into its inputs"):
        check_unit(normal, "_overwrites_its_input", ours=True, runner=runner)
    with pytest.raises(AssertionError, match="status error: RuntimeError: illegal memory access"):
        check_unit(normal, "_crashes", ours=True, runner=runner)
    with pytest.raises(AssertionError, match="unsupported at run time, undeclared"):
        check_unit(normal, "_refuses", ours=False, runner=runner)
