"""Change points on one series (history.py follows every row over the runs; this judges one): ruptures'
PELT proposes steps, and a step is kept when it persists, clears the metric's minimum effect and stands
out from the series' noise (the rules: history.py's docstring)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .statistics import ACCURACY_GROWTH, ALPHA, alloc_block, robust_sd

PERSIST = 2                  # runs a step must hold on each side: one bad run is never a change
TIME_EFFECT = 1.05           # compare's default threshold (5%)
MEMORY_EFFECT = 1.05         # and more than one allocator block
PENALTY = 2.0                # PELT penalty per change, times log(runs): BIC on the standardised series
NOISE_FLOOR = 0.01           # log scale: a deterministic series (memory, accuracy) is not noiseless to 0
ERR_CLIP = (1e-30, 1e30)     # errors in log scale: exact (0) and infinite (NaN result) stay finite


@dataclass(frozen=True)
class Metric:
    name: str
    axis: str          # the plot's y label
    min_ratio: float   # the larger segment median over the smaller must exceed this


METRICS = {
    "time": Metric("time", "time / the row's median over runs", TIME_EFFECT),
    "memory": Metric("memory", "extra memory / the row's median over runs", MEMORY_EFFECT),
    "accuracy": Metric("accuracy", "worst-row error (loss error where no gradient)", ACCURACY_GROWTH),
}


@dataclass
class Step:
    at: int        # index of the first point after the step
    ratio: float   # median after / median before, in the metric's units
    p: float       # before false-discovery control


def block_of(device: str, metric: str) -> float:
    """The smallest absolute memory step that counts (an allocator block); 0 for other metrics."""
    return alloc_block(device) if metric == "memory" else 0.0


def signal(values: np.ndarray, metric: str, block: float = 0.0) -> np.ndarray:
    """The series in log scale, where a ratio is a distance: memory plus one block (0 bytes stays finite),
    errors clipped (exact and infinite stay finite)."""
    v = np.asarray(values, dtype=float)
    if metric == "memory":
        return np.log(v + max(block, 1.0))
    if metric == "accuracy":
        return np.log(np.clip(v, *ERR_CLIP))
    return np.log(v)


def own_noise(sig: np.ndarray) -> float:
    """Robust run-to-run standard deviation: from the median absolute difference of consecutive runs, so a
    step (one large difference) and an outlier (two) barely move it."""
    if len(sig) < 3:
        return math.nan
    return robust_sd(np.diff(sig), center=0.0) / math.sqrt(2)


def _ratio(before: float, after: float) -> float:
    if before > 0:
        return after / before
    return math.inf if after > 0 else 1.0


def _beyond(a: float, b: float, metric: Metric, block: float) -> bool:
    """b differs from a by more than the metric's minimum effect (ratio, and for memory one block)."""
    lo, hi = min(a, b), max(a, b)
    return _ratio(lo, hi) > metric.min_ratio and hi - lo > block


@dataclass
class _Sides:
    """The two segments around a step. Memory runs measured a range over their repeated calls (values:
    the smallest, upper: the largest), and a step must clear it: going up, the runs after it against the
    highest the runs before reached; going down, the reverse. Elsewhere upper is the values."""
    before: np.ndarray
    after: np.ndarray
    up: bool
    old: float          # the level the runs after the step must clear (before's median, or its top going up)
    new: float          # the level the runs before it must clear (after's median, or its top going down)
    after_edge: np.ndarray    # what of each run after must clear `old` (lows going up, highs going down)
    before_edge: np.ndarray   # what of each run before must clear `new`

    @classmethod
    def around(cls, v: "SeriesValues", lo: int, at: int, hi: int) -> "_Sides":
        before, after = v.values[lo:at], v.values[at:hi]
        top_b, top_a = v.upper[lo:at], v.upper[at:hi]
        mb, ma = float(np.median(before)), float(np.median(after))
        if ma > mb:
            return cls(before, after, True, max(mb, float(top_b.max())), ma, after, top_b)
        return cls(before, after, False, mb, max(ma, float(top_a.max())), top_a, before)


