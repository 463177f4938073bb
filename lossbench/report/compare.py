"""`lossbench compare BASE HEAD`: per row and metric, regressed / improved / unchanged / inconclusive.

Rows are matched on records.KEY (device, family, impl, mode, shape, dtype, options, input_dist).

time: the ratio of medians head/base, with a bootstrap CI and a Mann-Whitney test on the raw samples
  (scipy.stats). Within-run samples alone cry wolf between runs: on the shared 2-core machine this
  was built on, runs of the same code differ by more than their samples explain, and in bursts that
  slow every row measured in the same seconds (the committed nightly runs show ratios up to 2x). So:
  - on the CPU, each sample is taken in units of the cache eviction timed just before it (paced): the
    host's speed at that moment; the larger that correction, the wider the row's interval;
  - a row's change is taken relative to the rows measured next to it (`drift`: the median log-ratio
    of the other implementations' rows just before or after it in the plan's order, which both runs
    follow). One
    implementation made slower stands out against its neighbours, the other implementations of the
    same cases; a burst that slowed every neighbour does not. A change shared by every row of the run
    (the machine, or code every row runs) is reported once, as the run-wide drift, not per row;
  - what remains between runs is estimated from the comparison itself (a robust spread of the
    drift-corrected log-ratios, less the within-run part), or from the row's own history where that
    varies more (earlier comparable runs, history_for), and added to each row's within-run
    variance: a row is significant only when its change stands out from both;
  - p = max(Mann-Whitney p, between-run p): the samples must differ and the change must exceed the
    between-run noise; then false-discovery control over every time row of the comparison
    (scipy.stats.false_discovery_control), so a 400-row comparison of unchanged code stays quiet;
  - regressed / improved: significant, and beyond the threshold; unchanged: the whole interval
    (within-run and between-run noise) inside the threshold; inconclusive: neither;
  - per implementation, its rows' changes against the other implementations' (_implementation_shifts),
    judged against how much it moved as a whole in earlier runs too: a slower implementation's rows are
    regressed even where each alone drowns, each row's change shrunk towards the implementation's
    (_shrunk), when it moved that way itself.
  Lower is better for time and memory and errors; higher for bandwidth (which follows time here).
memory: extra bytes growing by more than the threshold and more than one allocator block, beyond the
  base's range over its repeated calls and what earlier runs of the row saw: regressed.
accuracy: accuracy_ok turning false, or the worst-row error growing more than 2x: regressed.
status: ok turning into error/oom/timeout/crash (or unsupported): regressed; rows in one run only are
  `added` or `missing`.
"""
from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import UsageError
from .runs import Run, incompatibility, keyed
from .statistics import ALPHA, local_drift, paced, paces, robust_sd, run_to_run_sd, samples
from .verdicts import Comparison, by_severity, row_history_memory, row_verdicts, verdict

DEFAULT_THRESHOLD_PCT = 5.0  # the smallest change compare and nightly count, in percent (--threshold)
MIN_ROWS_FOR_NOISE = 8        # fewer time rows than this cannot estimate the between-run noise ...
DEFAULT_NOISE = 0.05          # ... which is then taken as 5% (log scale), about its median on this machine
BOOTSTRAP_RESAMPLES = 2000
MIN_GROUP_ROWS = 4            # rows an implementation (and the others) need for the implementation-wide test
MIN_HISTORY = 3               # earlier runs a row needs for its own run-to-run variation
MIN_GROUPS_FOR_NOISE = 5      # implementations needed to estimate their between-run noise (else DEFAULT_NOISE)
PACE_SLOPE_SD = 0.4           # spread of rows' time-on-eviction slopes (quartiles 0.11-0.67 over one nightly run)


# --- the comparison -----------------------------------------------------------------------------------
def history_logs(runs: list[Run]) -> dict[tuple[str, bool], dict[int, float]]:
    """Per (row key, paced), the log of the row's median in each earlier run, in the units the
    comparison uses: eviction-paced (statistics.paced) or raw ms. Read once per comparison; the rows'
    and the implementations' run-to-run spreads both come from it."""
    logs: dict[tuple[str, bool], dict[int, float]] = {}
    for i, r in enumerate(runs):
        ok = keyed(r.rows)
        ok = ok[(ok["status"] == "ok") & ok["time_median_ms"].notna()]
        for key, m, raw, evict in zip(ok.index, ok["time_median_ms"], ok["raw_ms"],
                                      ok.get("evict_ms", pd.Series(None, index=ok.index))):
            if m > 0:
                logs.setdefault((key, False), {})[i] = math.log(m)
            p = paced(raw, evict)
            if p is not None:
                logs.setdefault((key, True), {})[i] = math.log(float(np.median(p)))
    return logs


