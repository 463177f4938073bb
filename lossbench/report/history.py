"""`lossbench history`: every row's trend over the runs in a results folder, and the changes in it.

A series is one row (records.KEY: device, family, implementation, case, dtype, mode) over the runs of one
comparability group (report.runs.VERSIONS: device name, torch, triton and CUDA versions, threads; the
commit may differ, that is what the history follows). Runs are ordered by time. A series never mixes
groups: a torch upgrade starts new series. Three metrics: time (time_ms: a run-level median, paced as
below), memory (extra_mem_bytes, with extra_mem_max_bytes as the run's range) and accuracy
(grad_row_err_max, or loss_rel_err where there is no gradient).

Time on the shared 2-core machine moves in bursts that slow the rows measured in the same seconds, and
a row's median varies by ~10% between runs of the same code. So a row's time is taken relative to its
neighbours in measurement order (the drift they share, as compare does), and the run-wide level (the
median over a run's rows) is a series of its own: "everything got slower" is one change of the
run-wide level, not one per row.

The host's speed also moves between runs, every row of a run alike (20% between processes here): on the
CPU each sample is taken in units of the cache eviction timed just before it (statistics.paced, as
compare does). A series steps from one run to the next in those paced units where both runs have
eviction times, in raw ms where either has none (compare's rule: both paced or neither). Paced times are
put back in ms at the group's typical eviction time (own_times), so a series runs on across the runs that
predate eviction times.

Change points (change_points.py): ruptures' PELT (exact and deterministic; min_size = the persistence below) proposes
steps on each series, in log scale and standardised by the series' noise. It only proposes: a step is
kept when all of these hold, else it is dropped, the segments on either side merge (an outlier first,
then the smallest effect, then the weakest evidence) and the rest are judged again:
  - persistence (_persists): the step holds for PERSIST runs on each side, run by run (beyond the
    minimum effect against the other side, and nearer its own side's level than the other's), and
    still holds without the run nearest to it: a single-run outlier is never a change;
  - minimum effect between the segments' medians: time 5% (compare's default threshold), in the
    neighbour-relative times and in the row's own times; memory 5% and more than one allocator block
    (statistics.ALLOC_BLOCK: 1 MiB on the CPU, 512 B on CUDA), clearing the other side's range over its
    repeated calls (extra_mem_max_bytes, as compare); accuracy more than 2x (statistics.ACCURACY_GROWTH);
  - significance given the series' noise: the difference of the segments' medians against the series'
    run-to-run deviation (robust, from consecutive differences; at least the group's typical one;
    Student's t with the series' degrees of freedom where its own estimate decides), p < ALPHA.
Steps that coincide (one implementation, the same two runs, the same direction) are pooled into one
test (Stouffer) and one line of the table, then false-discovery control (Benjamini-Hochberg at
statistics.ALPHA) runs over the pooled tests and every series without a step. On the committed runs
(results/: 16 runs; 5 of commit cbb3bef without eviction times, 5 of 171ba03 with them), 2 of the 17 lines
are between runs of one commit, both cbb3bef's first and second run (plain medians: 3 of 20, one of them
between 171ba03's runs, which pacing removed).

Beyond pacing, the runs' raw samples (raw_ms) are not used: a pooled Mann-Whitney test of the samples on
either side of a step, and the samples' standard error of a run's median as a noise floor, were tried;
neither removed a false change on the committed runs, and both missed rows of the test's 20% slower
implementation (within a run the samples are neither independent, bursts, nor well-behaved, 3x spikes).

Why ruptures (1.1.10, pinned in constraints.txt): it needs only numpy and scipy, ships binary wheels
(its manylinux cp311 wheel runs here with numpy 2.4), is deterministic (PELT is an exact segmentation, no
permutation test to seed), and its min_size enforces the persistence rule inside the search. Its
`Requires-Python: <3.14` is the one limit it brings. The alternatives, from their package metadata:
  - signal-processing-algorithms 2.1.6 (MongoDB's E-Divisive): Python 3.11 only (<3.12), numpy<2,
    gevent, structlog, setuptools<71, and a source distribution only: it does not install beside
    numpy 2;
  - apache-otava 0.8.0 (E-Divisive, formerly Hunter): pins numpy==2.2.0.* and scipy<1.17, and pulls
    google-cloud-bigquery, pg8000, slack-sdk, requests, dateparser, ruamel-yaml: a service's
    connectors around the same algorithm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import UsageError
from . import runs
from .change_points import METRICS, NOISE_FLOOR, PERSIST, Step, block_of, find_steps, own_noise, signal
from .runs import VERSIONS, norm
from .statistics import ALPHA, local_drift, paced, paces, samples

MIN_ROWS_FOR_LEVEL = 8       # fewer timed rows in a run cannot estimate its levels (taken as 1)
RUN_WIDE = "run-wide"        # the implementation name of the run-wide level's series


def _group_label(r: pd.Series) -> str:
    """What makes runs comparable (runs.VERSIONS), as text: one label per series group."""
    parts = [f"{r['device']} {r['device_name']}", f"torch {r['torch_version']}"]
    parts += [f"{name} {norm(r[f'{name}_version'])}" for name in ("triton", "cuda") if norm(r[f"{name}_version"])]
    return ", ".join(parts + [f"{str(r['threads']).removesuffix('.0')} threads"])


def with_groups(df: pd.DataFrame) -> pd.DataFrame:
    """Adds `group` (comparability) and `pos` (the run's place in time within its group), and each run's
    commit and time."""
    df = df.copy()
    for col in VERSIONS:
        df[col] = df[col].map(norm)
    cols = ["device", *VERSIONS]
    combos = df[cols].drop_duplicates()
    combos["group"] = [_group_label(r) for _, r in combos.iterrows()]
    df = df.merge(combos, on=cols, how="left")
    started = df.groupby("run_id")["timestamp"].min().fillna("")
    df["started"] = df["run_id"].map(started)
    df["sha"] = df.groupby("run_id")["git_sha"].transform("first").fillna("?").str[:7]
    order = df[["group", "started", "run_id"]].drop_duplicates().sort_values(["group", "started", "run_id"])
    order["pos"] = order.groupby("group").cumcount()
    return df.merge(order, on=["group", "started", "run_id"])


# --- the values of each series -------------------------------------------------------------------------
def own_times(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Each ok timed row's time in ms (NaN elsewhere). Where the row has eviction times (statistics.paced,
    CPU rows), its paced median times the group's typical eviction time (the median over the group's
    paced rows): the time it would have taken at the machine's usual speed. Elsewhere its median.
    So runs that both have eviction times compare in paced units, the other runs in raw ms, as compare
    does. Anchoring a paced stretch on the ms of its first run instead carried that run's speed into
    every later one: the first paced run here was measured while evictions took 2.5x their usual time.
    Also returns which rows are paced."""
    raw = df["time_median_ms"].astype(float).where((df["status"] == "ok") & (df["time_median_ms"] > 0))
    none = pd.Series(None, index=df.index, dtype=object)
    pm, em = [], []
    for r, e, d in zip(df.get("raw_ms", none), df.get("evict_ms", none), df["device"]):
        p = paced(r, e) if paces(d) else None
        pm.append(math.nan if p is None else float(np.median(p)))
        em.append(math.nan if p is None else float(np.median(samples(e))))
    pm, em = pd.Series(pm, index=df.index).where(raw.notna()), pd.Series(em, index=df.index)
    typical = em.where(pm.notna()).groupby(df["group"]).transform("median")
    return (pm * typical).where(pm.notna(), raw), pm.notna()


def deviations(df: pd.DataFrame) -> pd.DataFrame:
    """The ok timed rows with `dev`: their log time (own_times) minus the row's median over the runs of
    its group."""
    t = df[df["time_ms"].notna()].copy()
    t["log"] = np.log(t["time_ms"])
    t["dev"] = t["log"] - t.groupby(["group", "key"])["log"].transform("median")
    return t


def run_levels(dev: pd.DataFrame) -> pd.DataFrame:
    """Per group and run, the run-wide time level (log): the median of the run's rows' deviations. A
    change every row shares (the machine, or code every row runs) moves it; one slower implementation
    barely does (its rows are a minority)."""
    g = dev.groupby(["group", "device", "run_id", "pos", "sha"])["dev"]
    levels = pd.DataFrame({"level": g.median(), "rows": g.size()}).reset_index()
    levels.loc[levels["rows"] < MIN_ROWS_FOR_LEVEL, "level"] = np.nan
    return levels


def neighbour_drift(d: np.ndarray) -> np.ndarray:
    """Per row of one run (in measurement order), the deviation its neighbours share: compare's drift (the
    median of the DRIFT_WINDOW rows before it, of those after it, or of both, whichever is closest to its
    own), over all its neighbours. A burst on the shared machine slows the rows measured in the same
    seconds, not the whole run; a slower implementation stands apart from its neighbours, the other
    implementations of the same case (runs are measured case by case)."""
    return local_drift(d, np.arange(len(d)))  # every row its own group: no neighbour is left out


def local_levels(dev: pd.DataFrame) -> pd.Series:
    """neighbour_drift of every run with enough timed rows (0 elsewhere), indexed like dev."""
    out = pd.Series(0.0, index=dev.index)
    for _, g in dev.sort_values("order").groupby(["group", "run_id"]):
        if len(g) >= MIN_ROWS_FOR_LEVEL:
            out[g.index] = neighbour_drift(g["dev"].to_numpy())
    return out


def points(df: pd.DataFrame, dev: pd.DataFrame) -> pd.DataFrame:
    """One line per (group, row key, run) of an ok row: time (relative to its neighbours' drift), memory
    and accuracy in their units."""
    ok = df[df["status"] == "ok"].copy()
    ok["time"] = ok["time_ms"] / np.exp(local_levels(dev).reindex(ok.index).fillna(0.0))
    ok["memory"] = ok["extra_mem_bytes"].astype(float).clip(lower=0)  # the smallest of the repeated calls
    ok["memory_max"] = ok["extra_mem_max_bytes"].astype(float)       # the largest (NaN in early runs)
    # fwd rows have no gradient: their loss error, always (early runs stored a gradient error of 0 for
    # them, which would read as a change when the column switched).
    grad, loss = ok["grad_row_err_max"].astype(float), ok["loss_rel_err"].astype(float)
    err = loss.where(ok["mode"] == "fwd", grad.where(grad.notna(), loss))
    ok["accuracy"] = err.fillna(math.inf)  # an error that is NaN is a finding: infinite (as compare)
    ok["case"] = ok["label"].fillna("")
    return ok


# --- every series ------------------------------------------------------------------------------------
@dataclass
class Series:
    metric: str
    ident: dict          # group, device, family, impl, mode, case
    pos: np.ndarray      # the runs' places in the group
    run_ids: list
    shas: list
    values: np.ndarray
    block: float
    upper: np.ndarray | None = None   # memory: the largest of each run's repeated calls
    raw: np.ndarray | None = None     # time: the row's own times (own_times)
    paced: np.ndarray | None = None   # time: which runs' times are paced
    noise: float = math.nan
    noise_df: float = math.inf        # the noise estimate's degrees of freedom


def all_series(pts: pd.DataFrame, levels: pd.DataFrame) -> list[Series]:
    """Per group: a series per row key and metric (the runs where the row was ok and measured it), and
    the run-wide time level."""
    out = []
    for (group, _key), g in pts.sort_values("pos").groupby(["group", "key"], sort=False):
        first = g.iloc[0]
        ident = {"group": group, "device": first["device"], "family": first["family"], "impl": first["impl"],
                 "mode": first["mode"], "case": first["case"]}
        for metric in METRICS:
            v = g[g[metric].notna()]
            if len(v):
                out.append(Series(metric, ident, v["pos"].to_numpy(), list(v["run_id"]), list(v["sha"]),
                                  v[metric].to_numpy(float), block_of(first["device"], metric),
                                  v["memory_max"].to_numpy(float) if metric == "memory" else None,
                                  v["time_ms"].to_numpy(float) if metric == "time" else None,
                                  v["paced"].to_numpy(bool) if metric == "time" else None))
    for group, g in levels.dropna(subset=["level"]).sort_values("pos").groupby("group"):
        ident = {"group": group, "device": g["device"].iloc[0], "family": "all", "impl": RUN_WIDE, "mode": "all",
                 "case": "every row of the run"}
        out.append(Series("time", ident, g["pos"].to_numpy(), list(g["run_id"]), list(g["sha"]),
                          np.exp(g["level"].to_numpy(float)), 0.0))
    return out


def _set_noise(series: list[Series]) -> None:
    """Each series is judged against its own run-to-run noise, or the group's typical one where that is
    larger (a few runs estimate their own only roughly). Where its own estimate decides, the test is
    Student's t with the series' degrees of freedom: a few runs' spread says little about the next
    excursion."""
    own = pd.DataFrame({"metric": [s.metric for s in series], "group": [s.ident["group"] for s in series],
                        "own": [_series_noise(s) for s in series]})
    typical = own.groupby(["metric", "group"])["own"].transform("median")
    for s, o, t in zip(series, own["own"], typical):
        o, others = np.nan_to_num(o), max(np.nan_to_num(t), NOISE_FLOOR)
        s.noise = max(o, others)
        s.noise_df = max(len(s.values) - 2, 1) if o > others else math.inf


def _series_noise(s: Series) -> float:
    """own_noise of the series; where some of its runs are paced and others not, of the noisier part. Paced
    times vary less from run to run: measured over the whole series, their smaller differences would make
    the older, raw runs' differences look like steps (four more between runs of one commit here)."""
    sig = signal(s.values, s.metric, s.block)
    if s.paced is None or s.paced.all() or not s.paced.any():
        return own_noise(sig)
    parts = [own_noise(sig[s.paced]), own_noise(sig[~s.paced])]
    return math.nan if all(math.isnan(x) for x in parts) else float(np.nanmax(parts))


# Steps that coincide: the same metric, group, implementation, runs on either side and direction. A
# commit that slows an implementation moves all its rows at once: they are one line of the table, and
# are tested together.
LINE = ["metric", "direction", "group", "device", "family", "impl", "before_run", "before_sha", "after_run",
        "after_sha"]


def changes(series: list[Series], persist: int = PERSIST, pool: bool = True) -> pd.DataFrame:
    """Every reported step, one line per series and step. Each series' candidate steps (persistent, beyond
    the minimum effect, p < ALPHA on their own) that coincide are pooled into one test (Stouffer's
    combination of their p-values: twelve rows of one implementation 20% slower are strong evidence even
    where each row alone, with three runs before the step, is not), then false-discovery control runs
    over the pooled tests of the metric and every series without a candidate (a test with p = 1).
    pool=False tests each series' step alone (for tests)."""
    _set_noise(series)
    found, quiet = [], {m: 0 for m in METRICS}
    for s in series:
        steps = find_steps(s.values, s.metric, s.noise, persist, s.block, s.upper, s.raw, s.noise_df, s.shas)
        found += [_change_row(s, st) for st in steps]
        quiet[s.metric] += not steps
    ch = pd.DataFrame(found, columns=CHANGE_COLUMNS + ["p"])
    if ch.empty:
        return ch.drop(columns="p")
    keys = LINE if pool else LINE + ["mode", "case"]
    tests = ch.groupby(keys, sort=False)["p"].apply(_pooled).rename("pooled").reset_index()
    tests["q"] = np.nan
    for metric, t in tests.groupby("metric"):
        p = np.concatenate([t["pooled"].to_numpy(), np.ones(quiet[metric])])
        tests.loc[t.index, "q"] = stats.false_discovery_control(p, method="bh")[: len(t)]
    ch = ch.drop(columns="q").merge(tests[keys + ["q"]], on=keys)
    return ch[ch["q"] < ALPHA][CHANGE_COLUMNS].reset_index(drop=True)


def _pooled(p: pd.Series) -> float:
    return float(p.iloc[0]) if len(p) == 1 else float(stats.combine_pvalues(p, method="stouffer").pvalue)


CHANGE_COLUMNS = ["metric", "direction", "group", "device", "family", "impl", "mode", "case", "ratio", "q",
                  "before_run", "before_sha", "before_pos", "after_run", "after_sha", "after_pos"]


def _change_row(s: Series, st: Step) -> dict:
    i = st.at
    return {"metric": s.metric, "direction": "regressed" if st.ratio > 1 else "improved", **s.ident,
            "ratio": st.ratio, "q": math.nan, "p": st.p,
            "before_run": s.run_ids[i - 1], "before_sha": s.shas[i - 1], "before_pos": int(s.pos[i - 1]),
            "after_run": s.run_ids[i], "after_sha": s.shas[i], "after_pos": int(s.pos[i])}


# --- the analysis ---------------------------------------------------------------------------------------------
def _select(pts: pd.DataFrame, families: list[str] | None, impls: list[str] | None) -> pd.DataFrame:
    for flag, col, names in (("--family", "family", families), ("--impl", "impl", impls)):
        unknown = sorted(set(names or ()) - set(pts[col]))
        if unknown:
            raise UsageError(f"{flag} {','.join(unknown)}: no run measured it (the runs have "
                             f"{', '.join(sorted(set(pts[col])))})")
        if names:
            pts = pts[pts[col].isin(names)]
    return pts


@dataclass
class History:
    runs: pd.DataFrame       # every row of every run, with group, pos, sha
    levels: pd.DataFrame     # the run-wide time level per group and run
    points: pd.DataFrame     # the selected ok rows with their metrics
    changes: pd.DataFrame    # one line per series and step (CHANGE_COLUMNS)


def analyse(results_dir: str | Path, families: list[str] | None = None, impls: list[str] | None = None,
            persist: int = PERSIST, pool: bool = True) -> History:
    df = with_groups(runs.load_all(results_dir))
    df["time_ms"], df["paced"] = own_times(df)
    dev = deviations(df)  # from every row, whatever the selection: a row's neighbours are the run's
    levels = run_levels(dev)
    pts = _select(points(df, dev), families, impls)
    ch = changes(all_series(pts, levels), persist, pool)
    return History(df, levels, pts, ch)
