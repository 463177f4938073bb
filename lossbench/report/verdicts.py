"""A comparison's verdicts, and the per-row ones that need no statistics: status, memory, accuracy, rows in one
run only. compare (stored runs) and ab (paired samples) judge time each their own way and share these."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from .. import exit_codes
from ..run import FAILED
from .runs import Run, keyed
from .statistics import ACCURACY_GROWTH, alloc_block, missing

VERDICTS = ("regressed", "missing", "inconclusive", "improved", "added", "unchanged")  # by severity


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
        return exit_codes.REGRESSION if self.regressed() else exit_codes.OK


def by_severity(out: list[dict], timed: pd.DataFrame) -> pd.DataFrame:
    """The row verdicts and the time verdicts in one frame, the most severe first."""
    v = pd.concat([pd.DataFrame(out), timed], ignore_index=True)
    v["_rank"] = v["verdict"].map(VERDICTS.index)
    v = v.sort_values(["_rank", "severity"], ascending=[True, False], kind="stable")
    return v.drop(columns="_rank").reset_index(drop=True)


def _ident(r: pd.Series, suffix: str = "") -> dict:
    g = lambda c: r.get(c + suffix, r.get(c))  # noqa: E731
    return {"device": g("device"), "family": g("family"), "impl": g("impl"), "case": g("label"),
            "dtype": g("dtype"), "mode": g("mode")}


def verdict(r, metric, verdict, base=None, head=None, change=None, low=None, high=None, p=None, q=None,
            note="", severity=0.0, suffix="_h") -> dict:
    """One line of the verdicts: the row's identity (from r, a merged row: the head's columns) and its finding."""
    return {**_ident(r, suffix), "metric": metric, "verdict": verdict, "base": base, "head": head,
            "change": change, "ci_low": low, "ci_high": high, "p": p, "q": q, "severity": severity, "note": note}


def one_sided(r: pd.Series, v: str) -> dict:
    return verdict(r, "row", v, note=f"status {r['status']} in one run only", suffix="")


def status_verdict(r: pd.Series) -> list[dict]:
    sb, sh = r["status_b"], r["status_h"]
    if sb == sh:
        return []
    if sb == "ok" and sh != "ok":
        v, note = "regressed", f"{sh}: {r.get('error_h') or ''}".strip().rstrip(":")
    elif sh == "ok" or sb in FAILED:
        v, note = "improved", f"was {sb}"
    else:
        v, note = "regressed" if sh in FAILED else "inconclusive", f"was {sb}"
    return [verdict(r, "status", v, sb, sh, note=note, severity=math.inf if v == "regressed" else 0)]


def row_history_memory(runs: list[Run]) -> dict[str, float]:
    """Per row key, the largest extra memory any of the earlier runs saw (over their repeated calls)."""
    seen: dict[str, float] = {}
    for r in runs:
        ok = keyed(r.rows)
        ok = ok[ok["status"] == "ok"]
        for key, lo, hi in zip(ok.index, ok["extra_mem_bytes"], ok.get("extra_mem_max_bytes", ok["extra_mem_bytes"])):
            v = lo if missing(hi) else hi
            if not missing(v):
                seen[key] = max(seen.get(key, 0.0), float(v))
    return seen


def memory_verdict(r: pd.Series, threshold: float, seen_max: float | None = None) -> list[dict]:
    """On ranges: each row holds the smallest and largest extra over its repeated calls (the CPU
    peak of one call varies by whole tensors, runners/memory.py), so a change must clear the other
    run's whole range; where the peak is deterministic the range is one value. Between processes the
    CPU peak varies too (eager bf16 KL: 12.3 MB in one run, 20.5 MB in the next, at the smallest of five
    calls each): the range also takes in what earlier runs of the row saw (`seen_max`)."""
    mb, mh = r["extra_mem_bytes_b"], r["extra_mem_bytes_h"]
    if missing(mb) or missing(mh):
        return []
    mb_max = mb if missing(r.get("extra_mem_max_bytes_b")) else r["extra_mem_max_bytes_b"]
    mb_max = max(mb_max, seen_max or 0.0)
    mh_max = mh if missing(r.get("extra_mem_max_bytes_h")) else r["extra_mem_max_bytes_h"]
    block = alloc_block(r["device_h"])
    if mh - mb_max > threshold * mb_max and mh - mb_max > block:
        v = "regressed"
    elif mb - mh_max > threshold * mh_max and mb - mh_max > block:
        v = "improved"
    else:
        v = "unchanged"
    change = mh / mb if mb else (math.inf if mh else 1.0)
    return [verdict(r, "memory", v, float(mb), float(mh), change, severity=math.log(max(change, 1e-300)))]


def accuracy_verdict(r: pd.Series) -> list[dict]:
    # Seeded inputs: the same code gives the same errors, so no test is needed. asv's rows carry only
    # err_vs_floor (grad_row_err_max over a floor fixed by the case: the same ratio between two runs) and
    # no accuracy_ok, which then counts as unchanged.
    col = next((c for c in ("grad_row_err_max", "err_vs_floor") if not missing(r[f"{c}_b"])), "loss_rel_err")
    if col == "err_vs_floor" and missing(r["err_vs_floor_h"]):
        return []  # the head did not measure it
    eb, eh = _err(r[f"{col}_b"]), _err(r[f"{col}_h"])
    known = not (missing(r["accuracy_ok_b"]) or missing(r["accuracy_ok_h"]))
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
    return [verdict(r, "accuracy", v, eb, eh, change, note=note, severity=sev)]


def _err(v) -> float:
    return math.inf if missing(v) else float(v)


def row_verdicts(b: pd.DataFrame, h: pd.DataFrame, both: pd.DataFrame, threshold: float,
                 mem_seen: dict[str, float] | None = None) -> list[dict]:
    """Every verdict but time's: rows in one run only, status, and (ok in both) memory and accuracy.
    b, h: the runs' keyed rows; both: them merged (suffixes _b, _h)."""
    out = [one_sided(r, "missing") for _, r in b.loc[b.index.difference(h.index)].iterrows()]
    out += [one_sided(r, "added") for _, r in h.loc[h.index.difference(b.index)].iterrows()]
    for key, r in both.iterrows():
        out += status_verdict(r)
        if r["status_b"] == "ok" and r["status_h"] == "ok":
            out += memory_verdict(r, threshold, (mem_seen or {}).get(key)) + accuracy_verdict(r)
    return out
