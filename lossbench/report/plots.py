"""The report's plots, one Section each (figure + the numbers behind it), from one run's rows.

Every plot uses each family's headline mode (fwd_bwd where measured, as the terminal tables do) and
only rows with status ok; failed and unsupported rows are listed by run_report, not plotted.
"""
from __future__ import annotations

import functools
import math
import textwrap

import matplotlib

matplotlib.use("Agg")  # before pyplot: a report is written on CI machines with no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator  # noqa: E402

from ..families import FAMILIES  # noqa: E402
from ..registry import BASELINE  # noqa: E402
from ..runners.accuracy import BUDGETS  # noqa: E402
from .page import Section  # noqa: E402
from .table import HEADLINE_MODES  # noqa: E402

MAX_SAMPLE_PANELS = 24  # raw-sample panels in a comparison; beyond that the page becomes a wall


def _styled(style: str = "whitegrid"):
    """A seaborn style for one plot, not set globally: importing this module restyles no one else's plots."""
    def decorate(build):
        @functools.wraps(build)
        def wrapper(*args, **kwargs):
            with sns.axes_style(style):
                return build(*args, **kwargs)
        return wrapper
    return decorate


def _plain_log_axes(g, xs) -> None:
    """Log axes labelled in plain numbers: ticks at the class counts measured, and 1-2-5 steps on y
    (matplotlib's default 4x10^0 labels are hard to read, and slow to typeset)."""
    xs = sorted(set(xs))
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in g.axes.flat:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_locator(NullLocator())
    if len(xs) == 1:  # one class count: a little room either side of it
        g.set(xlim=(xs[0] / 1.5, xs[0] * 1.5))
    else:
        g.set(xlim=(xs[0] / 1.3, xs[-1] * 1.3))


def _num(x, digits: int = 2) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{_sig(x, digits):g}"


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """The ok rows of each family's headline mode (fwd_bwd, else fwd, else bwd)."""
    parts = []
    for _, fam in df.groupby("family", sort=False):
        mode = next((m for m in HEADLINE_MODES if m in set(fam["mode"])), None)
        if mode is not None:
            parts.append(fam[(fam["mode"] == mode) & (fam["status"] == "ok")])
    return pd.concat(parts, ignore_index=True) if parts else df.iloc[:0]


def modes_text(rows: pd.DataFrame) -> str:
    modes = rows.groupby("family", sort=False)["mode"].first()
    if modes.nunique() == 1:
        return f"mode {modes.iloc[0]}"
    return "modes " + ", ".join(f"{f} {m}" for f, m in modes.items())


def _x_label(rows: pd.DataFrame) -> str:
    """The x axis (a case's last size) as each plotted family names it (Family.axis_label)."""
    names = {}
    for fam in rows["family"].unique():
        label = FAMILIES[fam].axis_label if fam in FAMILIES else "last size"
        names.setdefault(label, []).append(str(fam))
    if len(names) == 1:
        return next(iter(names))
    return " / ".join(f"{label} ({', '.join(fams)})" for label, fams in names.items())


def _panel(df: pd.DataFrame) -> pd.Series:
    # one facet column per device and dtype: their numbers are not comparable with each other
    return df["device"].astype(str) + " · " + df["dtype"].astype(str)


def _sig(x, digits: int = 3):
    return x if x is None or not np.isfinite(x) or x == 0 else round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


# --- 1. speedup -----------------------------------------------------------------------------------
def speedups(rows: pd.DataFrame) -> pd.DataFrame:
    """Per ok row, torch_functional's median time over the row's, on the same case and mode."""
    key = ["device", "family", "mode", "label"]
    base = rows[rows["impl"] == BASELINE][key + ["time_median_ms"]].rename(columns={"time_median_ms": "base_ms"})
    out = rows[rows["impl"] != BASELINE].merge(base, on=key)
    out["speedup"] = out["base_ms"] / out["time_median_ms"]
    return out[out["speedup"].notna() & np.isfinite(out["speedup"])]


