"""How often `lossbench ab` cries wolf and how often it catches a slowdown, measured on this machine.

    python -m lossbench.ab.calibrate [--repeats 3] [--slowdowns 1.0,1.05,1.10] [--load both] [--budget S]
                                     [--passes N] [--shapes ...] [--dtypes ...] [--modes ...] [--out FILE]

A throw-away git repository gets a plugin, `calibrated` (ce: torch's forward and an explicit softmax
gradient, inside one autograd Function), at two commits: the base at factor 1, the head at factor F,
which spins (F - 1) times the time its forward call, and its backward (from the loss's gradient hook
to the end of its backward), took. So the head is F times slower in every mode, less the harness's own
few microseconds around a call that no plugin can see; torch_functional, measured in the same run, is
unchanged on both sides. The slowdown each row actually got is reported beside the nominal one.
Each configuration (slowdown x background load) runs `lossbench ab` --repeats times. Background load: a
process that busies one core for 50-500 ms, then sleeps for 50-500 ms, for the whole run.
Prints and writes (JSON) per configuration: the share of rows flagged (regressed or improved) that are
unchanged (false alarms: every row at F = 1, torch_functional's at F > 1), the share of runs with any
false alarm, the share of the slowed rows `regressed` (detection), and the paired noise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import exit_codes
from ..report import ab as ab_report

PLUGIN = '''"""Calibration plugin of lossbench ab: cross-entropy made FACTOR times slower in every mode."""
import time

import torch
import torch.nn.functional as F

import lossbench

FACTOR = {factor!r}


def _spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


_BACKWARD_START = [0.0]


def _mark_backward(grad):
    _BACKWARD_START[0] = time.perf_counter()


class _CE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target):
        ctx.save_for_backward(logits, target)
        return F.cross_entropy(logits, target)

    @staticmethod
    def backward(ctx, g):
        logits, target = ctx.saved_tensors
        grad = torch.softmax(logits.float(), dim=1)
        grad[torch.arange(len(target)), target] -= 1
        grad = (grad * (g / len(target))).to(logits.dtype)
        # From the loss's gradient hook, the first thing the backward runs, to here, the last.
        _spin((FACTOR - 1) * (time.perf_counter() - _BACKWARD_START[0]))
        return grad, None


@lossbench.register(family="ce", name="calibrated", unsupported=("weight", "label_smoothing", "reduction", "ignore_frac", "target",
                                                                 "spatial", "noncontig"),
                    description="calibration: torch's cross-entropy, FACTOR times slower")
def calibrated(logits, target, **kw):
    # The spin covers the whole call as far as a plugin sees it (autograd's apply and the hook included),
    # so that the head is FACTOR times slower at every shape, not only where the kernel dominates.
    t0 = time.perf_counter()
    loss = _CE.apply(logits, target)
    if loss.requires_grad:
        loss.register_hook(_mark_backward)
    _spin((FACTOR - 1) * (time.perf_counter() - t0))
    return loss
'''

SHAPES = "256x1000,1024x4096,4096x4096,2048x32768"


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=calibrate@lossbench", "-c", "user.name=calibrate", *args], cwd=repo,
                   check=True, capture_output=True)


def make_repo(root: Path, factor: float) -> Path:
    repo = root / f"kernels-{factor:g}"
    repo.mkdir()
    _git(repo, "init", "-q", ".")
    (repo / "kernels.py").write_text(PLUGIN.format(factor=1.0))
    _git(repo, "add", "kernels.py")
    _git(repo, "commit", "-qm", "base")
    (repo / "kernels.py").write_text(PLUGIN.format(factor=factor))
    _git(repo, "commit", "-qam", f"head: x{factor:g}", "--allow-empty")
    return repo


def _load(stop) -> None:
    rng = random.Random()
    while not stop.is_set():
        end = time.perf_counter() + rng.uniform(0.05, 0.5)
        while time.perf_counter() < end:
            pass
        stop.wait(rng.uniform(0.05, 0.5))


@contextlib.contextmanager
def background_load(on: bool):
    if not on:
        yield
        return
    stop = mp.get_context("spawn").Event()
    proc = mp.get_context("spawn").Process(target=_load, args=(stop,), daemon=True)
    proc.start()
    try:
        yield
    finally:
        stop.set()
        proc.join(5)


def one_run(repo: Path, results: Path, shapes: str, dtypes: str, modes: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "lossbench", "ab", "HEAD~1", "HEAD", "--plugin", "kernels.py", "--family", "ce",
           "--impl", "torch_functional,calibrated", "--shape", shapes, "--dtype", dtypes, "--mode", modes,
           "--results", str(results), "--json", str(results / "verdicts.json"), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"lossbench ab exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    data = json.loads((results / "verdicts.json").read_text())
    rows = [r for r in data["rows"] if r["metric"] == "time"]  # each with its change, CI and q
    return {"exit": proc.returncode, "wall_s": time.perf_counter() - t0, "rows": rows,
            "paired_sd_pct": {d: n["paired_sd_pct"] for d, n in data["noise"].items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slowdowns", default="1.0,1.05,1.10")
    p.add_argument("--load", choices=("off", "on", "both"), default="both")
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--budget", type=float, help="lossbench ab --budget (default: its own)")
    p.add_argument("--passes", type=int, help="lossbench ab --passes (default: its own)")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    loads = {"off": [False], "on": [True], "both": [False, True]}[args.load]
    extra = [*(["--budget", str(args.budget)] if args.budget else []), *(["--passes", str(args.passes)] if args.passes else [])]
    report = {"machine": os.uname().nodename, "cores": os.cpu_count(), "ab_flags": extra, "shapes": args.shapes,
              "dtypes": args.dtypes, "modes": args.modes, "configs": []}
    with tempfile.TemporaryDirectory(prefix="lossbench-calibrate-") as tmp:
        for factor in [float(f) for f in args.slowdowns.split(",")]:
            repo = make_repo(Path(tmp), factor)
            for load in loads:
                runs = []
                for i in range(args.repeats):
                    res = Path(tmp) / f"res-{factor:g}-{load}-{i}"
                    res.mkdir()
                    with background_load(load):
                        runs.append(one_run(repo, res, args.shapes, args.dtypes, args.modes, extra))
                report["configs"].append(summarize(factor, load, runs))
                print(json.dumps({k: v for k, v in report["configs"][-1].items() if k != "changes"}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return exit_codes.OK


THRESHOLDS = (0.02, 0.03, 0.05)


def verdict_at(row: dict, threshold: float) -> str:
    """The row's time verdict at another threshold (q does not depend on it)."""
    return ab_report.time_verdict(row["q"], row["change"], row["ci_low"], row["ci_high"], threshold)


