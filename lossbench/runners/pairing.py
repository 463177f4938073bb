"""Paired, interleaved sampling of two sides (A/B) and the statistics of their paired ratios.

Comparing one run with another cannot beat the spread between runs (~12% on the shared 2-core host
this was built on): the machine's speed moves between them. Samples of both sides taken in the same
seconds see the same machine (RMIT, Abedi & Brecht, ICPE 2017; duet benchmarking, Bulej et al.,
ICPE 2020). A round is ABBA or BAAB, drawn at random: a linear drift of the machine's speed within a
round falls on both sides alike, and the random order keeps a periodic disturbance from lining up
with one side. A round's paired log-ratio is log(b1 + b2) - log(a1 + a2).

Used by `lossbench ab` (the two sides are two worker processes) and by the sweep (an implementation
against torch_functional on the same case, in one process).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import stats

from .stats import median_ci

Sampler = Callable[[], tuple[float, float]]  # one timed sample: (ms, the eviction before it in ms)


@dataclass
class Paired:
    """Both sides' samples in the order taken, each with its round."""
    a_ms: list[float] = field(default_factory=list)
    b_ms: list[float] = field(default_factory=list)
    a_evict_ms: list[float] = field(default_factory=list)
    b_evict_ms: list[float] = field(default_factory=list)
    a_round: list[int] = field(default_factory=list)
    b_round: list[int] = field(default_factory=list)
    a_block: list[int] = field(default_factory=list)  # the block of rounds (fresh inputs on both sides) of each sample
    b_block: list[int] = field(default_factory=list)
    orders: list[str] = field(default_factory=list)  # per round: "ABBA" or "BAAB"
    converged: bool = False  # the caller's stopping rule was met (not the budget)

    def log_ratios(self) -> np.ndarray:
        """Per round, log(sum of B's samples) - log(sum of A's)."""
        return log_ratios(self.a_ms, self.a_round, self.b_ms, self.b_round)

    def take(self, side: str, ms: float, evict_ms: float, rnd: int, block: int = 0) -> None:
        getattr(self, f"{side.lower()}_ms").append(ms)
        getattr(self, f"{side.lower()}_evict_ms").append(evict_ms)
        getattr(self, f"{side.lower()}_round").append(rnd)
        getattr(self, f"{side.lower()}_block").append(block)

    def extend(self, other: "Paired") -> None:
        for f in ("a_ms", "b_ms", "a_evict_ms", "b_evict_ms", "a_round", "b_round", "a_block", "b_block", "orders"):
            getattr(self, f).extend(getattr(other, f))


def log_ratios(a_ms, a_round, b_ms, b_round) -> np.ndarray:
    return np.array(list(_round_log_ratios(a_ms, a_round, b_ms, b_round).values()))


def _round_log_ratios(a_ms, a_round, b_ms, b_round) -> dict[int, float]:
    """Per round both sides have, in round order: log(sum of B's samples) - log(sum of A's)."""
    a, b = _per_round(a_ms, a_round), _per_round(b_ms, b_round)
    return {r: math.log(b[r]) - math.log(a[r]) for r in sorted(a.keys() & b.keys()) if a[r] > 0 and b[r] > 0}


def _per_round(ms, rounds) -> dict[int, float]:
    out: dict[int, float] = {}
    for t, r in zip(ms, rounds):
        out[int(r)] = out.get(int(r), 0.0) + float(t)
    return out


def abba(sample_a: Sampler, sample_b: Sampler, *, rng: np.random.Generator, rounds: int, warmup_rounds: int = 1,
         first_round: int = 0, block: int = 0) -> Paired:
    """`rounds` rounds of ABBA or BAAB (drawn at random per round), numbered from first_round, all in
    `block`. First warmup_rounds rounds whose samples are dropped: the first samples after a side has been
    idle (its process's pages, allocator, threads) came out up to 3x slow. How many rounds and blocks a
    row gets is the caller's (the budget, the blocks' CI)."""
    if rounds < 1:
        raise ValueError(f"need at least one round, got {rounds}")
    for _ in range(warmup_rounds):
        for side in "ABBA":
            (sample_a if side == "A" else sample_b)()
    out = Paired()
    for i in range(rounds):
        order = "ABBA" if rng.random() < 0.5 else "BAAB"
        out.orders.append(order)
        for side in order:
            ms, evict = (sample_a if side == "A" else sample_b)()
            out.take(side, ms, evict, first_round + i, block)
    return out


def block_log_ratios(a_ms, a_round, a_block, b_ms, b_round, b_block) -> np.ndarray:
    """Per block of rounds, the median of its rounds' paired log-ratios."""
    return np.array(list(_block_medians(a_ms, a_round, b_ms, b_round, b_block).values()))


def _block_medians(a_ms, a_round, b_ms, b_round, b_block) -> dict[int, float]:
    blocks = {int(rnd): int(blk) for rnd, blk in zip(b_round, b_block)}
    per_block: dict[int, list[float]] = {}
    for rnd, d in _round_log_ratios(a_ms, a_round, b_ms, b_round).items():
        per_block.setdefault(blocks[rnd], []).append(d)
    return {blk: float(np.median(v)) for blk, v in sorted(per_block.items())}


def blocks_by_pass(a_ms, a_round, a_block, a_pass, b_ms, b_round, b_block, b_pass) -> dict[int, np.ndarray]:
    """Per pass (a fresh pair of processes), the median log-ratio of each of its blocks."""
    pass_of_block = {int(blk): int(p) for blk, p in zip(b_block, b_pass)}
    out: dict[int, list[float]] = {}
    for blk, m in _block_medians(a_ms, a_round, b_ms, b_round, b_block).items():
        out.setdefault(pass_of_block[blk], []).append(m)
    return {p: np.array(v) for p, v in sorted(out.items())}