@_styled()
def speedup_section(df: pd.DataFrame) -> Section:
    rows = headline(df)
    sp = speedups(rows)
    title = f"Speedup over {BASELINE}"
    if sp.empty:
        return Section(title, text=f"No implementation besides {BASELINE} has an ok row next to an ok "
                                   f"{BASELINE} row: nothing to compare.")
    sp = sp.assign(panel=_panel(sp))
    g = sns.relplot(data=sp, x="c", y="speedup", hue="impl", row="family", col="panel", kind="line",
                    estimator="median", errorbar=("pi", 100), err_style="bars", marker="o",
                    height=2.6, aspect=1.3, facet_kws={"margin_titles": True})
    _plain_log_axes(g, sp["c"])
    for ax in g.axes.flat:
        ax.axhline(1.0, color="0.3", ls="--", lw=1)
    g.set_axis_labels(_x_label(sp), f"speedup over {BASELINE}")
    g.set_titles(row_template="{row_name}", col_template="{col_name}")
    table = (sp.groupby(["family", "device", "dtype", "mode", "c", "impl"], sort=False)["speedup"]
             .agg(cases="size", median="median", min="min", max="max").reset_index())
    for col in ("median", "min", "max"):
        table[col] = table[col].map(_sig)
    return Section(title, figure=g.figure, table=table, text=(
        f"{modes_text(rows)}. Each point is the median over the cases at that class count (shapes, input "
        f"distributions, options); the bar spans their range. Above the dashed line is faster than "
        f"{BASELINE}, whose rows are the reference and not drawn."))


# --- 2. memory ------------------------------------------------------------------------------------
@_styled()
def time_section(df: pd.DataFrame) -> Section:
    """The measured times themselves, with their 95% CI: the speedup plot's ratios hide how long a step
    takes and how sure the median is (a `~` row's interval is wide: its timing did not converge)."""
    rows = headline(df)
    rows = rows[rows["time_median_ms"].notna()]
    title = "Time per case, with the 95% confidence interval of the median"
    if rows.empty:
        return Section(title, text="No timed ok row.")
    rows = rows.assign(panel=_panel(rows), case=rows["label"].astype(str).str.slice(0, 48))
    cases = rows.groupby(["family", "panel"])["case"].nunique()
    fig_h = 0.22 * float(cases.groupby(level=0).max().sum()) * len(rows["impl"].unique()) ** 0.5 + 1.5
    fams, panels = list(rows["family"].unique()), sorted(rows["panel"].unique())
    fig, axes = plt.subplots(len(fams), len(panels), figsize=(6.5 * len(panels), max(fig_h, 3.0)),
                             squeeze=False, sharex=True,
                             height_ratios=[max(1, cases[f].max()) for f in fams])
    impls = list(rows["impl"].unique())
    colors = dict(zip(impls, sns.color_palette(n_colors=len(impls))))
    for i, fam in enumerate(fams):
        for j, panel in enumerate(panels):
            ax, sub = axes[i][j], rows[(rows["family"] == fam) & (rows["panel"] == panel)]
            labels = list(dict.fromkeys(sub["case"]))
            for k, impl in enumerate(impls):
                r = sub[sub["impl"] == impl]
                y = np.array([labels.index(c) for c in r["case"]]) + (k - (len(impls) - 1) / 2) * 0.8 / len(impls)
                lo = (r["time_median_ms"] - r["time_ci_low_ms"]).clip(lower=0).to_numpy(float)
                hi = (r["time_ci_high_ms"] - r["time_median_ms"]).clip(lower=0).to_numpy(float)
                ax.errorbar(r["time_median_ms"], y, xerr=[np.nan_to_num(lo), np.nan_to_num(hi)], fmt="o", ms=3,
                            lw=1, color=colors[impl], label=impl if (i, j) == (0, len(panels) - 1) else None)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xscale("log")
            ax.set_title(f"{fam} · {panel}", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("median time, ms (log)")
    fig.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), title="impl")
    fig.tight_layout()
    table = rows[["family", "device", "dtype", "mode", "label", "impl", "time_median_ms", "time_ci_low_ms",
                  "time_ci_high_ms", "samples", "converged"]].copy()
    for c in ("time_median_ms", "time_ci_low_ms", "time_ci_high_ms"):
        table[c] = table[c].map(lambda v: _num(v, 3))
    return Section(title, figure=fig, table=table, text=(
        f"{modes_text(rows)}. Median time per case and implementation, the bar its 95% confidence interval "
        "(time_ci_low_ms, time_ci_high_ms). converged false: the interval was still wider than ±2% when "
        "the row's budget ran out."))


