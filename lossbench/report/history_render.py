"""`lossbench history`'s output: the table of changes on the terminal, and the report (the table, the run-wide
level and each family's trends as plots: page.write_report). What counts as a change is history.py's."""
from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from ..errors import UsageError
from .. import exit_codes
from .change_points import MEMORY_EFFECT, METRICS, PERSIST, TIME_EFFECT, block_of
from .history import LINE, RUN_WIDE, analyse
from .page import Section, write_report
from .statistics import ACCURACY_GROWTH, ALPHA


# --- the table of changes ----------------------------------------------------------------------------------
def change_table(ch: pd.DataFrame) -> pd.DataFrame:
    """The changes with coinciding steps (LINE) as one line each."""
    if ch.empty:
        return pd.DataFrame(columns=["metric", "change", "device", "family", "impl", "series", "ratio",
                                     "last run before", "first run after", "q"])
    lines = []
    for k, g in ch.groupby(LINE, sort=False):
        r = dict(zip(LINE, k))
        lo, mid, hi = g["ratio"].min(), g["ratio"].median(), g["ratio"].max()
        lines.append({
            "metric": r["metric"], "change": r["direction"], "device": r["group"], "family": r["family"],
            "impl": r["impl"],
            "series": "every row of the runs" if r["impl"] == RUN_WIDE else
                      f"{len(g)}: {g['case'].nunique()} cases x {', '.join(sorted(g['mode'].unique()))}",
            "ratio": _fmt_ratio(mid) + (f" ({_fmt_ratio(lo)}-{_fmt_ratio(hi)})" if len(g) > 1 else ""),
            "last run before": f"{r['before_run']} ({r['before_sha']})",
            "first run after": f"{r['after_run']} ({r['after_sha']})",
            "q": _fmt_q(g["q"].max()), "_order": (list(METRICS).index(r["metric"]), r["direction"] != "regressed",
                                                   -abs(math.log(max(mid, 1e-300)))),
        })
    return pd.DataFrame(lines).sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def _fmt_q(q: float) -> str:
    return "<0.0001" if q < 1e-4 else f"{q:.2g}"


def _fmt_ratio(x: float) -> str:
    return "inf" if math.isinf(x) else f"x{x:.3g}"


