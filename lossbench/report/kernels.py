"""The resource table of the compiled Triton kernels: registers, spills and shared memory per variant."""
from __future__ import annotations

import pandas as pd
from rich.table import Table


def kernel_table(df: pd.DataFrame) -> Table:
    """One row per kernel variant and arch; spills in red (a spill in a hot kernel is a defect)."""
    table = Table(title="Triton kernels compiled ahead of time (no GPU needed): per-thread registers and "
                        "spilled bytes, per-block shared memory", title_justify="left")
    for col, justify in (("kernel", "left"), ("variant", "left"), ("arch", "left"), ("registers", "right"),
                         ("spilled", "right"), ("shared", "right"), ("compile", "right")):
        table.add_column(col, justify=justify)
    for r in df.itertuples(index=False):
        spill = f"[red]{r.spill_bytes} B[/]" if r.spill_bytes else "0"
        table.add_row(r.kernel, r.variant, r.arch, str(r.registers), spill, f"{r.shared_bytes} B",
                      f"{r.compile_s:.2f} s")
    return table