@dataclass(frozen=True)
class PairedSummary:
    ratio: float      # exp(median paired log-ratio): B's time over A's
    ci_low: float     # 95% distribution-free CI of that median, as ratios
    ci_high: float
    p: float          # Wilcoxon signed-rank test of the log-ratios against 0 (two-sided)
    sd_log: float     # standard deviation of the paired log-ratios: the pairing's noise
    rounds: int


def summarize(d: np.ndarray) -> PairedSummary:
    """The median of the paired log-ratios with its order-statistic CI (as the rows' own time CI), and
    a Wilcoxon signed-rank p-value (scipy.stats): the test for paired samples, no normality assumed."""
    d = np.asarray(d, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return PairedSummary(math.nan, math.nan, math.nan, math.nan, math.nan, len(d))
    low, high = median_ci(d)
    p = 1.0 if not np.any(d) else float(stats.wilcoxon(d).pvalue)
    return PairedSummary(math.exp(float(np.median(d))), math.exp(low), math.exp(high), p,
                         float(np.std(d, ddof=1)), len(d))


MIN_BLOCKS = 3  # blocks a row needs to be judged on them
PRIOR_DF = 4     # degrees of freedom given to the modelled variance of a pass estimate (summarize_passes)


def _pass_estimate(blocks: np.ndarray) -> tuple[float, float]:
    """A pass's estimate, the median of its blocks' medians (a burst on the host can take a whole block:
    +90% in one block of an A/A pass whose others read -1% and +6%), and that median's variance
    (pi/2 x the blocks' robust variance, scaled MAD, over their number; 0 for a single block)."""
    if len(blocks) < 2:
        return float(np.median(blocks)), 0.0
    mad = float(stats.median_abs_deviation(blocks, scale="normal"))
    return float(np.median(blocks)), math.pi / 2 * mad**2 / len(blocks)


def pass_components(per_pass: dict[int, np.ndarray]) -> tuple[float, float, int] | None:
    """A row's (variance of its pass estimates, their mean within-pass variance, degrees of freedom); None
    below 2 passes. The first less the second estimates the process component: how much a fresh pair of
    processes moves the row by itself."""
    parts = [_pass_estimate(v) for v in per_pass.values() if len(v)]
    if len(parts) < 2:
        return None
    return float(np.var([e for e, _ in parts], ddof=1)), float(np.mean([w for _, w in parts])), len(parts) - 1


def pooled_process_variance(components: list[tuple[float, float, int]]) -> float:
    """The process component over a run's rows: per row, its pass-to-pass variance less its within-pass
    part; their median, scaled to a mean (a variance with k degrees of freedom has its median at
    chi2(k).median() / k of its mean): robust to rows a burst hit in one pass. Never below 0."""
    if not components:
        return 0.0
    excess = [b - w for b, w, _ in components]
    k = int(np.median([df for _, _, df in components]))
    return max(0.0, float(np.median(excess)) * k / float(stats.chi2.median(k)))


def summarize_passes(per_pass: dict[int, np.ndarray], process_var: float, rounds: int, sd_log: float) -> PairedSummary:
    """The change from passes, each a fresh pair of processes: the mean of the pass estimates
    (_pass_estimate). A pass estimate varies by the process component (process_var, pooled over the run's
    rows: one row's few passes cannot tell it) plus the row's own within-pass variance (its blocks); that
    model is moderated with the row's own pass-to-pass variance (empirical Bayes, as limma's moderated t:
    PRIOR_DF degrees of freedom for the model, one per pass beyond the first for the row's own), over the
    number of passes. Student-t CI and test (scipy.stats)."""
    parts = [_pass_estimate(v) for v in per_pass.values() if len(v)]
    n = len(parts)
    e = np.array([x for x, _ in parts])
    model = process_var + float(np.mean([w for _, w in parts]))
    var = (PRIOR_DF * model + (n - 1) * float(np.var(e, ddof=1))) / (PRIOR_DF + n - 1)
    se = math.sqrt(var / n)
    df = PRIOR_DF + n - 1
    est = float(np.mean(e))
    if se == 0:
        return PairedSummary(math.exp(est), math.exp(est), math.exp(est), 1.0 if est == 0 else 0.0, sd_log, rounds)
    half = float(stats.t.ppf(0.975, df)) * se
    p = float(2 * stats.t.sf(abs(est) / se, df))
    return PairedSummary(math.exp(est), math.exp(est - half), math.exp(est + half), p, sd_log, rounds)


def summarize_blocks(m: np.ndarray, rounds: int, sd_log: float) -> PairedSummary:
    """The change from the blocks' median log-ratios: their mean with a Student-t CI and test over blocks
    (scipy.stats.ttest_1samp). Where the inputs lie in memory moves a side's time for as long as they lie
    there (+-2% per placement for ce 4096x4096 float32 fwd_bwd here, when every round's noise allowed 1%):
    the rounds of one placement are not independent evidence, the blocks are."""
    m = np.asarray(m, dtype=float)
    if len(m) < MIN_BLOCKS:
        raise ValueError(f"need {MIN_BLOCKS} blocks, got {len(m)}")
    if np.ptp(m) == 0:
        return PairedSummary(math.exp(float(m[0])), math.exp(float(m[0])), math.exp(float(m[0])),
                             1.0 if m[0] == 0 else 0.0, sd_log, rounds)
    t = stats.ttest_1samp(m, 0.0)
    ci = t.confidence_interval(0.95)
    return PairedSummary(math.exp(float(np.mean(m))), math.exp(float(ci.low)), math.exp(float(ci.high)),
                         float(t.pvalue), sd_log, rounds)
