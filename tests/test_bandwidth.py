"""Analytic byte counts and the measured copy bandwidth."""

import pytest

from lossbench import bandwidth
from lossbench.cases import Case, make_inputs


def _bytes(family, mode, n=64, c=100, dtype="float32", h=None, **options):
    case = Case.make(family, n, c, dtype, "cpu", "normal", options, h=h)
    inputs = make_inputs(case)
    loss_numel = n if options.get("reduction") == "none" else 1
    return bandwidth.bytes_moved(case, inputs, loss_numel, mode)


def test_fused_cross_entropy_reads_logits_once_and_writes_the_gradient_once():
    logits, target = 64 * 100 * 4, 64 * 8
    assert _bytes("ce", "fwd_bwd") == 2 * logits + target + 4
    assert _bytes("ce", "fwd") == logits + target + 4
    assert _bytes("ce", "fwd_bwd", dtype="bfloat16") == 2 * (64 * 100 * 2) + target + 2
    assert _bytes("ce", "fwd_bwd", weight=True) == 2 * logits + target + 100 * 4 + 4


def test_other_families():
    x = 64 * 100 * 4
    assert _bytes("kl", "fwd_bwd") == 2 * x + x + 4  # input and target read, gradient written
    assert _bytes("nll", "fwd") == 64 * 4 + 64 * 8 + 4  # one value gathered per row
    hidden, weight, bias = 64 * 32 * 4, 100 * 32 * 4, 100 * 4
    assert _bytes("linear_ce", "fwd_bwd", h=32, bias=True) == 2 * (hidden + weight + bias) + 64 * 8 + 4


def test_copy_bandwidth_is_measured():
    gbps = bandwidth.copy_gbps("cpu", nbytes=32 * 2**20)
    assert 0.5 < gbps < 2000


def test_rates_only_for_working_sets_well_beyond_the_cache(monkeypatch):
    from lossbench import devices

    monkeypatch.setattr(devices, "cache_bytes", lambda device: 32 << 20)
    assert not bandwidth.exceeds_cache(127 << 20, "cpu")
    assert bandwidth.exceeds_cache(128 << 20, "cpu")


@pytest.mark.slow
def test_a_working_set_beyond_the_cache_gets_a_physical_rate():
    """ce fwd_bwd at 4096x8192 float32 moves 256 MiB (> 4x a 32 MiB cache): its rate is reported, and
    it cannot beat the copy that moves the same kind of bytes."""
    import torch

    from lossbench import devices, records
    from lossbench.sweep import Unit, UnitRunner

    case = Case.make("ce", 4096, 8192, "float32", "cpu")
    moved = 2 * 4096 * 8192 * 4
    if not bandwidth.exceeds_cache(moved, "cpu"):
        import pytest

        pytest.skip(f"this CPU's cache ({devices.cache_bytes('cpu') >> 20} MiB) holds the working set")
    prov = records.provenance("t", "cpu", torch.get_num_threads(), bandwidth.copy_gbps("cpu"))
    rows = []
    UnitRunner(lambda d: prov, budget_s=0.3).run(Unit(case, "fused", ("fwd_bwd",)), rows.append)
    (row,) = rows
    assert row["status"] == "ok", row["error"]
    assert 0 < row["pct_peak_bw"] <= 100
