"""`lossbench compare BASE HEAD`: per row and metric, regressed / improved / unchanged / inconclusive.

Rows are matched on records.KEY (device, family, impl, mode, shape, dtype, options, input_dist).

time: the ratio of medians head/base, with a bootstrap CI and a Mann-Whitney test on the raw samples
  (scipy.stats). Within-run samples alone cry wolf between runs: on the shared 2-core machine this
  was built on, runs of the same code differ by more than their samples explain, and in bursts that
  slow every row measured in the same seconds (the committed nightly runs show ratios up to 2x). So:
  - on the CPU, each sample is taken in units of the cache eviction timed just before it (_paced): the
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
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from scipy import stats

from .. import importers, store
from ..errors import UsageError
from ..records import COMPARABLE, KEY
from ..run import FAILED

VERDICTS = ("regressed", "missing", "inconclusive", "improved", "added", "unchanged")  # by severity
DEFAULT_THRESHOLD_PCT = 5.0  # the smallest change compare and nightly count, in percent (--threshold)
ALPHA = 0.05                  # false-discovery rate over a comparison's time rows
ACCURACY_GROWTH = 2.0         # a worst-row error more than 2x its base is a regression
# The smallest memory change that counts. CUDA: the caching allocator's block. CPU: glibc grows and
# trims its heap in 128 KiB steps (M_TOP_PAD, the mmap threshold) and where a process's heap stands
# is not the call's doing: two nights of the same code differed by 290 KiB on every implementation
# of a 256x300 case (the smallest of five calls each); 1 MiB leaves that out.
ALLOC_BLOCK = {"cuda": 512, "cpu": 2**20}
DRIFT_WINDOW = 6              # rows on each side that define a row's local drift
MIN_ROWS_FOR_NOISE = 8        # fewer time rows than this cannot estimate the between-run noise ...
DEFAULT_NOISE = 0.05          # ... which is then taken as 5% (log scale), about its median on this machine
BOOTSTRAP_RESAMPLES = 2000
MIN_GROUP_ROWS = 4            # rows an implementation (and the others) need for the implementation-wide test
MIN_HISTORY = 3               # earlier runs a row needs for its own run-to-run variation
ROBUST_HISTORY = 5            # from this many, that variation is a scaled MAD (one regressed night left out)
MIN_GROUPS_FOR_NOISE = 5      # implementations needed to estimate their between-run noise (else DEFAULT_NOISE)
VERSIONS = tuple(f for f in COMPARABLE if f != "git_sha")  # what must match; the code may differ
PACE_SLOPE_SD = 0.4           # spread of rows' time-on-eviction slopes (quartiles 0.11-0.67 over one nightly run)
PACE = True                   # CPU time rows are compared in units of their eviction times (_paced)


@dataclass
class Run:
    name: str                # as given on the command line
    run_id: str
    rows: pd.DataFrame       # in measurement order
    path: Path | None = None  # the file it was read from


@dataclass
class Comparison:
    base: Run
    head: Run
    threshold: float
    verdicts: pd.DataFrame                      # one row per (row key, metric)
    noise: dict = field(default_factory=dict)   # per device: between-run noise and run-wide drift

    def counts(self) -> dict[str, int]:
        c = self.verdicts["verdict"].value_counts()
        return {v: int(c.get(v, 0)) for v in VERDICTS if c.get(v, 0)}

    def regressed(self) -> bool:
        return bool((self.verdicts["verdict"] == "regressed").any())

    def exit_code(self) -> int:
        return 1 if self.regressed() else 0


# --- loading -----------------------------------------------------------------------------------------
def load_run(ref: str, results_dir: str | Path) -> Run:
    """A run file (lossbench's, an asv result file, pytest-benchmark JSON), or a run id under results_dir
    (in asv's or pytest-benchmark's folder also a commit: the first 7 or more hex digits of its sha)."""
    p = Path(ref)
    if not p.is_file():
        p = _imported_run_file(ref, results_dir) or Path(results_dir) / f"{ref}.jsonl"
        if not p.is_file():
            raise UsageError(f"no run {ref!r}: neither a run file nor a run id in {str(results_dir)!r}")
    df = store.load_results(p)
    if df.empty:
        raise UsageError(f"{p} holds no result rows")
    ids = df["run_id"].dropna().unique()
    return Run(ref, str(ids[0]) if len(ids) else p.stem, df.reset_index(drop=True), p)


def _imported_run_file(ref: str, results_dir: str | Path) -> Path | None:
    if not Path(results_dir).is_dir() or not importers.kind(results_dir):
        return None
    for f in importers.run_files(results_dir):
        try:
            first = importers.load_file(f).iloc[0]
        except (UsageError, IndexError):
            continue
        if ref == first["run_id"] or (len(ref) >= 7 and str(first["git_sha"]).startswith(ref)):
            return f
    return None


def incompatibility(base: Run, head: Run) -> str | None:
    """The first version or hardware field that differs on a device both runs measured."""
    for device in sorted(set(base.rows["device"]) & set(head.rows["device"])):
        b = base.rows[base.rows["device"] == device].iloc[0]
        h = head.rows[head.rows["device"] == device].iloc[0]
        for f in VERSIONS:
            if _norm(b.get(f)) != _norm(h.get(f)):
                return f"{device}: {f} is {_norm(b.get(f))} in {base.name}, {_norm(h.get(f))} in {head.name}"
    return None


def _norm(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


# --- the comparison -----------------------------------------------------------------------------------
def history_logs(runs: list[Run]) -> dict[tuple[str, bool], dict[int, float]]:
    """Per (row key, paced), the log of the row's median in each earlier run, in the units the
    comparison uses: eviction-paced (_paced) or raw ms. Read once per comparison; the rows' and the
    implementations' run-to-run spreads both come from it."""
    logs: dict[tuple[str, bool], dict[int, float]] = {}
    for i, r in enumerate(runs):
        ok = _keyed(r.rows)
        ok = ok[(ok["status"] == "ok") & ok["time_median_ms"].notna()]
        for key, m, raw, evict in zip(ok.index, ok["time_median_ms"], ok["raw_ms"],
                                      ok.get("evict_ms", pd.Series(None, index=ok.index))):
            if m > 0:
                logs.setdefault((key, False), {})[i] = math.log(m)
            paced = _paced(raw, evict)
            if paced is not None:
                logs.setdefault((key, True), {})[i] = math.log(float(np.median(paced)))
    return logs


def row_history_noise(logs: dict[tuple[str, bool], dict[int, float]]) -> dict[tuple[str, bool], float]:
    """Per (row key, paced), the spread (_spread) of the log of the row's median over earlier runs (at
    least MIN_HISTORY of them). A row that varies from run to run more than the device's typical row is
    judged against its own variation. A real change among those runs makes it larger: more cautious."""
    return {k: _spread(list(v.values())) for k, v in logs.items() if len(v) >= MIN_HISTORY}


def _spread(x: list[float]) -> float:
    """A history's run-to-run standard deviation: robust (scaled MAD) from ROBUST_HISTORY runs on, so that
    one regressed night among them does not make every later comparison blind to the same regression;
    the plain standard deviation below that, where a MAD is too coarse (of three runs, one is the median)."""
    if len(x) >= ROBUST_HISTORY:
        return float(stats.median_abs_deviation(x, scale="normal"))
    return float(np.std(x, ddof=1))


def implementation_history_noise(logs: dict[tuple[str, bool], dict[int, float]]
                                 ) -> dict[tuple[str, str, str, bool], float]:
    """Per (device, family, implementation, paced), how much the implementation as a whole moved between
    earlier runs of the rows: per run, the median over its rows of each row's departure from the row's
    mean over the runs; their spread (_spread). Whole implementations move between processes of the
    same code (five nightly runs: torch_compile's ce rows 12% slower together in one, fused's in another),
    by more than the spread of the other implementations' shifts in one comparison shows."""
    per_run: dict[tuple, dict[int, list[float]]] = {}
    for (key, paced), v in logs.items():
        if len(v) < MIN_HISTORY:
            continue
        device, family, impl = json.loads(key)[:3]
        mean = float(np.mean(list(v.values())))
        for i, x in v.items():
            per_run.setdefault((device, family, impl, paced), {}).setdefault(i, []).append(x - mean)
    return {g: _spread([float(np.median(d)) for d in runs_.values()])
            for g, runs_ in per_run.items() if len(runs_) >= MIN_HISTORY}


def history_for(base: Run, head: Run, results_dir: str | Path, limit: int = 10) -> list[Run]:
    """Up to `limit` most recent earlier runs comparable with the two (same device names and versions), the
    base among them: the rows' own run-to-run variation. They come from results_dir or, for a run another
    tool wrote (asv, pytest-benchmark), from the other runs of its folder."""
    found = []
    for run in _earlier_runs(head, results_dir):
        if run.run_id >= head.run_id:
            continue
        if set(run.rows["device_name"].dropna()) & set(head.rows["device_name"].dropna()) \
                and incompatibility(run, head) is None:
            found.append(run)
        if len(found) >= limit:
            break
    if base.run_id not in {r.run_id for r in found}:
        found.append(base)
    return found


def _earlier_runs(head: Run, results_dir: str | Path):
    """Candidate runs, newest first. A corrupt older file only leaves the history shorter."""
    def quietly(load):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return load()
            except UsageError:
                return None

    if head.path is not None and importers.kind(head.path):
        folder = head.path.parent
        dfs = quietly(lambda: importers.runs(folder)) if importers.kind(folder) else None
        for df in reversed(dfs or []):
            yield Run(str(folder), str(df["run_id"].iloc[0]), df.reset_index(drop=True))
        return
    for path in sorted(Path(results_dir).glob("*.jsonl"), reverse=True):
        if path.stem < head.run_id:
            run = quietly(lambda: load_run(str(path), results_dir))
            if run is not None:
                yield run


def compare(base: Run, head: Run, threshold: float = 0.05, force: bool = False,
            history: list[Run] | None = None) -> Comparison:
    if not 0 < threshold < 1:
        raise UsageError(f"--threshold must be between 0 and 100 percent, not {threshold * 100:g}")
    diff = incompatibility(base, head)
    if diff and not force:
        raise UsageError(f"runs are not comparable: {diff} (--force compares them anyway)")
    b = _keyed(base.rows)
    h = _keyed(head.rows)
    if not set(b.index) & set(h.index):
        raise UsageError(f"runs {base.name} and {head.name} have no row in common")
    both = pd.merge(b, h, left_index=True, right_index=True, suffixes=("_b", "_h"))
    out = [_one_sided(r, "missing") for _, r in b.loc[b.index.difference(h.index)].iterrows()]
    out += [_one_sided(r, "added") for _, r in h.loc[h.index.difference(b.index)].iterrows()]
    mem_seen = row_history_memory(history or [])
    for key, r in both.iterrows():
        out += _status_verdict(r)
        if r["status_b"] == "ok" and r["status_h"] == "ok":
            out += _memory_verdict(r, threshold, mem_seen.get(key)) + _accuracy_verdict(r)
    logs = history_logs(history or [])
    time_df, noise = _time_verdicts(both, threshold, row_history_noise(logs), implementation_history_noise(logs))
    verdicts = pd.concat([pd.DataFrame(out), time_df], ignore_index=True)
    verdicts["_rank"] = verdicts["verdict"].map(VERDICTS.index)
    verdicts = verdicts.sort_values(["_rank", "severity"], ascending=[True, False], kind="stable")
    return Comparison(base, head, threshold, verdicts.drop(columns="_rank").reset_index(drop=True), noise)


def _keyed(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["order"] = np.arange(len(df))  # measurement order: the drift's neighbourhood
    df["key"] = [json.dumps([_norm(v) for v in k]) for k in df[KEY].itertuples(index=False)]
    return df.drop_duplicates("key", keep="last").set_index("key")  # a resumed row replaces its first try


def _ident(r: pd.Series, suffix: str = "") -> dict:
    g = lambda c: r.get(c + suffix, r.get(c))  # noqa: E731
    return {"device": g("device"), "family": g("family"), "impl": g("impl"), "case": g("label"),
            "dtype": g("dtype"), "mode": g("mode")}


def _verdict(r, metric, verdict, base=None, head=None, change=None, low=None, high=None, p=None, q=None,
             note="", severity=0.0, suffix="_h"):
    return {**_ident(r, suffix), "metric": metric, "verdict": verdict, "base": base, "head": head,
            "change": change, "ci_low": low, "ci_high": high, "p": p, "q": q, "severity": severity, "note": note}


def _one_sided(r: pd.Series, verdict: str) -> dict:
    return _verdict(r, "row", verdict, note=f"status {r['status']} in one run only", suffix="")


def _status_verdict(r: pd.Series) -> list[dict]:
    sb, sh = r["status_b"], r["status_h"]
    if sb == sh:
        return []
    if sb == "ok" and sh != "ok":
        v, note = "regressed", f"{sh}: {r.get('error_h') or ''}".strip().rstrip(":")
    elif sh == "ok" or sb in FAILED:
        v, note = "improved", f"was {sb}"
    else:
        v, note = "regressed" if sh in FAILED else "inconclusive", f"was {sb}"
    return [_verdict(r, "status", v, sb, sh, note=note, severity=math.inf if v == "regressed" else 0)]


def row_history_memory(runs: list[Run]) -> dict[str, float]:
    """Per row key, the largest extra memory any of the earlier runs saw (over their repeated calls)."""
    seen: dict[str, float] = {}
    for r in runs:
        ok = _keyed(r.rows)
        ok = ok[ok["status"] == "ok"]
        for key, lo, hi in zip(ok.index, ok["extra_mem_bytes"], ok.get("extra_mem_max_bytes", ok["extra_mem_bytes"])):
            v = lo if _missing(hi) else hi
            if not _missing(v):
                seen[key] = max(seen.get(key, 0.0), float(v))
    return seen


def _memory_verdict(r: pd.Series, threshold: float, seen_max: float | None = None) -> list[dict]:
    """On ranges: each row holds the smallest and largest extra over its repeated calls (the CPU
    peak of one call varies by whole tensors, runners/memory.py), so a change must clear the other
    run's whole range; where the peak is deterministic the range is one value. Between processes the
    CPU peak varies too (eager bf16 KL: 12.3 MB in one run, 20.5 MB in the next, at the smallest of five
    calls each): the range also takes in what earlier runs of the row saw (`seen_max`)."""
    mb, mh = r["extra_mem_bytes_b"], r["extra_mem_bytes_h"]
    if _missing(mb) or _missing(mh):
        return []
    mb_max = mb if _missing(r.get("extra_mem_max_bytes_b")) else r["extra_mem_max_bytes_b"]
    mb_max = max(mb_max, seen_max or 0.0)
    mh_max = mh if _missing(r.get("extra_mem_max_bytes_h")) else r["extra_mem_max_bytes_h"]
    block = ALLOC_BLOCK.get(str(r["device_h"]).split(":")[0], 4096)
    if mh - mb_max > threshold * mb_max and mh - mb_max > block:
        v = "regressed"
    elif mb - mh_max > threshold * mh_max and mb - mh_max > block:
        v = "improved"
    else:
        v = "unchanged"
    change = mh / mb if mb else (math.inf if mh else 1.0)
    return [_verdict(r, "memory", v, float(mb), float(mh), change, severity=math.log(max(change, 1e-300)))]


def _accuracy_verdict(r: pd.Series) -> list[dict]:
    # Seeded inputs: the same code gives the same errors, so no test is needed. asv's rows carry only
    # err_vs_floor (grad_row_err_max over a floor fixed by the case: the same ratio between two runs) and
    # no accuracy_ok, which then counts as unchanged.
    col = next((c for c in ("grad_row_err_max", "err_vs_floor") if not _missing(r[f"{c}_b"])), "loss_rel_err")
    if col == "err_vs_floor" and _missing(r["err_vs_floor_h"]):
        return []  # the head did not measure it
    eb, eh = _err(r[f"{col}_b"]), _err(r[f"{col}_h"])
    known = not (_missing(r["accuracy_ok_b"]) or _missing(r["accuracy_ok_h"]))
    ok_b, ok_h = (bool(r["accuracy_ok_b"]), bool(r["accuracy_ok_h"])) if known else (True, True)
    change = eh / eb if eb > 0 else (1.0 if eh == eb else math.inf)
    if ok_b and not ok_h:
        v, note = "regressed", "accuracy_ok turned false"
    elif change > ACCURACY_GROWTH:
        v, note = "regressed", f"{col} grew more than {ACCURACY_GROWTH:g}x"
    elif not ok_b and ok_h:
        v, note = "improved", "accuracy_ok turned true"
    elif change < 1 / ACCURACY_GROWTH:
        v, note = "improved", f"{col} shrank more than {ACCURACY_GROWTH:g}x"
    else:
        v, note = "unchanged", ""
    sev = math.inf if v == "regressed" and not ok_h else math.log(change) if 0 < change < math.inf else 0.0
    return [_verdict(r, "accuracy", v, eb, eh, change, note=note, severity=sev)]


def _err(v) -> float:
    return math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _samples(v) -> np.ndarray:
    a = np.asarray(v if isinstance(v, (list, tuple, np.ndarray)) else [], dtype=float)
    return a[np.isfinite(a)]


def _paced(raw, evict) -> np.ndarray | None:
    """A CPU row's samples in units of the cache eviction timed just before each (records.evict_ms), or
    None where the row has no eviction times. On this shared 2-core host the machine's speed drifts by
    15-20% within seconds and by 20% between processes, slowing every sample alike: the eviction, a
    fixed 64 MiB read, slows with it. Five nightly runs of the same code (results/20261201T16*): a row's
    median varied by 25% between runs (standard deviation of its log, median row); each sample divided by
    its eviction, by 8.8%. A slope fitted per row (log time on log eviction) did worse (17%): the
    eviction's own jitter flattens it. On CUDA the
    eviction is timed from the host (launch and synchronisation jitter), so GPU rows stay raw."""
    t, e = _samples(raw), _samples(evict)
    if len(t) == 0 or len(t) != len(e) or (e <= 0).any():
        return None
    return t / e


def _ratio_ci(a: np.ndarray, b: np.ndarray, seed: int) -> tuple[float, float]:
    """Percentile bootstrap CI of median(b) / median(a), the runs resampled independently (BCa needs
    more samples than a small row has and fails on ties)."""
    res = stats.bootstrap((a, b), lambda x, y, axis: np.median(y, axis=axis) / np.median(x, axis=axis),
                          paired=False, vectorized=True, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                          confidence_level=0.95, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _local_drift(lr: np.ndarray, impls: np.ndarray, sides: bool = True) -> np.ndarray:
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
        spread = 1.4826 * float(np.median(np.abs(g["adj"] - np.median(g["adj"]))))
        tau2 = max(0.0, spread**2 - float(np.median(g["total_se"] ** 2)))
        out[(device, family, impl)] = {"n": len(g), "shift": float(np.median(g["adj"]) - np.median(others)),
                                       "center": float(np.median(g["adj"])), "tau2": tau2, "p": float(p),
                                       "paced": bool(g["paced"].all())}
    # Implementations move between runs of the same code too (eager ce 7% faster in one run than in
    # the other, its neighbours not): the spread of all implementations' shifts on the device (robust,
    # as for rows) is their between-run noise, and an implementation must stand out from it as well.
    for device in {k[0] for k in out}:
        shifts = np.array([v["shift"] for k, v in out.items() if k[0] == device])
        spread = 1.4826 * float(np.median(np.abs(shifts))) if len(shifts) >= MIN_GROUPS_FOR_NOISE else DEFAULT_NOISE
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
        a, b = _samples(r["raw_ms_b"]), _samples(r["raw_ms_h"])
        paced, pace_log = False, 0.0
        if PACE and str(r["device_h"]).startswith("cpu"):
            pa, pb = _paced(r.get("raw_ms_b"), r.get("evict_ms_b")), _paced(r.get("raw_ms_h"), r.get("evict_ms_h"))
            if pa is not None and pb is not None:  # both runs paced, or neither: never one of each
                a, b, paced = pa, pb, True
                pace_log = math.log(float(np.median(_samples(r["evict_ms_h"])) / np.median(_samples(r["evict_ms_b"]))))
        if len(a) < 2 or len(b) < 2:
            continue
        low, high = _ratio_ci(a, b, seed=zlib.crc32(key.encode()))  # reproducible, per row
        recs.append({"key": key, "device": r["device_h"], "family": r["family_h"], "impl": r["impl_h"],
                     "order": r["order_h"], "r": np.median(b) / np.median(a),
                     "low": low, "high": high, "p_mw": stats.mannwhitneyu(a, b, alternative="two-sided").pvalue,
                     "paced": paced, "pace_log": pace_log, "row": r})
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
        drift = _local_drift(lr, impls)
        if len(g) >= MIN_ROWS_FOR_NOISE:
            # From the rows' distance to both sides' median: choosing the closer side (drift) would
            # shrink the spread of unchanged rows too, and the noise with it. Robust (median of
            # absolute values): the regressed rows are a minority, a burst's edges a few rows.
            spread = 1.4826 * np.median(np.abs(lr - _local_drift(lr, impls, sides=False)))
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
        out.append(_verdict(r, "time", v, float(r["time_median_ms_b"]), float(r["time_median_ms_h"]),
                            math.exp(x["adj"]), math.exp(x["adj"]) * x["low"] / x["r"],
                            math.exp(x["adj"]) * x["high"] / x["r"], float(x["p"]), float(x["q"]), note=note,
                            severity=abs(x["adj"])))
    for (d, f, i), g in groups.items():
        noise[d].setdefault("implementations", {})[f"{f} {i}"] = g
    return pd.DataFrame(out), noise


# --- output -------------------------------------------------------------------------------------------
def _fmt_value(metric: str, v) -> str:
    if _missing(v):
        return "-"
    if metric == "time":
        return f"{v:.3g} ms"
    if metric == "memory":
        from .table import _fmt_bytes
        return _fmt_bytes(v)
    if metric == "accuracy":
        return f"{v:.2g}"
    return str(v)


def _fmt_change(row) -> str:
    c = row["change"]
    if _missing(c):
        return ""
    text = "inf" if math.isinf(c) else f"x{c:.3g}"
    if not _missing(row.get("ci_low")):
        text += f" [{row['ci_low']:.3g}, {row['ci_high']:.3g}]"
    return text


def display_frame(cmp: Comparison, all_rows: bool = False) -> pd.DataFrame:
    """The verdicts as text columns, unchanged rows left out unless all_rows."""
    v = cmp.verdicts if all_rows else cmp.verdicts[cmp.verdicts["verdict"] != "unchanged"]
    return pd.DataFrame({
        "verdict": v["verdict"], "metric": v["metric"], "device": v["device"], "family": v["family"],
        "impl": v["impl"], "case": v["case"], "dtype": v["dtype"], "mode": v["mode"],
        "base": [_fmt_value(m, x) for m, x in zip(v["metric"], v["base"])],
        "head": [_fmt_value(m, x) for m, x in zip(v["metric"], v["head"])],
        "change [95% CI]": [_fmt_change(r) for _, r in v.iterrows()],
        "q": ["" if _missing(q) else f"{q:.2g}" for q in v["q"]],
        "note": v["note"],
    })


def summary_lines(cmp: Comparison) -> list[str]:
    counts = ", ".join(f"{n} {v}" for v, n in cmp.counts().items())
    lines = [f"{cmp.base.run_id} -> {cmp.head.run_id}: threshold {cmp.threshold * 100:g}%, "
             f"false-discovery rate {ALPHA:g} over time rows; {counts}"]
    for device, n in cmp.noise.items():
        lines.append(f"{device}: between-run noise ±{n['between_run_noise_pct']:.1f}% beyond the samples, "
                     f"run-wide drift {n['run_wide_drift_pct']:+.1f}% (median over {n['rows']} rows, "
                     "not judged per row)")
    for device, n in cmp.noise.items():
        for name, g in n.get("implementations", {}).items():
            if g["q"] < ALPHA and abs(g["shift"]) > math.log1p(cmp.threshold):
                lines.append(f"{device} {name}: {'slower' if g['shift'] > 0 else 'faster'} x{math.exp(g['shift']):.3g} "
                             f"over its {g['n']} rows against the other implementations (q={g['q']:.2g})")
    if "inconclusive" in cmp.counts():
        lines.append("inconclusive: the data cannot tell at this threshold; where the row's note says so, rerun "
                     "with a larger --budget; where the runs differ by more than their samples, more samples "
                     "will not help")
    return lines


_STYLE = {"regressed": "bold red", "missing": "red", "inconclusive": "yellow", "improved": "green", "added": "cyan"}


def terminal_table(cmp: Comparison, title: str | None = None) -> Table:
    df = display_frame(cmp)
    table = Table(title=title or "lossbench compare: " + summary_lines(cmp)[0], title_justify="left")
    for col in df.columns:
        table.add_column(col, overflow="fold")
    for _, r in df.iterrows():
        style = _STYLE.get(r["verdict"], "")
        table.add_row(*[f"[{style}]{r[c]}[/]" if c == "verdict" and style else str(r[c]) for c in df.columns])
    return table


def markdown(cmp: Comparison) -> str:
    df = display_frame(cmp)
    head = "## lossbench compare\n\n" + "\n".join(f"- {line}" for line in summary_lines(cmp)) + "\n\n"
    if df.empty:
        return head + "Every matched row is unchanged.\n"
    return head + df.to_markdown(index=False) + "\n"


def to_json(cmp: Comparison) -> dict:
    rows = cmp.verdicts.replace({np.inf: "inf", -np.inf: "-inf"})
    return {"base": cmp.base.run_id, "head": cmp.head.run_id, "threshold_pct": cmp.threshold * 100,
            "alpha": ALPHA, "counts": cmp.counts(), "noise": cmp.noise, "regressed": cmp.regressed(),
            "rows": json.loads(rows.to_json(orient="records"))}


def write(cmp: Comparison, console: Console, markdown_path: str | None = None, json_path: str | None = None) -> None:
    """The comparison on the terminal (sorted by severity), and as Markdown and JSON files if asked."""
    if display_frame(cmp).empty:
        console.print(summary_lines(cmp)[0])
    else:
        console.print(terminal_table(cmp))
    for line in summary_lines(cmp)[1:]:
        console.print(line)
    if markdown_path:
        Path(markdown_path).write_text(markdown(cmp))
    if json_path:
        Path(json_path).write_text(json.dumps(to_json(cmp), indent=1))


def threshold_from_pct(pct: float | None, default_pct: float | None = None) -> float:
    """--threshold as a fraction; the command's default when not given."""
    if pct is None:
        pct = DEFAULT_THRESHOLD_PCT if default_pct is None else default_pct
    if not (0 < pct < 100 and math.isfinite(pct)):
        raise UsageError(f"--threshold must be a percentage between 0 and 100, not {pct:g}")
    return pct / 100
