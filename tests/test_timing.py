import gc
import math
import time

import numpy as np
import pytest
import scipy.stats
import torch

from lossbench.runners.stats import median_ci, summarize
from lossbench.runners.timing import TimingResult, time_callable


def spin(ms: float) -> None:
    """Busy-wait: unlike sleep, its length does not depend on the scheduler's wake-up latency."""
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def median_of(result: TimingResult) -> float:
    return result.summary()["time_median_ms"]


# --- stats -----------------------------------------------------------------------------------


def binom_reference_ci(sorted_x: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Largest 1-based rank k with P(B <= k-1) <= tail, B ~ Binom(n, 1/2); CI = [x_(k), x_(n+1-k)]."""
    n = len(sorted_x)
    tail = (1 - confidence) / 2
    k = max(k for k in range(1, n + 1) if scipy.stats.binom.cdf(k - 1, n, 0.5) <= tail)
    return float(sorted_x[k - 1]), float(sorted_x[n - k])


def test_median_ci_known_answer_n100():
    x = np.arange(1.0, 101.0)
    low, high = median_ci(np.random.default_rng(0).permutation(x))
    assert (low, high) == binom_reference_ci(x) == (40.0, 61.0)
    assert low < np.median(x) < high


@pytest.mark.parametrize("n", [6, 7, 10, 31, 50, 99, 1000])
def test_median_ci_matches_scipy_quantile_test(n):
    x = np.random.default_rng(n).exponential(size=n)
    ci = scipy.stats.quantile_test(x, q=0.0, p=0.5).confidence_interval(0.95)
    assert median_ci(x) == (ci.low, ci.high) == binom_reference_ci(np.sort(x))


def test_median_ci_too_few_samples_returns_min_max():
    x = [3.0, 1.0, 5.0, 2.0, 4.0]
    # [min, max] covers 1 - 2 / 2**5 = 93.75% < 95%, so scipy gives NaN; we give the widest interval.
    ci = scipy.stats.quantile_test(x, q=0.0).confidence_interval(0.95)
    assert math.isnan(ci.low) and math.isnan(ci.high)
    assert median_ci(x) == (1.0, 5.0)
    assert median_ci([7.0]) == (7.0, 7.0)


def test_median_ci_coverage():
    rng = np.random.default_rng(1234)
    true_median = math.log(2.0)  # of the standard exponential
    draws = 400
    hits = 0
    for _ in range(draws):
        low, high = median_ci(rng.exponential(size=50))
        hits += low <= true_median <= high
    assert 0.90 <= hits / draws <= 0.99


def test_median_ci_rejects_bad_input():
    with pytest.raises(ValueError):
        median_ci([])
    with pytest.raises(ValueError):
        median_ci([1.0, 2.0], confidence=1.0)


def test_summarize():
    s = summarize(list(range(1, 101)))
    assert s == {
        "time_median_ms": 50.5,
        "time_p20_ms": pytest.approx(20.8),
        "time_p80_ms": pytest.approx(80.2),
        "time_ci_low_ms": 40.0,
        "time_ci_high_ms": 61.0,
        "samples": 100,
    }
    assert isinstance(s["samples"], int)


def test_median_ci_is_fast_for_large_n():
    x = np.random.default_rng(0).exponential(size=20_000).tolist()
    t0 = time.perf_counter()
    for _ in range(20):
        median_ci(x)
    assert (time.perf_counter() - t0) / 20 < 0.01


# --- timing ----------------------------------------------------------------------------------


class LoggedSpin:
    """Busy-waits ``ms`` and records how long each call really took, as seen from inside fn.

    That inner duration is the ground truth the timer must reproduce: on an idle machine it is
    the nominal ``ms``, on a loaded one preemption stretches it, and the timer rightly sees that.
    """

    def __init__(self, ms: float) -> None:
        self.ms = ms
        self.durations_ms: list[float] = []

    def __call__(self) -> None:
        t0 = time.perf_counter()
        spin(self.ms)
        self.durations_ms.append((time.perf_counter() - t0) * 1e3)

    def sampled_ms(self, result: TimingResult) -> list[float]:
        return self.durations_ms[-len(result.samples_ms) :]  # warm-up calls come first


def test_busy_wait_is_read_accurately():
    fn = LoggedSpin(20.0)
    result = time_callable(fn, budget_s=0.5)
    assert median_of(result) == pytest.approx(np.median(fn.sampled_ms(result)), rel=0.02)
    assert all(s >= 20.0 for s in result.samples_ms)
    # The known length itself: the median shrugs off the odd preempted sample.
    assert median_of(result) == pytest.approx(20.0, rel=0.02)


def test_setup_time_is_excluded():
    fn = LoggedSpin(5.0)
    result = time_callable(fn, setup=lambda: time.sleep(0.030), budget_s=0.5)
    assert abs(median_of(result) - np.median(fn.sampled_ms(result))) <= max(0.02 * 5.0, 0.2)
    assert max(result.samples_ms) < 30.0


def test_setup_runs_before_every_call():
    log: list[str] = []
    result = time_callable(lambda: log.append("fn"), setup=lambda: log.append("setup"), warmup=3)
    assert log == ["setup", "fn"] * (3 + len(result.samples_ms))


@pytest.mark.parametrize("min_samples", [5, 8])
def test_min_samples_honoured_with_zero_budget(min_samples):
    rng = np.random.default_rng(0)
    result = time_callable(lambda: spin(rng.uniform(0.1, 1.0)), budget_s=0.0, min_samples=min_samples)
    assert len(result.samples_ms) == min_samples


def test_max_samples_is_a_hard_cap():
    rng = np.random.default_rng(0)
    result = time_callable(lambda: spin(rng.uniform(0.0, 0.2)), budget_s=10.0, max_samples=40, rel_ci=0.0)
    assert len(result.samples_ms) == 40
    assert not result.converged


def test_stable_fn_converges_early():
    t0 = time.perf_counter()
    result = time_callable(lambda: spin(1.0), budget_s=5.0, max_samples=10_000)
    elapsed = time.perf_counter() - t0
    assert result.converged
    assert len(result.samples_ms) < 10_000
    assert elapsed < 1.0
    s = result.summary()
    assert (s["time_ci_high_ms"] - s["time_ci_low_ms"]) / 2 <= 0.02 * s["time_median_ms"]


def test_noisy_fn_stops_at_budget():
    rng = np.random.default_rng(0)
    setup_times: list[float] = []
    result = time_callable(
        lambda: spin(rng.uniform(1.0, 10.0)),
        setup=lambda: setup_times.append(time.perf_counter()),
        budget_s=0.3,
        cold_cache=False,  # the budget is wall time: an eviction per sample would take part of it
    )
    sampling_s = time.perf_counter() - setup_times[2]  # the first sample's setup, after 2 warm-ups
    assert not result.converged
    # Sampling stops after the first sample that ends past the budget (a sample is <= ~10 ms).
    assert 0.3 <= sampling_s < 0.3 + 0.05
    assert sum(result.samples_ms) / 1e3 > 0.25


def test_first_call_is_recorded_and_not_a_sample():
    calls = 0

    def fn() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            time.sleep(0.050)

    result = time_callable(fn, budget_s=0.1)
    assert result.first_call_ms >= 50.0
    assert median_of(result) < 1.0
    assert max(result.samples_ms) < 50.0


def test_gc_reenabled_after_fn_raises():
    calls = 0

    def fn() -> None:
        nonlocal calls
        calls += 1
        if calls > 2:  # past warm-up, i.e. during sampling
            raise RuntimeError("boom")

    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="boom"):
        time_callable(fn)
    assert gc.isenabled()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        time_callable(lambda: None, warmup=0)
    with pytest.raises(ValueError):
        time_callable(lambda: None, min_samples=10, max_samples=5)
    with pytest.raises(ValueError):
        time_callable(lambda: None, device="meta")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matmul():
    a = torch.randn(1024, 1024, device="cuda")
    b = torch.randn(1024, 1024, device="cuda")
    out = torch.empty(1024, 1024, device="cuda")
    result = time_callable(lambda: torch.mm(a, b, out=out), device="cuda", setup=out.zero_, budget_s=0.5)
    assert len(result.samples_ms) >= 5
    assert all(s > 0 for s in result.samples_ms)
    assert result.first_call_ms > 0


def test_cpu_samples_start_from_a_cold_cache():
    """A 16 MiB read fits in the last-level cache: warm, it runs at cache speed; cold (the default),
    every sample reads it from DRAM again. Without the eviction both would read the same."""
    from lossbench.devices import cache_bytes

    x = torch.ones(min(16 << 20, cache_bytes("cpu") // 2) // 4)
    ratios = []
    for _ in range(3):  # the best of three pairs: a busy neighbour slows either side at random
        warm = median_of(time_callable(lambda: x.sum(), budget_s=0.2, cold_cache=False))
        cold = median_of(time_callable(lambda: x.sum(), budget_s=0.2))
        ratios.append(cold / warm)
    assert max(ratios) > 1.5  # 1.6-4x seen here; without eviction the ratio is 1


def test_every_sample_carries_its_eviction_time():
    """The eviction before each sample is timed apart (untimed for the sample): one positive time per
    sample, none without cold_cache, and the sample itself does not include it."""
    fn = LoggedSpin(2.0)
    cold = time_callable(fn, budget_s=0.1)
    assert len(cold.evict_ms) == len(cold.samples_ms) and min(cold.evict_ms) > 0
    assert median_of(cold) == pytest.approx(np.median(fn.sampled_ms(cold)), rel=0.1)
    assert time_callable(fn, budget_s=0.05, cold_cache=False).evict_ms == []