def row_history_noise(logs: dict[tuple[str, bool], dict[int, float]]) -> dict[tuple[str, bool], float]:
    """Per (row key, paced), the spread (statistics.run_to_run_sd) of the log of the row's median over
    earlier runs (at least MIN_HISTORY of them). A row that varies from run to run more than the device's typical row is
    judged against its own variation. A real change among those runs makes it larger: more cautious."""
    return {k: run_to_run_sd(list(v.values())) for k, v in logs.items() if len(v) >= MIN_HISTORY}


def implementation_history_noise(logs: dict[tuple[str, bool], dict[int, float]]
                                 ) -> dict[tuple[str, str, str, bool], float]:
    """Per (device, family, implementation, paced), how much the implementation as a whole moved between
    earlier runs of the rows: per run, the median over its rows of each row's departure from the row's
    mean over the runs; their spread (statistics.run_to_run_sd). Whole implementations move between
    processes of the same code (five nightly runs: torch_compile's ce rows 12% slower together in one,
    fused's in another), by more than the spread of the other implementations' shifts in one comparison
    shows."""
    per_run: dict[tuple, dict[int, list[float]]] = {}
    for (key, is_paced), v in logs.items():
        if len(v) < MIN_HISTORY:
            continue
        device, family, impl = json.loads(key)[:3]
        mean = float(np.mean(list(v.values())))
        for i, x in v.items():
            per_run.setdefault((device, family, impl, is_paced), {}).setdefault(i, []).append(x - mean)
    return {g: run_to_run_sd([float(np.median(d)) for d in runs_.values()])
            for g, runs_ in per_run.items() if len(runs_) >= MIN_HISTORY}


def compare(base: Run, head: Run, threshold: float = 0.05, force: bool = False,
            history: list[Run] | None = None) -> Comparison:
    if not 0 < threshold < 1:
        raise UsageError(f"--threshold must be between 0 and 100 percent, not {threshold * 100:g}")
    diff = incompatibility(base, head)
    if diff and not force:
        raise UsageError(f"runs are not comparable: {diff} (--force compares them anyway)")
    b = keyed(base.rows)
    h = keyed(head.rows)
    if not set(b.index) & set(h.index):
        raise UsageError(f"runs {base.name} and {head.name} have no row in common")
    both = pd.merge(b, h, left_index=True, right_index=True, suffixes=("_b", "_h"))
    out = row_verdicts(b, h, both, threshold, row_history_memory(history or []))
    logs = history_logs(history or [])
    time_df, noise = _time_verdicts(both, threshold, row_history_noise(logs), implementation_history_noise(logs))
    return Comparison(base, head, threshold, by_severity(out, time_df), noise)


def _ratio_ci(a: np.ndarray, b: np.ndarray, seed: int) -> tuple[float, float]:
    """Percentile bootstrap CI of median(b) / median(a), the runs resampled independently (BCa needs
    more samples than a small row has and fails on ties)."""
    res = stats.bootstrap((a, b), lambda x, y, axis: np.median(y, axis=axis) / np.median(x, axis=axis),
                          paired=False, vectorized=True, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                          confidence_level=0.95, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)