def terminal_table(table: pd.DataFrame, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in table.columns:
        t.add_column(col, overflow="fold")
    for _, r in table.iterrows():
        style = "bold red" if r["change"] == "regressed" else "green"
        t.add_row(*[f"[{style}]{r[c]}[/]" if c == "change" else str(r[c]) for c in table.columns])
    return t


# --- plots -------------------------------------------------------------------------------------------------
def _pyplot():
    """seaborn and pyplot with the Agg backend (set before pyplot is imported: no display on CI)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import seaborn as sns
    except ImportError as exc:
        raise UsageError(f"lossbench history draws with seaborn and matplotlib: pip install -e '.[plots]' ({exc})") \
            from None
    return plt, sns


def _ticks(pts: pd.DataFrame) -> tuple[list[int], list[str]]:
    runs = pts[["pos", "run_id", "sha"]].drop_duplicates("pos").sort_values("pos")
    return list(runs["pos"]), [f"{s} {r}" for r, s in zip(runs["run_id"], runs["sha"])]


def _plot_values(pts: pd.DataFrame, metric: str) -> pd.Series:
    """What the plot shows: time and memory relative to the row's median over the runs (cases differ by
    orders of magnitude), errors as they are (log axis)."""
    if metric == "accuracy":
        return pts["accuracy"].clip(lower=1e-12, upper=1e3)
    raw = pts["time_ms"] if metric == "time" else pts["memory"]
    floor = pts["device"].map(lambda d: block_of(d, "memory")) if metric == "memory" else 0.0
    med = raw.groupby([pts["group"], pts["key"]]).transform("median")
    return (raw + floor) / (med + floor)


def _mark_changes(ax, ch: pd.DataFrame) -> None:
    for _, c in ch.drop_duplicates(["after_pos", "direction"]).iterrows():
        ax.axvline(c["after_pos"] - 0.5, color="tab:red" if c["direction"] == "regressed" else "tab:green",
                   linestyle="--", linewidth=1.5)


def family_figure(pts: pd.DataFrame, metric: str, ch: pd.DataFrame, levels: pd.DataFrame):
    """One family on one group: a panel per implementation, a line per case (colour) and mode (dashes),
    the steps as vertical lines (red: regressed, green: improved) between the last run before and the
    first after. Panels drawn one by one (not relplot, whose layout passes cost seconds per figure)."""
    plt, sns = _pyplot()
    data = pts.assign(y=_plot_values(pts, metric))
    impls = sorted(data["impl"].unique())
    ncols = min(3, len(impls))
    nrows = math.ceil(len(impls) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 4.2 * nrows), squeeze=False,
                             sharey=metric != "accuracy", layout="constrained")
    palette = dict(zip(sorted(data["case"].unique()), sns.color_palette("husl", data["case"].nunique())))
    pos, labels = _ticks(data)
    for ax, impl in zip(axes.flat, impls):
        sns.lineplot(data=data[data["impl"] == impl], x="pos", y="y", hue="case", style="mode", palette=palette,
                     units="key", estimator=None, marker="o", ax=ax, legend=impl == impls[0])
        _mark_changes(ax, ch[ch["impl"] == impl])
        if metric == "time":  # the run-wide level each row is judged against
            ax.plot(levels["pos"], np.exp(levels["level"]), color="black", linewidth=2, alpha=0.4)
        ax.set(title=impl, xlabel="", ylabel=METRICS[metric].axis, yscale="log")  # ratios: up and down alike
        ax.set_xticks(pos, labels, rotation=90, fontsize=6)
    for ax in axes.flat[len(impls):]:
        ax.set_visible(False)
    legend = axes.flat[0].get_legend()
    if legend:  # one legend for all panels, under them
        handles, names = axes.flat[0].get_legend_handles_labels()
        legend.remove()
        fig.legend(handles, names, loc="outside lower center", ncol=3, fontsize=7, frameon=False)
    return fig


def level_figure(levels: pd.DataFrame, ch: pd.DataFrame):
    plt, sns = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.5))
    sns.lineplot(x=levels["pos"], y=np.exp(levels["level"]), marker="o", ax=ax, color="black")
    _mark_changes(ax, ch)
    pos, labels = _ticks(levels)
    ax.set_xticks(pos, labels, rotation=90, fontsize=7)
    ax.set_xlabel("run (commit, run id), oldest first")
    ax.set(ylabel="run-wide time level", yscale="log")
    return fig


def sections(pts: pd.DataFrame, levels: pd.DataFrame, ch: pd.DataFrame) -> list[Section]:
    out = []
    for group, gl in levels.dropna(subset=["level"]).groupby("group"):
        out.append(Section(f"Run-wide time level: {group}",
                           "The median over each run's rows of their time relative to their own median over "
                           "the runs: a burst that slows a whole run, or a change every row shares. Each row's "
                           "time trend below is judged relative to it.",
                           level_figure(gl, ch[(ch["group"] == group) & (ch["impl"] == RUN_WIDE)])))
    for (group, family), g in pts.groupby(["group", "family"]):
        for metric in METRICS:
            data = g[g[metric].notna()]
            if data.empty:
                continue
            c = ch[(ch["group"] == group) & (ch["family"] == family) & (ch["metric"] == metric)]
            out.append(Section(f"{metric.capitalize()}: {family} on {group}", _FIGURE_TEXT[metric],
                               family_figure(data, metric, c, levels[levels["group"] == group])))
    return out


_FIGURE_TEXT = {
    "time": "Median time of each case and mode, relative to its own median over the runs; the grey line is the "
            "run-wide level. Dashed lines: reported steps (red slower, green faster).",
    "memory": "Peak extra memory of each case and mode, relative to its own median over the runs (plus one "
              "allocator block, so an empty row stays finite). Dashed lines: reported steps.",
    "accuracy": "Worst-row gradient error (loss error for forward-only rows) against the float64 reference, log "
                "scale. Dashed lines: reported steps.",
}



# --- the command ----------------------------------------------------------------------------------------------
def _rules_text() -> str:
    return (f"A step is reported when it holds for at least {PERSIST} runs on each side (run by run), is "
            f"beyond the minimum effect (time {100 * (TIME_EFFECT - 1):g}%; memory {100 * (MEMORY_EFFECT - 1):g}% "
            f"and one allocator block; accuracy {ACCURACY_GROWTH:g}x) and is significant given the series' "
            f"run-to-run noise (false-discovery rate {ALPHA:g} over all series of the metric). Steps of one "
            "implementation between the same two runs are one line; 'series' counts them.")



def history(results_dir: str | Path, families: list[str] | None = None, impls: list[str] | None = None,
            out_dir: str | Path = "reports/history", console: Console | None = None) -> int:
    """`lossbench history`: the change table on the console, the trends and the table as a report."""
    console = console or Console()
    h = analyse(results_dir, families, impls)
    table = change_table(h.changes)
    n_runs, groups = h.runs["run_id"].nunique(), sorted(h.runs["group"].unique())
    title = (f"lossbench history: {n_runs} runs in {len(groups)} comparable group{'s' * (len(groups) > 1)}; "
             f"{len(table)} change{'s' * (len(table) != 1)}")
    # One group (the usual case): named once below, so the table fits a terminal without folding run ids.
    shown = table.drop(columns="device") if len(groups) == 1 else table
    console.print(terminal_table(shown, title) if len(table) else title)
    if len(groups) == 1:
        console.print(f"group: {groups[0]}")
    header = {"results": str(results_dir), "runs": str(n_runs), "groups": "; ".join(groups),
              "period": f"{h.runs['started'].min()} to {h.runs['started'].max()}",
              "selection": f"family {','.join(families or ['all'])}, impl {','.join(impls or ['all'])}",
              "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    files = write_report(out_dir, "history", "lossbench history", header,
                         [Section("Changes", _rules_text(), table=table), *sections(h.points, h.levels, h.changes)])
    console.print(f"report: {files.html} and {files.markdown} ({len(files.pngs)} plots)")
    return exit_codes.OK
