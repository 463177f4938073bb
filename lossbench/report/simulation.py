"""How often `lossbench compare` cries wolf, and how often it catches a slowdown, on real runs.

    python -m lossbench.report.simulation RUN RUN RUN RUN RUN [...] [--resamples K] [--slowdown 1.10]

RUN: run ids under --results, or run files, of the same suite and the same code on one machine
(at least five): their differences are the machine's real within-run and between-run noise.

For every pair of runs (base, head), K times: every row's samples are resampled with replacement
(within-run noise on top of the real between-run noise), then
- unchanged: the pair is compared as it is. Any `regressed` time verdict is a false alarm;
- injected (--scope implementation, the default): one implementation, drawn at random, has every head
  sample of every row multiplied by the slowdown (a kernel commit slows one implementation, on all its
  cases). Its rows' `regressed` verdicts are detections;
- injected (--scope row): one row, drawn at random, is slowed alone (a change to one code path).
Prints the false-alarm rate per row, the share of comparisons with any false alarm, and the
detection rate, at compare's default threshold (or --threshold).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import numpy as np
import pandas as pd

from .. import exit_codes
from ..errors import UsageError
from . import compare
from .runs import Run, incompatibility, load_run
from .verdicts import Comparison

MIN_RUNS = 5


def _resampled(run: Run, rng: np.random.Generator) -> Run:
    """Every row's samples drawn with replacement; a sample keeps its eviction time (evict_ms)."""
    rows = run.rows.copy()
    raw, evict = [], []
    has_evict = "evict_ms" in rows
    for i, samples in enumerate(rows["raw_ms"]):
        a = np.asarray(samples if isinstance(samples, list) else [], dtype=float)
        e = rows["evict_ms"].iloc[i] if has_evict else None
        e = np.asarray(e, dtype=float) if isinstance(e, list) and len(e) == len(a) else None
        pick = rng.integers(0, len(a), size=len(a)) if len(a) else np.zeros(0, dtype=int)
        raw.append(a[pick].tolist())
        evict.append(e[pick].tolist() if e is not None else None)
    rows["raw_ms"] = raw
    if has_evict:
        rows["evict_ms"] = evict
    rows["time_median_ms"] = [float(np.median(a)) if len(a) else None for a in raw]
    return Run(run.name, run.run_id, rows)


IDENT = ["device", "family", "impl", "case", "dtype", "mode"]  # a time verdict's row, as compare names it


def simulate(runs: list[Run], *, resamples: int = 2, slowdown: float = 1.10, threshold: float = 0.05,
             seed: int = 0, scope: str = "implementation", progress=None) -> dict:
    rng = np.random.default_rng(seed)
    pairs = list(itertools.permutations(range(len(runs)), 2))
    alarms_rows = alarms_cmp = n_rows = n_cmp = 0
    detected = injected_rows = 0
    verdict_counts: dict[str, int] = {}
    for k, (i, j) in enumerate(pairs):
        for _ in range(resamples):
            base = _resampled(runs[i], rng)
            ok = runs[j].rows[runs[j].rows["status"] == "ok"]
            if scope == "implementation":
                impl = str(rng.choice(sorted(ok["impl"].unique())))
                mask = runs[j].rows["impl"] == impl
            else:
                mask = runs[j].rows.index == rng.choice(ok.index)
            head = _resampled(runs[j], rng)
            # The rows' own run-to-run variation from the runs outside the pair, as `compare` takes it
            # from the results folder's earlier runs.
            history = [runs[k] for k in range(len(runs)) if k not in (i, j)] + [runs[i]]
            t = _time(compare.compare(base, head, threshold, history=history))
            n_rows += len(t)
            n_cmp += 1
            bad = int((t["verdict"] == "regressed").sum())
            alarms_rows += bad
            alarms_cmp += bad > 0
            for v, c in t["verdict"].value_counts().items():
                verdict_counts[v] = verdict_counts.get(v, 0) + int(c)
            slowed = _slowed(head, mask, slowdown)
            t = _time(compare.compare(base, slowed, threshold, history=history))
            hit = head.rows.loc[mask].rename(columns={"label": "case"})[IDENT].astype(str).agg("|".join, axis=1)
            mine = t[t[IDENT].astype(str).agg("|".join, axis=1).isin(set(hit))]
            injected_rows += len(mine)
            detected += int((mine["verdict"] == "regressed").sum())
        if progress:
            progress(k + 1, len(pairs))
    return {
        "runs": [r.run_id for r in runs], "pairs": len(pairs), "resamples": resamples, "threshold_pct": threshold * 100,
        "slowdown": slowdown, "scope": scope, "comparisons": n_cmp, "time_rows_compared": n_rows,
        "false_alarm_rows_pct": 100 * alarms_rows / max(n_rows, 1),
        "comparisons_with_a_false_alarm_pct": 100 * alarms_cmp / max(n_cmp, 1),
        "unchanged_verdicts_pct": {v: 100 * c / max(n_rows, 1) for v, c in sorted(verdict_counts.items())},
        "injected_rows": injected_rows, "detected_pct": 100 * detected / max(injected_rows, 1),
    }


def _time(cmp: Comparison) -> pd.DataFrame:
    v = cmp.verdicts
    return v[v["metric"] == "time"]


def _slowed(run: Run, mask: pd.Series, factor: float) -> Run:
    """The rows under mask with every timed sample multiplied by factor (their evictions unchanged: a
    slower kernel does not slow the machine)."""
    rows = run.rows.copy()
    mine = np.asarray(mask, dtype=bool)
    rows.loc[mine, "raw_ms"] = pd.Series([[x * factor for x in a] for a in rows.loc[mine, "raw_ms"]],
                                         index=rows.index[mine], dtype=object)
    rows.loc[mine, "time_median_ms"] = rows.loc[mine, "time_median_ms"] * factor
    return Run(run.name, run.run_id, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lossbench.report.simulation", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--results", default="results")
    p.add_argument("--resamples", type=int, default=2)
    p.add_argument("--slowdown", type=float, default=1.10)
    p.add_argument("--threshold", type=float, default=5.0, metavar="PCT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scope", choices=("implementation", "row"), default="implementation",
                   help="slow one implementation on all its rows (a kernel commit), or one row alone")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    try:
        if len(args.runs) < MIN_RUNS:
            raise UsageError(f"need at least {MIN_RUNS} runs of unchanged code, got {len(args.runs)}")
        runs = [load_run(r, args.results) for r in args.runs]
        for r in runs[1:]:
            diff = incompatibility(runs[0], r)
            if diff:
                raise UsageError(f"runs are not comparable: {diff}")
        out = simulate(runs, resamples=args.resamples, slowdown=args.slowdown,
                       threshold=compare.threshold_from_pct(args.threshold), seed=args.seed, scope=args.scope,
                       progress=lambda k, n: print(f"pair {k}/{n}", file=sys.stderr))
    except UsageError as exc:
        print(f"simulation: error: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