def _implementation_shifts(t: pd.DataFrame, impl_noise: dict | None = None) -> dict:
    """Per (device, family, implementation): are its rows' changes larger than the other
    implementations' in the same comparison? A kernel commit slows an implementation on many cases;
    one row's change may drown in the between-run noise while the implementation's rows together
    stand out. The other implementations' rows were measured in the same seconds, so the machine's
    state is in both: a Mann-Whitney test of the two sets of drift-corrected changes, then
    a between-run term as for rows, then false-discovery control over the implementations."""
    out = {}
    for (device, family, impl), g in t.groupby(["device", "family", "impl"]):
        others = t[(t["device"] == device) & (t["family"] == family) & (t["impl"] != impl)]["adj"]
        if len(g) < MIN_GROUP_ROWS or len(others) < MIN_GROUP_ROWS:
            continue
        p = stats.mannwhitneyu(g["adj"], others, alternative="two-sided").pvalue
        # How much the rows' true changes differ within the implementation (robust spread of their
        # changes, less what their own noise explains): 0 when a commit moved every row alike.
        spread = robust_sd(g["adj"])
        tau2 = max(0.0, spread**2 - float(np.median(g["total_se"] ** 2)))
        out[(device, family, impl)] = {"n": len(g), "shift": float(np.median(g["adj"]) - np.median(others)),
                                       "center": float(np.median(g["adj"])), "tau2": tau2, "p": float(p),
                                       "paced": bool(g["paced"].all())}
    # Implementations move between runs of the same code too (eager ce 7% faster in one run than in
    # the other, its neighbours not): the spread of all implementations' shifts on the device (robust,
    # as for rows) is their between-run noise, and an implementation must stand out from it as well.
    for device in {k[0] for k in out}:
        shifts = np.array([v["shift"] for k, v in out.items() if k[0] == device])
        spread = robust_sd(shifts, center=0.0) if len(shifts) >= MIN_GROUPS_FOR_NOISE else DEFAULT_NOISE
        for k, v in out.items():
            if k[0] == device:
                # ... and from the implementation's own history, where it moved more (a shift between
                # two runs varies by sqrt(2) times one run's deviation).
                # Without that history (fewer than MIN_HISTORY runs), DEFAULT_NOISE: the median of the
                # implementations' paced run-to-run deviation over five nightly runs here was 5%.
                own = math.sqrt(2) * (impl_noise or {}).get((*k, v["paced"]), DEFAULT_NOISE)
                z = abs(v["shift"]) / max(spread, own) if max(spread, own) > 0 else math.inf
                v["p"] = max(v["p"], float(2 * stats.norm.sf(z)))
                v["between_pct"] = 100 * (math.exp(max(spread, own)) - 1)
    if out:
        q = stats.false_discovery_control([v["p"] for v in out.values()], method="bh")
        for v, qi in zip(out.values(), q):
            v["q"] = float(qi)
    return out


def _shrunk(x: pd.Series, g: dict) -> float:
    """The row's change, given that its implementation moved (empirical Bayes): its own change and its
    implementation's, weighted by their precision. A commit that slows a kernel on every case moves all
    its rows alike (tau2 ~ 0): each row's estimate is the implementation's, which 30 rows pin down far
    better than one row's 10% run-to-run noise can. A row that moved unlike the others keeps its own."""
    w = g["tau2"] / (g["tau2"] + x["total_se"] ** 2) if g["tau2"] + x["total_se"] ** 2 > 0 else 1.0
    return float(w * x["adj"] + (1 - w) * g["center"])


