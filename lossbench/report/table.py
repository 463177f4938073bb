"""The compact end-of-run table: per family, per case, each implementation's speedup over
torch_functional and its gradient error relative to torch_functional's."""
from __future__ import annotations

import math

import pandas as pd
from rich.table import Table

from ..families import FAMILIES
from ..registry import BASELINE

HEADLINE_MODES = ("fwd_bwd", "fwd", "bwd")


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g} ms" if ms >= 0.1 else f"{ms * 1e3:.3g} µs"


def fmt_bytes(n: float) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _mem_ratio(row: pd.Series, base: pd.Series) -> str:
    ours, theirs = row.get("extra_mem_bytes"), base.get("extra_mem_bytes")
    if ours is None or theirs is None or pd.isna(ours) or pd.isna(theirs) or theirs == 0:
        return ""
    return f" mem×{ours / theirs:.2g}"


def _fmt_ratio(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "inf" if math.isinf(x) else f"{x:.2g}"


UNCONVERGED = "~"
NOTES = {
    "accuracy": "✗: an error outside the dtype's budget.",
    "unconverged": f"{UNCONVERGED}: the timing did not converge (the 95% CI of the median was still wider than "
                   "±2% when the row's budget ran out): read the CI; rerun with a larger --budget to narrow it.",
}


def _converged(row: pd.Series) -> bool:
    return row.get("converged") is not False and not (isinstance(row.get("converged"), float)
                                                       and row["converged"] == 0.0)


def _own_error(row: pd.Series) -> str:
    """The row's error in words: the worst row's gradient error, a fwd row's loss error, or (asv's rows
    carry only that) the gradient error over its rounding floor."""
    for col, word in (("grad_row_err_max", "err"), ("loss_rel_err", "loss err")):
        if pd.notna(row.get(col)):
            return "exact" if row[col] == 0 else f"{word} {row[col]:.1e}"
    if pd.notna(row.get("err_vs_floor")):
        return f"err {_fmt_ratio(row['err_vs_floor'])}× floor"
    return ""


def _cell(row: pd.Series, base: pd.Series | None) -> str:
    if row["status"] != "ok":
        return f"[yellow]{row['status']}[/]" if row["status"] == "unsupported" else f"[red]{row['status']}[/]"
    mark = " [red]✗[/]" if row["accuracy_ok"] is False or row["accuracy_ok"] == 0.0 else ""  # None: not judged
    time_mark = "" if _converged(row) else f"[magenta]{UNCONVERGED}[/]"
    own_err = _own_error(row)
    if pd.isna(row["time_median_ms"]):  # an untimed row (pytest-benchmark --benchmark-disable)
        return f"untimed{_mem_ratio(row, base) if base is not None else ''} {own_err}{mark}"
    if row["impl"] == BASELINE or base is None or base["status"] != "ok" or pd.isna(base["time_median_ms"]):
        has_ci = pd.notna(row["time_ci_low_ms"]) and pd.notna(row["time_ci_high_ms"])
        ci = f" [{_fmt_ms(row['time_ci_low_ms'])}, {_fmt_ms(row['time_ci_high_ms'])}]" if has_ci else ""
        mem = f" +{fmt_bytes(row['extra_mem_bytes'])}" if pd.notna(row.get("extra_mem_bytes")) else ""
        return f"{time_mark}{_fmt_ms(row['time_median_ms'])}{ci}{mem} {own_err}{mark}"
    err = own_err if own_err == "exact" or pd.isna(row.get("grad_row_err_max")) \
        else f"err×{_fmt_ratio(row['err_ratio_vs_torch'])}"
    if pd.notna(row.get("speedup_vs_torch")):
        # Paired with torch_functional's samples in the same rounds (runners/pairing.py): with its CI.
        speedup = f"{row['speedup_vs_torch']:.2f}× [{row['speedup_ci_low']:.2f}, {row['speedup_ci_high']:.2f}]"
    else:  # rows without paired rounds (a collective implementation, an imported run): medians' ratio
        speedup = f"{base['time_median_ms'] / row['time_median_ms']:.2f}×"
    return f"{time_mark}{speedup} {err}{_mem_ratio(row, base)}{mark}"


def family_tables(df: pd.DataFrame) -> list[Table]:
    tables = []
    for family in [f for f in FAMILIES if f in set(df["family"])]:
        fam = df[df["family"] == family]
        mode = next(m for m in HEADLINE_MODES if m in set(fam["mode"]))
        fam = fam[fam["mode"] == mode]
        impls = [BASELINE] * (BASELINE in set(fam["impl"])) + [i for i in fam["impl"].unique() if i != BASELINE]
        multi_device = fam["device"].nunique() > 1
        table = Table(
            title=f"{family} ({FAMILIES[family].title}), {mode}: speedup over {BASELINE} [95% CI, paired rounds], "
                  f"worst-row gradient "
                  f"error and peak extra memory over {BASELINE}'s (✗ outside the dtype's budget)",
            title_justify="left",
            caption=" ".join(NOTES.values()) if not fam["converged"].fillna(True).astype(bool).all()
            else NOTES["accuracy"],
            caption_justify="left",
        )
        table.add_column("case")
        for impl in impls:
            table.add_column(impl, justify="right")
        for (device, label), group in fam.groupby(["device", "label"], sort=False):
            by_impl = {r["impl"]: r for _, r in group.iterrows()}
            base = by_impl.get(BASELINE)
            name = f"{device} {label}" if multi_device else label
            table.add_row(name, *[_cell(by_impl[i], base) if i in by_impl else "" for i in impls])
        tables.append(table)
    return tables