@_styled()
def memory_section(df: pd.DataFrame) -> Section:
    rows = headline(df)
    mem = rows[rows["extra_mem_bytes"].notna() & (rows["extra_mem_bytes"].astype(float) > 0)].copy()
    title = "Extra memory"
    if mem.empty:
        return Section(title, text="No ok row has a measured extra memory above zero: nothing to draw on log axes.")
    mem["extra_MiB"] = mem["extra_mem_bytes"].astype(float) / 2**20
    mem["floor_MiB"] = mem["min_mem_bytes"].astype(float) / 2**20
    mem["panel"] = _panel(mem)
    g = sns.relplot(data=mem, x="c", y="extra_MiB", hue="impl", row="family", col="panel", kind="line",
                    estimator="median", errorbar=("pi", 100), err_style="bars", marker="o",
                    height=2.6, aspect=1.3, facet_kws={"margin_titles": True})
    # The floor: what an implementation must allocate (the gradient and the loss), torch_functional's
    # where it ran (an implementation writing its gradient into its input has a lower one: see the table).
    for (family, panel), ax in g.axes_dict.items():
        cell = mem[(mem["family"] == family) & (mem["panel"] == panel)]
        ref = cell[cell["impl"] == BASELINE] if (cell["impl"] == BASELINE).any() else cell
        floor = ref[ref["floor_MiB"] > 0].groupby("c")["floor_MiB"].median()
        if len(floor):
            ax.plot(floor.index, floor.values, color="black", ls="--", marker="_", markersize=18, lw=1.2,
                    label="analytic floor")
    _plain_log_axes(g, mem["c"])
    g.set_axis_labels(_x_label(mem), "extra memory (MiB)")
    g.set_titles(row_template="{row_name}", col_template="{col_name}")
    mem["over_floor"] = mem["extra_mem_bytes"].astype(float) / mem["min_mem_bytes"].astype(float).where(
        mem["min_mem_bytes"].astype(float) > 0)
    table = (mem.groupby(["family", "device", "dtype", "mode", "c", "impl"], sort=False)
             .agg(cases=("extra_MiB", "size"), extra_MiB=("extra_MiB", "median"),
                  floor_MiB=("floor_MiB", "median"), extra_over_floor=("over_floor", "median")).reset_index())
    for col in ("extra_MiB", "floor_MiB", "extra_over_floor"):
        table[col] = table[col].map(_sig)
    dropped = len(rows) - len(mem)
    return Section(title, figure=g.figure, table=table, text=(
        f"{modes_text(rows)}. Peak extra memory over the inputs (extra_mem_bytes: the smallest of five calls), "
        "median over the cases at each class count, bar: their range. The dashed black line is the analytic "
        f"floor (min_mem_bytes) of {BASELINE}'s rows: the gradient and the loss."
        + (f" {dropped} ok rows with no memory above zero are not drawn (log axes)." if dropped else "")))


# --- 3. accuracy ----------------------------------------------------------------------------------
def _case_floor(grad: pd.DataFrame) -> pd.Series:
    """Per case, the rounding floor (worst-row error of the reference rounded once to the dtype): the same
    for every implementation, recovered from any row that has both numbers."""
    err, ratio = grad["grad_row_err_max"].astype(float), grad["err_vs_floor"].astype(float)
    usable = (err > 0) & np.isfinite(err) & (ratio > 0) & np.isfinite(ratio)
    return (err[usable] / ratio[usable]).groupby(grad.loc[usable, "case"]).median()