def _judge(v: "SeriesValues", sig, lo, at, hi, metric: Metric, noise: float, persist: int, noise_df: float):
    """The step at `at` between segments [lo, at) and [at, hi): a Step, or the reason it fails (rank of
    the reason, weakness) so the weakest failure merges first."""
    s = _Sides.around(v, lo, at, hi)
    mb, ma = float(np.median(s.before)), float(np.median(s.after))
    weakness = abs(math.log(max(_ratio(mb, ma), 1e-300)))

    def clears(x, ref, above):
        return _beyond(ref, x, metric, v.block) and (x > ref) == above

    if not _persists(s, persist, clears):
        return (0, 0.0)
    if not (clears(ma, s.old, True) if s.up else clears(s.new, mb, False)):
        return (1, weakness)
    if v.raw is not None:  # time: the step must show in the row's own times too, not only against its neighbours
        rb, ra = float(np.median(v.raw[lo:at])), float(np.median(v.raw[at:hi]))
        if not clears(ra, rb, s.up):
            return (1, weakness)
    # Medians, not means: one outlier inside a segment must not make the step (var of a median: pi/2 / n).
    d = float(np.median(sig[at:hi]) - np.median(sig[lo:at]))
    se = noise * math.sqrt(math.pi / 2 * (1 / len(s.before) + 1 / len(s.after)))
    p = float(2 * stats.t.sf(abs(d) / se, noise_df))
    if p >= ALPHA:
        return (2, -p)
    return Step(at, _ratio(mb, ma), p)


def _persists(s: _Sides, persist: int, clears) -> bool:
    """The step holds for `persist` runs on each side, run by run: each is beyond the minimum effect against
    the other side and nearer its own side's level than the other's (at the new level, not an excursion
    from the old one); and it still holds without the run nearest to it on either side (not one run's
    doing: an outlier followed by a run a little off by chance is no change)."""
    mb, ma = float(np.median(s.before)), float(np.median(s.after))

    def nearer(x, own, other):
        return abs(math.log(max(x, 1e-300) / max(own, 1e-300))) < abs(math.log(max(x, 1e-300) / max(other, 1e-300)))

    after_ok = all(clears(e, s.old, s.up) and nearer(x, ma, mb)
                   for x, e in zip(s.after[:persist], s.after_edge[:persist]))
    before_ok = all(clears(e, s.new, not s.up) and nearer(x, mb, ma)
                    for x, e in zip(s.before[-persist:], s.before_edge[-persist:]))
    if not (after_ok and before_ok) or persist < 2:
        return after_ok and before_ok
    return clears(float(np.median(s.after_edge[1:])), s.old, s.up) and \
        clears(float(np.median(s.before_edge[:-1])), s.new, not s.up)


@dataclass
class SeriesValues:
    values: np.ndarray               # per run, in the metric's units (time: relative to the neighbours)
    upper: np.ndarray                # per run, the largest it measured (memory's range), else the values
    raw: np.ndarray | None = None    # time: the row's own times (own_times), not relative to neighbours
    block: float = 0.0               # memory: the smallest step that counts


def detect(sig: np.ndarray, noise: float, persist: int = PERSIST) -> list[int]:
    """ruptures' PELT on the standardised series: the proposed steps (index of the first point after)."""
    import ruptures  # here, not at the top: `lossbench` starts without it for every other command

    n = len(sig)
    if n < 2 * persist:
        return []
    z = ((sig - np.median(sig)) / noise).reshape(-1, 1)
    algo = ruptures.Pelt(model="l2", min_size=persist, jump=1).fit(z)
    return algo.predict(pen=PENALTY * math.log(n))[:-1]


def find_steps(values, metric: str, noise: float, persist: int = PERSIST, block: float = 0.0,
               upper=None, raw=None, noise_df: float = math.inf, shas=None) -> list[Step]:
    """The steps of one series (in time order) that pass persistence, minimum effect and significance,
    with their p-values before false-discovery control. persist=1 lets a single run count (for tests).
    noise_df: the degrees of freedom of the noise estimate (Student's t; inf: the normal).
    shas: each run's commit ("?" unknown). A step proposed between two runs of one known commit is dropped
    before judging: no code changed there, so it is the host's (paced times remove most of those; runs
    without eviction samples cannot be paced)."""
    values = np.asarray(values, dtype=float)
    v = SeriesValues(values, values if upper is None else np.maximum(values, np.nan_to_num(upper, nan=0.0)),
                     None if raw is None else np.asarray(raw, dtype=float), block)
    sig = signal(values, metric, block)
    noise = max(noise, NOISE_FLOOR)
    bkps = detect(sig, noise, persist)
    if shas is not None:
        bkps = [b for b in bkps if shas[b] != shas[b - 1] or shas[b] == "?"]
    while bkps:
        edges = [0, *bkps, len(values)]
        judged = [_judge(v, sig, edges[i], b, edges[i + 2], METRICS[metric], noise, persist, noise_df)
                  for i, b in enumerate(bkps)]
        failed = [(j, b) for j, b in zip(judged, bkps) if not isinstance(j, Step)]
        if not failed:
            return judged
        bkps.remove(min(failed)[1])  # an outlier first, then the smallest effect, then the largest p
    return []