def summarize(factor: float, load: bool, runs: list[dict]) -> dict:
    """Per threshold, per run, then the median over runs (the brief's rule for numbers on a noisy host)."""
    out = {"slowdown": factor, "background_load": load, "runs": len(runs),
           "wall_s": [round(r["wall_s"], 1) for r in runs],
           "paired_sd_pct": [round(v, 2) for r in runs for v in r["paired_sd_pct"].values()],
           "changes": [{k: r_[k] for k in ("impl", "case", "mode", "change", "ci_low", "ci_high", "q")}
                       for r in runs for r_ in r["rows"]]}
    if factor != 1.0:  # the slowdown the slowed rows got, as this run measured it (median over them)
        out["measured_slowdown"] = float(np.median([x["change"] for r in runs for x in r["rows"]
                                                    if x["impl"] == "calibrated"]))
    for t in THRESHOLDS:
        per_run = []
        for r in runs:
            slowed = [x for x in r["rows"] if x["impl"] == "calibrated" and factor != 1.0]
            steady = [x for x in r["rows"] if not (x["impl"] == "calibrated" and factor != 1.0)]
            flagged = [x for x in steady if verdict_at(x, t) in ("regressed", "improved")]
            per_run.append((len(flagged), len(steady), sum(verdict_at(x, t) == "regressed" for x in slowed), len(slowed)))
        out[f"threshold_{100 * t:g}pct"] = {
            "false_alarm_rows": f"{sum(p[0] for p in per_run)} of {sum(p[1] for p in per_run)}",
            "false_alarm_pct_median": float(np.median([100 * p[0] / p[1] for p in per_run])),
            "runs_with_false_alarm_pct": 100 * sum(p[0] > 0 for p in per_run) / len(per_run),
            "detected": f"{sum(p[2] for p in per_run)} of {sum(p[3] for p in per_run)}" if factor != 1.0 else None,
            "detected_pct_median": float(np.median([100 * p[2] / p[3] for p in per_run])) if factor != 1.0 else None,
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