def _time_verdicts(both: pd.DataFrame, threshold: float, row_noise: dict[tuple[str, bool], float],
                   impl_noise: dict[tuple[str, str, str, bool], float]) -> tuple[pd.DataFrame, dict]:
    rows = both[(both["status_b"] == "ok") & (both["status_h"] == "ok")].sort_values("order_h")
    recs = []
    for key, r in rows.iterrows():
        a, b = samples(r["raw_ms_b"]), samples(r["raw_ms_h"])
        is_paced, pace_log = False, 0.0
        if paces(r["device_h"]):
            pa, pb = paced(r.get("raw_ms_b"), r.get("evict_ms_b")), paced(r.get("raw_ms_h"), r.get("evict_ms_h"))
            if pa is not None and pb is not None:  # both runs paced, or neither: never one of each
                a, b, is_paced = pa, pb, True
                pace_log = math.log(float(np.median(samples(r["evict_ms_h"])) / np.median(samples(r["evict_ms_b"]))))
        if len(a) < 2 or len(b) < 2:
            continue
        low, high = _ratio_ci(a, b, seed=zlib.crc32(key.encode()))  # reproducible, per row
        recs.append({"key": key, "device": r["device_h"], "family": r["family_h"], "impl": r["impl_h"],
                     "order": r["order_h"], "r": np.median(b) / np.median(a),
                     "low": low, "high": high, "p_mw": stats.mannwhitneyu(a, b, alternative="two-sided").pvalue,
                     "paced": is_paced, "pace_log": pace_log, "row": r})
    if not recs:
        return pd.DataFrame(), {}
    t = pd.DataFrame(recs)
    t["log_r"] = np.log(t["r"])
    # Within-run standard error of log r, from the bootstrap interval (95%: +-1.96 se).
    t["se"] = (np.log(t["high"]) - np.log(t["low"])) / (2 * 1.96)
    noise = {}
    for device, g in t.groupby("device"):
        lr = g["log_r"].to_numpy()
        impls = g["impl"].to_numpy()
        drift = local_drift(lr, impls)
        if len(g) >= MIN_ROWS_FOR_NOISE:
            # From the rows' distance to both sides' median: choosing the closer side (drift) would
            # shrink the spread of unchanged rows too, and the noise with it. Robust (median of
            # absolute values): the regressed rows are a minority, a burst's edges a few rows.
            spread = robust_sd(lr - local_drift(lr, impls, sides=False), center=0.0)
            between = math.sqrt(max(0.0, spread**2 - float(np.median(g["se"] ** 2))))
        else:
            between = DEFAULT_NOISE
        t.loc[g.index, "drift"] = drift
        t.loc[g.index, "between"] = between
        noise[device] = {"between_run_noise_pct": 100 * (math.exp(between) - 1),
                         "run_wide_drift_pct": 100 * (math.exp(float(np.median(lr))) - 1), "rows": len(g)}
    t["adj"] = t["log_r"] - t["drift"]
    # A row's own run-to-run variation, where its history has one, when larger than the device's: a log
    # ratio of two runs varies by sqrt(2) times one run's standard deviation.
    own = np.sqrt(2) * pd.Series([row_noise.get((k, p), 0.0) for k, p in zip(t["key"], t["paced"])], index=t.index)
    t["between"] = np.maximum(t["between"], own)
    # Pacing assumes a row slows in proportion to its evictions; rows differ in how much (the slope of
    # log time on log eviction spread by PACE_SLOPE_SD over one run's rows here), so the larger the
    # correction, the less sure the paced change: a row measured while the host ran its evictions 3x
    # slower came out 2.8x slower even paced.
    t["between"] = np.sqrt(t["between"] ** 2 + (PACE_SLOPE_SD * t["pace_log"]) ** 2)
    t["total_se"] = np.sqrt(t["se"] ** 2 + t["between"] ** 2)
    z = t["adj"] / t["total_se"].where(t["total_se"] > 0, np.inf)
    t["p"] = np.maximum(t["p_mw"], 2 * stats.norm.sf(np.abs(z)))
    t["q"] = stats.false_discovery_control(t["p"].to_numpy(), method="bh")
    bound = math.log1p(threshold)
    groups = _implementation_shifts(t, impl_noise)
    out = []
    for i, x in t.iterrows():
        lo, hi = x["adj"] - 1.96 * x["total_se"], x["adj"] + 1.96 * x["total_se"]
        g = groups.get((x["device"], x["family"], x["impl"]))
        note = ""
        if x["q"] < ALPHA and x["adj"] > bound:
            v = "regressed"
        elif x["q"] < ALPHA and x["adj"] < -bound:
            v = "improved"
        elif g and g["q"] < ALPHA and abs(g["shift"]) > bound and abs(_shrunk(x, g)) > bound \
                and np.sign(_shrunk(x, g)) == np.sign(g["shift"]) == np.sign(x["adj"]):
            # (the row itself moved the implementation's way: a row 20% faster is never called slower)
            v = "regressed" if g["shift"] > 0 else "improved"
            note = (f"with its implementation: {g['n']} rows x{math.exp(g['shift']):.3g} against the other "
                    f"implementations' (Mann-Whitney q={g['q']:.2g})")
        elif -bound <= lo and hi <= bound:
            v = "unchanged"
        else:
            v = "inconclusive"
            note = ("the data cannot tell at this threshold: rerun with a larger --budget" if x["se"] >= x["between"]
                    else "the data cannot tell at this threshold: the runs differ by more than their samples "
                         "(a larger --budget will not help)")
        r = x["row"]
        if abs(x["drift"]) > 0.01:
            note = (note + "; " if note else "") + f"neighbours moved x{math.exp(x['drift']):.3g}"
        out.append(verdict(r, "time", v, float(r["time_median_ms_b"]), float(r["time_median_ms_h"]),
                            math.exp(x["adj"]), math.exp(x["adj"]) * x["low"] / x["r"],
                            math.exp(x["adj"]) * x["high"] / x["r"], float(x["p"]), float(x["q"]), note=note,
                            severity=abs(x["adj"])))
    for (d, f, i), g in groups.items():
        noise[d].setdefault("implementations", {})[f"{f} {i}"] = g
    return pd.DataFrame(out), noise



def threshold_from_pct(pct: float | None, default_pct: float | None = None) -> float:
    """--threshold as a fraction; the command's default when not given."""
    if pct is None:
        pct = DEFAULT_THRESHOLD_PCT if default_pct is None else default_pct
    if not (0 < pct < 100 and math.isfinite(pct)):
        raise UsageError(f"--threshold must be a percentage between 0 and 100, not {pct:g}")
    return pct / 100
