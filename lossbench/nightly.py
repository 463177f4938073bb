"""`lossbench nightly`: run the suite, compare with the pinned baseline, move the baseline forward
only after a clean night.

The baseline is a small pointer file in the results folder, results/baseline.json:
    {"baselines": {"<device name>": {"run_id": ..., "git_sha": ..., "set_at": ...}}}
one run per device name (a CPU model, a GPU model), so a CPU and a GPU job share one folder.

Exit status (exit_codes): 0 clean (the baseline moves to this run), 1 a regression, 3 rows that failed to
run (error / crash / oom / timeout), 4 no baseline yet for a device (this run becomes it), 2 bad input.
A night with a regression or failed rows leaves the baseline where it was: the next night is
compared with the same run, so a regression cannot become the new normal by being measured twice.

With --ab (nightly_ab), the baseline's commit and HEAD are measured side by side tonight, their samples
interleaved (`lossbench ab`), and the paired verdicts decide: the baseline run's stored rows, measured
on another night on another state of the machine, are not used. HEAD's rows also become tonight's run
in the results folder (history goes on), which the baseline pointer moves to after a clean night.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
from rich.console import Console

from . import devices, records, run, store
from .errors import UsageError
from .exit_codes import INTERRUPTED, NIGHTLY_FAILED_ROWS, NO_BASELINE, OK, REGRESSION
from .report import compare, compare_render, runs

POINTER = "baseline.json"


def read_pointer(results_dir: str | Path) -> dict:
    path = Path(results_dir) / POINTER
    if not path.exists():
        return {"baselines": {}}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise UsageError(f"{path} is corrupt: not JSON (fix or delete it; the next night then becomes "
                         "the baseline)") from None
    if not isinstance(data, dict) or not isinstance(data.get("baselines"), dict) or not all(
            isinstance(v, dict) and isinstance(v.get("run_id"), str) for v in data["baselines"].values()):
        raise UsageError(f"{path} is not a lossbench baseline pointer")
    for name, entry in data["baselines"].items():
        if not (Path(results_dir) / f"{entry['run_id']}.jsonl").is_file():
            raise UsageError(f"{path}: the baseline of {name!r}, run {entry['run_id']}, is not in {str(results_dir)!r}")
    return data


def write_pointer(results_dir: str | Path, data: dict) -> None:
    path = Path(results_dir) / POINTER
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # atomic: a crash leaves the old pointer or the new one


def nightly(spec: dict, results_dir: str | Path, *, threshold: float, timeout_s: float,
            markdown_path: str | None, json_path: str | None, console: Console, err: Console) -> int:
    pointer = read_pointer(results_dir)  # bad input is refused before anything runs
    outcome = run.execute(spec, results_dir, timeout_s=timeout_s, err=err)
    if not outcome.writer:  # a torchrun rank other than 0: rank 0 compares and moves the baseline
        return OK if outcome.state == "complete" else INTERRUPTED
    if outcome.state != "complete":
        return INTERRUPTED
    head_rows = outcome.rows()
    head = runs.Run(outcome.run_id, outcome.run_id, head_rows)
    failed = head_rows[head_rows["status"].isin(run.FAILED)]

    comparisons, new_devices = [], []
    for name in head_rows["device_name"].dropna().unique():
        entry = pointer["baselines"].get(name)
        if entry is None:
            new_devices.append(name)
            continue
        base = runs.load_run(entry["run_id"], results_dir)
        base.rows = base.rows[base.rows["device_name"] == name].reset_index(drop=True)
        mine = runs.Run(head.name, head.run_id, head_rows[head_rows["device_name"] == name].reset_index(drop=True))
        try:
            comparisons.append((name, compare.compare(base, mine, threshold,
                                                      history=runs.history_for(base, mine, results_dir))))
        except UsageError as exc:  # a new torch, a new machine: exit 2; tonight's run is kept
            raise UsageError(f"{exc}; tonight's run {outcome.run_id} is kept: to make it the baseline, remove "
                             f"the entry {name!r} from {Path(results_dir) / POINTER}") from None

    regressed = any(c.regressed() for _, c in comparisons)
    code = (REGRESSION if regressed else NIGHTLY_FAILED_ROWS if len(failed)
            else NO_BASELINE if new_devices else OK)
    lines = _report(comparisons, new_devices, failed, outcome, code, console)
    if code in (OK, NO_BASELINE):
        for name in [n for n, _ in comparisons] + new_devices:
            pointer["baselines"][name] = {"run_id": outcome.run_id, "git_sha": records.git_sha(),
                                          "set_at": records.now()}
        write_pointer(results_dir, pointer)
        lines.append(f"baseline -> {outcome.run_id}")
    else:
        lines.append("baseline kept: " + ", ".join(f"{n}: {e['run_id']}" for n, e in pointer["baselines"].items()))
    console.print(lines[-1])
    if markdown_path:
        Path(markdown_path).write_text(_markdown(comparisons, lines))
    if json_path:
        Path(json_path).write_text(json.dumps({"run_id": outcome.run_id, "exit_code": code, "summary": lines,
                                               "failed_rows": len(failed), "new_baselines": new_devices,
                                               "comparisons": {n: compare_render.to_json(c) for n, c in comparisons}},
                                              indent=1))
    return code


def nightly_ab(spec: dict, results_dir: str | Path, *, threshold: float, timeout_s: float,
               markdown_path: str | None, json_path: str | None, console: Console, err: Console) -> int:
    from .ab import session
    from .report import ab as ab_report

    pointer = read_pointer(results_dir)
    if len(spec["devices"]) != 1:
        raise UsageError("nightly --ab measures one device per job (--device cpu, --device cuda:0, ...)")
    name = devices.device_name(spec["devices"][0])
    entry = pointer["baselines"].get(name)
    if entry is None:  # the first night: nothing to set against; a plain run becomes the baseline
        err.print(f"nightly --ab: no baseline yet for {name!r}: tonight's plain run becomes it")
        return nightly(spec, results_dir, threshold=threshold, timeout_s=timeout_s, markdown_path=markdown_path,
                       json_path=json_path, console=console, err=err)
    sha = entry.get("git_sha") or ""
    if not sha or sha.endswith("+dirty"):
        raise UsageError(f"nightly --ab: the baseline of {name!r} (run {entry['run_id']}) has no clean commit "
                         f"({sha or 'none recorded'}) to measure again")
    outcome = session.run(spec, sha.removesuffix("+dirty"), "HEAD", results_dir, timeout_s=timeout_s, err=err)
    if outcome.state != "complete":
        return INTERRUPTED
    cmp = ab_report.verdicts(outcome.path, threshold)
    head_rows = cmp.head.rows
    run_id = _keep_head_as_run(outcome, spec, head_rows, results_dir)
    failed = head_rows[head_rows["status"].isin(run.FAILED)]
    code = REGRESSION if cmp.regressed() else NIGHTLY_FAILED_ROWS if len(failed) else OK
    lines = [f"lossbench nightly --ab: {outcome.run_id} ({outcome.measured} unit passes in {outcome.elapsed_s:.0f} s), "
             f"base {sha[:10]} (baseline run {entry['run_id']}) vs HEAD, exit {code}"]
    ab_report.write(cmp, console)
    lines += [f"{name}: " + line for line in ab_report.summary_lines(cmp)]
    if len(failed):
        lines.append(f"{len(failed)} rows failed to run on HEAD")
    if code == OK:
        head_sha = head_rows["git_sha"].dropna()
        pointer["baselines"][name] = {"run_id": run_id, "git_sha": str(head_sha.iloc[0]) if len(head_sha) else None,
                                      "set_at": records.now()}
        write_pointer(results_dir, pointer)
        lines.append(f"baseline -> {run_id}")
    else:
        lines.append(f"baseline kept: {name}: {entry['run_id']}")
    for line in lines:
        console.print(line)
    if markdown_path:
        Path(markdown_path).write_text("# lossbench nightly --ab\n\n" + "\n".join(f"- {x}" for x in lines) + "\n\n"
                                       + compare_render.display_frame(cmp).to_markdown(index=False) + "\n")
    if json_path:
        Path(json_path).write_text(json.dumps({"run_id": run_id, "ab_run": outcome.run_id, "exit_code": code,
                                               "summary": lines, "failed_rows": len(failed),
                                               "comparisons": {name: compare_render.to_json(cmp)}}, indent=1))
    return code


def _keep_head_as_run(outcome, spec: dict, head_rows: pd.DataFrame, results_dir: str | Path) -> str:
    """HEAD's rows of the ab run, as tonight's run in the results folder (its history and baseline)."""
    rows = head_rows.drop(columns=["side"]).copy()
    rows["run_id"] = outcome.run_id
    provs = {d: json.loads(g[records.PROVENANCE].iloc[[0]].to_json(orient="records"))[0]  # plain JSON types
             for d, g in rows.groupby("device")}
    writer = store.RunWriter(results_dir, outcome.run_id, {"suite": spec.get("suite") or "default", "spec": spec,
                                                           "provenance": provs, "ab_run": str(outcome.path)})
    try:
        for r in json.loads(rows.to_json(orient="records")):
            writer.write(r)
    finally:
        writer.close("complete")
    return outcome.run_id


def _report(comparisons, new_devices, failed: pd.DataFrame, outcome, code: int, console: Console) -> list[str]:
    lines = [f"lossbench nightly: run {outcome.run_id} ({outcome.measured} rows in {outcome.elapsed_s:.0f} s), "
             f"exit {code}"]
    for name, cmp in comparisons:
        console.print(f"[bold]{name}[/]")
        compare_render.write(cmp, console)
        lines += [f"{name}: " + compare_render.summary_lines(cmp)[0]]
    for name in new_devices:
        lines.append(f"{name}: no baseline yet; this run becomes it")
    if len(failed):
        lines.append(f"{len(failed)} rows failed to run: " + ", ".join(
            f"{r.family} {r.impl} {r.label} {r.mode}: {r.status}" for r in failed.head(5).itertuples())
            + (" ..." if len(failed) > 5 else ""))
    for line in lines[1:]:
        console.print(line)
    return lines


def _markdown(comparisons, lines: list[str]) -> str:
    text = "# lossbench nightly\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"
    for name, cmp in comparisons:
        text += f"\n## {name}\n\n" + compare_render.markdown(cmp).split("\n", 2)[2]
    return text
