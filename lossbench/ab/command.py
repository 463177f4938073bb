"""The flow behind `lossbench ab`: measure both sides (session), then judge the run (report/ab.py)."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ..exit_codes import INTERRUPTED
from ..report import ab as ab_report
from . import session


def ab(spec: dict, base: str | None, head: str | None, results: str | Path, *, threshold: float,
       base_python: str | None, head_python: str | None, resume: str | None, timeout_s: float,
       budget_s: float | None, min_blocks: int, passes: int | None, seed: int | None, markdown_path: str | None,
       json_path: str | None, console: Console, err: Console) -> int:
    outcome = session.run(spec, base, head, results, base_python=base_python, head_python=head_python,
                          resume=resume, timeout_s=timeout_s, budget_s=budget_s, min_blocks=min_blocks, passes=passes,
                          seed=seed, err=err)
    if outcome.state != "complete":
        return INTERRUPTED
    cmp = ab_report.verdicts(outcome.path, threshold)
    ab_report.write(cmp, console, markdown_path, json_path)
    console.print(f"{outcome.measured} unit passes measured in {outcome.elapsed_s:.1f} s; rows: {outcome.path}")
    return cmp.exit_code()