@_styled("white")  # no grid lines through the heatmap's empty cells
def accuracy_section(df: pd.DataFrame) -> Section:
    rows = headline(df)
    grad = rows[rows["grad_row_err_max"].notna()].copy()
    title = "Gradient error over the rounding floor"
    if grad.empty:
        return Section(title, text="No ok row has a gradient error (only fwd rows, or none ok).")
    multi_device = grad["device"].nunique() > 1
    grad["case"] = (grad["device"] + " " if multi_device else "") + grad["family"] + " " + grad["label"]
    cases = list(pd.unique(grad["case"]))
    impls = sorted(set(grad["impl"]), key=lambda i: (i != BASELINE, list(pd.unique(grad["impl"])).index(i)))
    cells = grad.drop_duplicates(["case", "impl"], keep="last").set_index(["case", "impl"])

    def grid(col):  # case x impl, in the run's order; NaN where the implementation has no ok row
        return cells[col].unstack("impl").reindex(index=cases, columns=impls)

    ratio, err = grid("err_vs_floor").astype(float), grid("grad_row_err_max").astype(float)
    bad = grid("accuracy_ok").map(lambda ok: not pd.isna(ok) and not bool(ok))  # no row is no failure
    budget = grad.groupby("case")["dtype"].first().map(BUDGETS).reindex(cases)
    budget_x = budget / _case_floor(grad).reindex(cases)  # the dtype's budget in floor units, per case
    over = err.gt(budget, axis=0)

    def cell(r, e, b):
        text = ("" if pd.isna(e) else "exact" if e == 0 else "-" if pd.isna(r)
                else "inf" if np.isinf(r) else f"{r:.2g}")
        return text + (" ✗" if b else "")

    annot = pd.DataFrame([[cell(*t) for t in zip(*rows_)] for rows_ in
                          zip(ratio.to_numpy(), err.to_numpy(), bad.to_numpy())], index=cases, columns=impls)
    pos = ratio.to_numpy()[np.isfinite(ratio.to_numpy()) & (ratio.to_numpy() > 0)]
    vmin, vmax = (max(pos.min(), 1e-2), max(pos.max(), 10.0)) if pos.size else (0.1, 10.0)
    # 0 (exact) and inf (NaN where the reference is finite) take the ends of the scale
    shown = ratio.clip(lower=vmin, upper=vmax).mask(ratio.isna() & (err == 0), vmin)
    labels = [f"{c}  (budget {_num(b)}x)" if np.isfinite(b) else c for c, b in budget_x.items()]
    fig, ax = plt.subplots(figsize=(3.0 + 1.1 * len(impls), 1.5 + 0.3 * len(cases)))
    sns.heatmap(shown.set_axis(labels, axis=0), annot=annot.to_numpy(), fmt="", cmap="rocket_r",
                norm=LogNorm(vmin=vmin, vmax=vmax), ax=ax, linewidths=0.5, linecolor="white",
                annot_kws={"fontsize": 7}, cbar_kws={"label": "worst-row gradient error / rounding floor"})
    for i, j in zip(*np.nonzero(over.to_numpy())):
        ax.add_patch(Rectangle((j, i), 1, 1, fill=False, edgecolor="red", lw=2))
    ax.set_xlabel("implementation")
    ax.set_ylabel("case (the dtype's budget in floor units)")
    ax.set_title(f"{modes_text(rows)}: red outline = worst row over the dtype's budget", fontsize=10)
    table = annot.rename_axis("case").reset_index()
    table.insert(1, "budget / floor", [_num(b) for b in budget_x])
    budgets = ", ".join(f"{d} {BUDGETS[d]:g}" for d in sorted(set(grad["dtype"])))
    return Section(title, figure=fig, table=table, text=(
        f"{modes_text(rows)}. Each cell: the worst sample row's relative gradient error over the rounding "
        "floor (the error of the float64 reference rounded once to the dtype); 1 is the best any "
        f"implementation can do. The budget is a relative error per dtype ({budgets}); each case's label "
        "gives it in floor units. A red outline marks a worst row over the budget, ✗ a row that is not "
        f"accuracy_ok (loss, whole gradient or worst row over the budget): {int(over.to_numpy().sum())} "
        f"outlined, {int(bad.to_numpy().sum())} ✗. '-': no floor (float64); blank: no ok row."))


