"""Run statistics compare and history share: the one robust spread, the eviction pacing, the drift of a
row's neighbours, and the thresholds both judge by. Numbers in, numbers out: no run files, no text."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

ALPHA = 0.05                  # false-discovery rate over a comparison's (a history's) tests
ACCURACY_GROWTH = 2.0         # a worst-row error more than 2x its base is a regression
# The smallest memory change that counts. CUDA: the caching allocator's block. CPU: glibc grows and
# trims its heap in 128 KiB steps (M_TOP_PAD, the mmap threshold) and where a process's heap stands
# is not the call's doing: two nights of the same code differed by 290 KiB on every implementation
# of a 256x300 case (the smallest of five calls each); 1 MiB leaves that out.
ALLOC_BLOCK = {"cuda": 512, "cpu": 2**20}
DRIFT_WINDOW = 6              # rows on each side that define a row's local drift
ROBUST_HISTORY = 5            # from this many runs, a run-to-run spread is robust (one regressed night left out)
PACE = True                   # CPU times are taken in units of their eviction times (paced)
MAD_SCALE = 1 / stats.norm.ppf(0.75)  # a MAD times this is a normal's standard deviation (1.4826)


def alloc_block(device: str) -> float:
    """The smallest absolute memory change that counts on a device (cpu, cuda:1, ...)."""
    return float(ALLOC_BLOCK.get(str(device).split(":")[0], 4096))


def robust_sd(x, center: float | None = None) -> float:
    """The one robust spread: the scaled median absolute deviation from `center` (default: the median).
    Regressed rows, a burst's edges, one bad night are a minority and barely move it."""
    x = np.asarray(x, dtype=float)
    c = float(np.median(x)) if center is None else center
    return float(MAD_SCALE * np.median(np.abs(x - c)))


def run_to_run_sd(x: list[float]) -> float:
    """A history's run-to-run standard deviation (of logs): robust from ROBUST_HISTORY runs on, so that
    one regressed night among them does not make every later comparison blind to the same regression;
    the plain standard deviation below that, where a MAD is too coarse (of three runs, one is the median)."""
    if len(x) >= ROBUST_HISTORY:
        return robust_sd(x)
    return float(np.std(x, ddof=1))


def missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def samples(v) -> np.ndarray:
    """A row's list of samples (raw_ms, evict_ms) as finite floats; anything else is none."""
    a = np.asarray(v if isinstance(v, (list, tuple, np.ndarray)) else [], dtype=float)
    return a[np.isfinite(a)]


def paces(device) -> bool:
    """Whether a device's times are paced: the CPU's. On CUDA the eviction is timed from the host
    (launch and synchronisation jitter), so GPU rows stay raw."""
    return PACE and str(device).startswith("cpu")


def paced(raw, evict) -> np.ndarray | None:
    """A CPU row's samples in units of the cache eviction timed just before each (records.evict_ms), or
    None where the row has no eviction times. On this shared 2-core host the machine's speed drifts by
    15-20% within seconds and by 20% between processes, slowing every sample alike: the eviction, a
    fixed 64 MiB read, slows with it. Five nightly runs of the same code (results/20261201T16*): a row's
    median varied by 25% between runs (standard deviation of its log, median row); each sample divided by
    its eviction, by 8.8%. A slope fitted per row (log time on log eviction) did worse (17%): the
    eviction's own jitter flattens it."""
    t, e = samples(raw), samples(evict)
    if len(t) == 0 or len(t) != len(e) or (e <= 0).any():
        return None
    return t / e


def local_drift(lr: np.ndarray, impls: np.ndarray, sides: bool = True) -> np.ndarray:
    """Per row, the shift its neighbours in measurement order share: the median log-ratio of the
    DRIFT_WINDOW rows of other implementations before it, of those after it, or of both, whichever
    is closest to the row's own. One side is needed at a burst's edge (the rows before it were not
    slowed, those after were). The row's own implementation is left out of its neighbours: a slower
    implementation's other rows would otherwise pull the drift towards its change and hide half of it
    (a 10% slowdown showed as 5.7%). sides=False: both sides' median only."""
    out = np.zeros(len(lr))
    for i, x in enumerate(lr):
        others = impls != impls[i]
        before = lr[:i][others[:i]][-DRIFT_WINDOW:]
        after = lr[i + 1:][others[i + 1:]][:DRIFT_WINDOW]
        windows = (before, after, np.concatenate([before, after])) if sides else (np.concatenate([before, after]),)
        medians = [np.median(w) for w in windows if len(w)]
        out[i] = min(medians, key=lambda d: abs(x - d)) if medians else 0.0
    return out
