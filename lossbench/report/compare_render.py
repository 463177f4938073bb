"""`lossbench compare`'s output: the verdicts as a terminal table, Markdown and JSON (also nightly's, ab's
and the comparison report's). What is judged is compare.py's; how it reads is here."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from .statistics import ALPHA, missing
from .verdicts import Comparison


def _fmt_value(metric: str, v) -> str:
    if missing(v):
        return "-"
    if metric == "time":
        return f"{v:.3g} ms"
    if metric == "memory":
        from .table import fmt_bytes
        return fmt_bytes(v)
    if metric == "accuracy":
        return f"{v:.2g}"
    return str(v)


def _fmt_change(row) -> str:
    c = row["change"]
    if missing(c):
        return ""
    text = "inf" if math.isinf(c) else f"x{c:.3g}"
    if not missing(row.get("ci_low")):
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
        "q": ["" if missing(q) else f"{q:.2g}" for q in v["q"]],
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