# --- 4. bandwidth ---------------------------------------------------------------------------------
@_styled()
def bandwidth_section(df: pd.DataFrame) -> Section:
    rows = headline(df)
    bw = rows[rows["pct_peak_bw"].notna()].copy()
    title = "Share of copy bandwidth"
    if bw.empty:
        return Section(title, text=(
            f"pct_peak_bw is empty in every ok row ({modes_text(rows)}): every case's working set is under 4x "
            "the device's largest cache (the L2 on CUDA, the last-level cache on the CPU), where a rate "
            "against the copy bandwidth would mislead (written bytes can stay in the cache when the timer "
            "stops). Larger shapes have one."))
    bw["pct_peak_bw"] = bw["pct_peak_bw"].astype(float)
    bw["panel"] = _panel(bw)
    g = sns.catplot(data=bw, x="pct_peak_bw", y="impl", hue="family", col="panel", kind="strip",
                    dodge=True, height=0.5 + 0.4 * bw["impl"].nunique(), aspect=1.6)
    for ax in g.axes.flat:
        ax.axvline(100, color="0.3", ls="--", lw=1)
    g.set_axis_labels("% of copy bandwidth", "")
    g.set_titles(col_template="{col_name}")
    table = (bw.groupby(["device", "dtype", "family", "mode", "impl"], sort=False)["pct_peak_bw"]
             .agg(cases="size", median="median", max="max").reset_index())
    for col in ("median", "max"):
        table[col] = table[col].map(_sig)
    missing = len(rows) - len(bw)
    return Section(title, figure=g.figure, table=table, text=(
        f"{modes_text(rows)}. Bytes an ideal fused implementation must move over the median time, as a share "
        "of the device's measured copy bandwidth (copy_gbps); one dot per case."
        + (f" {missing} ok rows have no rate (working set under 4x the largest cache) and are not drawn."
           if missing else "")))


# --- 5. comparison: raw samples -------------------------------------------------------------------
@_styled()
def raw_samples_section(cmp, shown: pd.DataFrame) -> Section:
    """Both runs' raw timing samples for every time verdict other than unchanged (shown: compare's
    verdicts of metric time, most severe first)."""
    title = "Raw timing samples of the rows that changed"
    if shown.empty:
        return Section(title, text="Every time verdict is unchanged: no samples to show.")
    key = ["device", "family", "impl", "label", "mode"]
    base = cmp.base.rows.drop_duplicates(key, keep="last").set_index(key)["raw_ms"]
    head = cmp.head.rows.drop_duplicates(key, keep="last").set_index(key)["raw_ms"]
    long = []
    for n, (_, v) in enumerate(shown.head(MAX_SAMPLE_PANELS).iterrows()):
        k = (v["device"], v["family"], v["impl"], v["case"], v["mode"])
        panel = (f"{n + 1}. {v['verdict']} x{v['change']:.3g}\n{v['family']} {v['impl']} {v['mode']}\n"
                 + "\n".join(textwrap.wrap(str(v["case"]), 38)))
        for run, series in (("base", base), ("head", head)):
            samples = series.get(k)
            for ms in (samples if isinstance(samples, (list, tuple, np.ndarray)) else []):
                long.append({"panel": panel, "run": run, "ms": ms})
    data = pd.DataFrame(long, columns=["panel", "run", "ms"])
    if data.empty:
        return Section(title, text="The rows that changed have no raw samples in the run files.")
    panels = list(pd.unique(data["panel"]))
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    # axes-level calls on one grid: a FacetGrid (catplot) re-lays out the figure per panel, 5x slower here
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 3.2 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        d = data[data["panel"] == panel]
        sns.boxplot(data=d, x="run", y="ms", ax=ax, color="0.88", fliersize=0, width=0.5)
        sns.stripplot(data=d, x="run", y="ms", hue="run", ax=ax, palette="deep", size=3, jitter=0.2, legend=False)
        ax.set_title(panel, fontsize=7)
        ax.set(xlabel="", ylabel="sample time (ms)")
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    cut = len(shown) - MAX_SAMPLE_PANELS
    return Section(title, figure=fig, text=(
        f"Every row whose time verdict is not unchanged, most severe first: the base run's samples (raw_ms, "
        f"{cmp.base.run_id}) beside the head's ({cmp.head.run_id}); the table below is numbered as the panels. The verdicts come from lossbench compare (drift-corrected, with between-run noise); "
        "the samples show what they were judged on."
        + (f" The {cut} least severe are left out here; the verdict table lists them all." if cut > 0 else "")))


