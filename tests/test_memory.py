"""Known-answer tests for the peak-memory runner."""
import pytest
import torch
import torch.nn.functional as F

from lossbench.cases import Case, make_inputs
from lossbench.runners import memory
from lossbench.runners.calls import ModeCall

MiB = 2**20
pytestmark = pytest.mark.skipif(not memory.cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs")


class _HoldUntilBackward(torch.autograd.Function):
    """Identity that keeps `buf` alive on the graph, so it is held through backward too."""

    @staticmethod
    def forward(ctx, loss, buf):
        ctx.buf = buf
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _holding(k_bytes: int, device: str = "cpu"):
    """Cross-entropy that holds an extra k bytes (touched, so resident) for its whole forward and backward."""

    def fn(logits, target, **kw):
        buf = torch.ones(k_bytes // 4, device=device)
        return _HoldUntilBackward.apply(F.cross_entropy(logits, target, **kw), buf)

    return fn


def _extra(fn, case, mode, repeats=memory.MEMORY_REPEATS):
    inputs = make_inputs(case)
    call = ModeCall(fn, inputs, mode, fresh_inputs=False)
    return memory.measure_call(call, "cpu", repeats).extra_mem_bytes


@pytest.mark.parametrize("k_mib", [64, 256])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_extra_k_bytes_reported_within_3_percent(k_mib, mode):
    case = Case.make("ce", 256, 1000, "float32", "cpu")
    without = _extra(F.cross_entropy, case, mode)
    with_buffer = _extra(_holding(k_mib * MiB), case, mode)
    assert with_buffer - without == pytest.approx(k_mib * MiB, rel=0.03)


@pytest.mark.slow
def test_eager_cross_entropy_fwd_bwd_is_about_three_logits():
    case = Case.make("ce", 4096, 32768, "float32", "cpu")
    logits_bytes = 4096 * 32768 * 4
    ratio = _extra(F.cross_entropy, case, "fwd_bwd", repeats=1) / logits_bytes
    # log_softmax output (saved), the gradient of the nll, and the gradient of the logits
    assert 2.5 <= ratio <= 3.5


def test_absolute_peak_includes_the_inputs():
    case = Case.make("ce", 1024, 8192, "float32", "cpu")
    inputs = make_inputs(case)
    m = memory.measure_call(ModeCall(F.cross_entropy, inputs, "fwd", fresh_inputs=False), "cpu")
    assert m.peak_mem_bytes > m.extra_mem_bytes + 1024 * 8192 * 4  # the logits exist before the call
    assert m.reserved_mem_bytes is None


def test_floor_bytes():
    inputs = make_inputs(Case.make("ce", 64, 500, "bfloat16", "cpu", options={"reduction": "none"}))
    loss, grad = 64 * 2, 64 * 500 * 2
    # CUDA's allocator counts bytes
    assert memory.floor_bytes("ce", inputs, (64,), "fwd", "cuda") == loss
    assert memory.floor_bytes("ce", inputs, (64,), "bwd", "cuda") == grad
    assert memory.floor_bytes("ce", inputs, (64,), "fwd_bwd", "cuda") == loss + grad
    # grad in forward: the gradient exists before bwd starts
    assert memory.floor_bytes("ce", inputs, (64,), "bwd", "cuda", grad_in_forward=True) == 0
    assert memory.floor_bytes("ce", inputs, (64,), "fwd_bwd", "cuda", grad_in_forward=True) == loss + grad
    # a gradient written into the input it overwrote costs nothing new
    assert memory.floor_bytes("ce", inputs, (64,), "fwd_bwd", "cuda", overwritten=(0,)) == loss
    # CPU pages: a new buffer may share its first and last page with resident memory
    page = memory.PAGE_BYTES
    assert memory.floor_bytes("ce", inputs, (64,), "fwd", "cpu") == 0
    assert memory.floor_bytes("ce", inputs, (64,), "bwd", "cpu") == grad - 2 * page


@pytest.mark.parametrize("mib", [1, 8])
def test_cpu_floor_is_a_floor_for_a_fresh_buffer(mib):
    """The CPU floor of a tensor is below what the probe reads when exactly that tensor is made."""
    probe = memory.probe_for("cpu")
    for _ in range(5):
        probe.start()
        t = torch.ones(mib * MiB // 4)
        got = probe.stop().extra_mem_bytes
        assert memory.visible_bytes(t.numel() * 4, "cpu") <= got
        del t


@pytest.mark.cuda
def test_cuda_extra_k_bytes():
    case = Case.make("ce", 256, 1000, "float32", "cuda:0")
    k = 64 * MiB

    def extra(fn):
        call = ModeCall(fn, make_inputs(case), "fwd_bwd", fresh_inputs=False)
        return memory.measure_call(call, "cuda:0")

    base, held = extra(F.cross_entropy), extra(_holding(k, "cuda:0"))
    assert held.extra_mem_bytes - base.extra_mem_bytes == k  # the caching allocator counts exactly
    assert held.reserved_mem_bytes >= held.peak_mem_bytes


@pytest.mark.cuda
def test_cuda_eager_cross_entropy_fwd_bwd():
    case = Case.make("ce", 4096, 32768, "float32", "cuda:0")
    call = ModeCall(F.cross_entropy, make_inputs(case), "fwd_bwd", fresh_inputs=False)
    ratio = memory.measure_call(call, "cuda:0").extra_mem_bytes / (4096 * 32768 * 4)
    assert 1.5 <= ratio <= 3.5


class _Alternating:
    """A call that touches 8 MiB on its first call and every third after it, 32 MiB otherwise."""

    def __init__(self):
        self.calls = 0

    def setup(self):
        pass

    def __call__(self):
        self.calls += 1
        mib = 8 if self.calls % 3 == 1 else 32
        torch.ones(mib * MiB // 4)


def test_repeated_calls_keep_the_smallest_and_the_largest_peak():
    """A peak that varies from call to call: the row's extra is the smallest of MEMORY_REPEATS
    calls, extra_mem_max_bytes the largest."""
    call = _Alternating()
    m = memory.measure_call(call, "cpu", repeats=5)
    assert call.calls == 5
    # Resident pages: a buffer's first and last pages may be shared with memory already resident.
    assert 7.9 * MiB <= m.extra_mem_bytes < 9 * MiB
    assert 31.5 * MiB <= m.extra_mem_max_bytes < 33 * MiB
    one = memory.measure_call(_Alternating(), "cpu", repeats=1)
    assert one.extra_mem_bytes == one.extra_mem_max_bytes