# --- 6. comparison: every row's change, per metric ---------------------------------------------------------
VERDICT_COLORS = {"regressed": "#c0392b", "improved": "#27ae60", "inconclusive": "#f39c12", "unchanged": "0.6"}


@_styled()
def time_changes_section(cmp) -> Section:
    """Every time row's change (head over base, after compare's drift correction), per implementation:
    the raw-samples panels show the rows that changed, this shows where they stand among all rows."""
    v = cmp.verdicts
    t = v[(v["metric"] == "time") & v["change"].notna()].copy()
    title = "Time: every row's change, per implementation"
    if t.empty:
        return Section(title, text="No time row in both runs.")
    t["family / impl"] = t["family"].astype(str) + " " + t["impl"].astype(str)
    order = sorted(t["family / impl"].unique())
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(order) + 1.6))
    ax.axvspan(1 / (1 + cmp.threshold), 1 + cmp.threshold, color="0.92", zorder=0)
    ax.axvline(1.0, color="0.3", lw=1, ls="--")
    sns.stripplot(data=t, x="change", y="family / impl", hue="verdict", order=order, palette=VERDICT_COLORS,
                  jitter=0.25, size=4, ax=ax, log_scale=True)
    ax.set(xlabel="head / base, drift-corrected (log)", ylabel="")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title="verdict")
    counts = t.pivot_table(index=["family", "impl"], columns="verdict", values="change", aggfunc="size",
                           fill_value=0).reset_index()
    counts.columns.name = None
    return Section(title, figure=fig, table=counts, text=(
        f"One dot per time row: its change as lossbench compare judged it (relative to the rows measured "
        f"beside it, CPU rows paced by their evictions). The grey band is the threshold "
        f"(±{100 * cmp.threshold:g}%); the colour is the verdict."))


@_styled()
def _base_head_section(cmp, metric: str, title: str, unit: str, text: str, factor: float) -> Section:
    v = cmp.verdicts
    d = v[(v["metric"] == metric) & v["base"].notna() & v["head"].notna()].copy()
    d = d[(d["base"] > 0) & (d["head"] > 0) & np.isfinite(d["base"].astype(float)) & np.isfinite(d["head"].astype(float))]
    if d.empty:
        return Section(title, text=f"No {metric} row with a finite value in both runs.")
    d["base"], d["head"] = d["base"].astype(float), d["head"].astype(float)
    fig, ax = plt.subplots(figsize=(6, 5))
    lo, hi = float(min(d["base"].min(), d["head"].min())) / 2, float(max(d["base"].max(), d["head"].max())) * 2
    ax.plot([lo, hi], [lo, hi], color="0.3", lw=1, ls="--")
    ax.plot([lo, hi], [lo * factor, hi * factor], color="0.6", lw=1, ls=":")
    sns.scatterplot(data=d, x="base", y="head", hue="verdict", palette=VERDICT_COLORS, style="impl", s=30, ax=ax)
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel=f"base ({unit})", ylabel=f"head ({unit})")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    table = d[d["verdict"] != "unchanged"][["verdict", "family", "impl", "case", "dtype", "mode", "base", "head", "change"]]
    return Section(title, figure=fig, table=table if len(table) else None, text=text)


def memory_changes_section(cmp) -> Section:
    return _base_head_section(
        cmp, "memory", "Memory: head against base", "extra bytes",
        "One dot per row: extra memory (the smallest of its repeated calls) in the base run and in the head. "
        f"On the dashed line nothing moved; the dotted line is {100 * cmp.threshold:g}% more. Rows that are not "
        "unchanged are listed below.", 1 + cmp.threshold)


def accuracy_changes_section(cmp) -> Section:
    from .statistics import ACCURACY_GROWTH
    return _base_head_section(
        cmp, "accuracy", "Accuracy: head against base", "worst-row error",
        "One dot per row: its worst-row gradient error (loss error for fwd rows) in the base run and in the "
        f"head. Inputs are seeded, so unchanged code sits on the dashed line; the dotted line is {ACCURACY_GROWTH:g}x, "
        "beyond which an error's growth is a regression.", ACCURACY_GROWTH)
