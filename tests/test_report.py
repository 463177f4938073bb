"""`lossbench report`: one run -> HTML, Markdown and PNGs; two -> a comparison; a folder -> its latest run,
never a mix; bad input -> one line and exit 2. On the committed runs in results/ and copies of them."""
import json
import os
import re
import shutil
from pathlib import Path

import matplotlib.image
import pytest

from lossbench.cli import main
from lossbench.report.runs import RUN_ID

RESULTS = Path(__file__).resolve().parent.parent / "results"
QUICK = "20261201T133813Z-c8814a"        # quick suite, CPU: no pct_peak_bw in any row
QUICK_BW = "20261125T024936Z-3a55f8"     # quick suite, before rates were dropped under 4x LLC: every row has one
NIGHTLY = "20261201T141457Z-3f63ca"      # nightly suite, 264 rows
TINY_OLD, TINY_NEW = "20261125T024425Z-24b315", "20261125T024750Z-534c3f"  # 3 ce rows; 4 linear_ce rows


def _report(capsys, *args):
    rc = main(["report", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(capsys, *args) -> str:
    rc, out, err = _report(capsys, *args)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("lossbench: error: "), (rc, err)
    assert "Traceback" not in out + err
    return lines[0]


def _copy(run_id: str, folder: Path, new_id: str | None = None, edit=None, family=None) -> Path:
    """A committed run copied into folder, optionally as another run id, with its rows edited, of one family."""
    folder.mkdir(parents=True, exist_ok=True)
    new_id = new_id or run_id
    rows = [json.loads(line) for line in (RESULTS / f"{run_id}.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if family in (None, r["family"])]
    for r in rows:
        r["run_id"] = new_id
        if edit:
            edit(r)
    (folder / f"{new_id}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = json.loads((RESULTS / f"{run_id}.meta.json").read_text()) | {"run_id": new_id}
    (folder / f"{new_id}.meta.json").write_text(json.dumps(meta))
    return folder / f"{new_id}.jsonl"


def _decodes(png: Path) -> bool:
    img = matplotlib.image.imread(png)
    return img.shape[0] > 50 and img.shape[1] > 50 and img[..., :3].std() > 0.01


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """`lossbench report QUICK_BW` run from an empty folder: its default output is reports/<run_id> there."""
    where = tmp_path_factory.mktemp("cwd")
    before = os.getcwd()
    os.chdir(where)
    try:
        rc = main(["report", QUICK_BW, "--results", str(RESULTS)])
    finally:
        os.chdir(before)
    return rc, where / "reports" / QUICK_BW


def test_run_report_writes_html_markdown_and_plots(quick_report, capsys):
    rc, folder = quick_report
    assert rc == 0
    html, md = (folder / "report.html").read_text(), (folder / "report.md").read_text()
    pngs = sorted(folder.glob("report-*.png"))
    assert len(pngs) == 5 and all(_decodes(p) for p in pngs)
    assert [p.name for p in pngs] == sorted(re.findall(r"!\[[^]]*\]\((report-[^)]+\.png)\)", md))
    assert html.count('src="data:image/png;base64,') == 5
    for title in ("Speedup over torch_functional", "Time per case, with the 95% confidence interval of the median",
                  "Extra memory", "Gradient error over the rounding floor",
                  "Share of copy bandwidth", "Failed and unsupported rows"):
        assert f"<h2>{title}</h2>" in html and f"## {title}" in md
    # the header: which run, its suite, provenance, rows by status
    for text in (QUICK_BW, "**suite**: quick", "Intel(R) Xeon(R) Processor", "2.13.0+cpu", "3.9.0",
                 "362 (274 ok, 88 unsupported)"):
        assert text in md, text
    sha = json.loads((RESULTS / f"{QUICK_BW}.jsonl").read_text().splitlines()[0])["git_sha"]
    assert f"**commit**: {sha}" in md
    # unsupported rows are listed with their reason, not dropped
    assert "fused_triton needs CUDA, or TRITON_INTERPRET=1 on the CPU" in html
    assert "liger does not support target=prob" in md


def test_run_report_prints_the_tables_and_the_paths(tmp_path, capsys):
    rc, out, err = _report(capsys, RESULTS / f"{TINY_OLD}.jsonl", "--out", tmp_path)
    assert rc == 0, err
    assert "speedup over torch_functional" in out and "fused" in out  # the terminal table, as before
    pngs = sorted(tmp_path.glob("report-*.png"))
    assert len(pngs) == 5
    for path in (tmp_path / "report.html", tmp_path / "report.md", *pngs):
        assert f"wrote {path}" in out


def test_accuracy_heatmap_marks_rows_over_the_budget(quick_report):
    md = (quick_report[1] / "report.md").read_text()
    section = md.split("## Gradient error over the rounding floor")[1].split("\n## ")[0]
    # torch's bfloat16 worst row on peaked inputs is far off: over the budget, and not accuracy_ok
    table_rows = [line for line in section.splitlines() if "bfloat16 peaked" in line and line.startswith("|")]
    assert table_rows and any("✗" in line for line in table_rows)
    assert not any("✗" in line for line in section.splitlines() if "float32 normal default" in line)
    counts = re.search(r"(\d+) outlined, (\d+) ✗", section)
    assert counts and int(counts.group(1)) > 0 and int(counts.group(2)) > 0


def test_folder_is_its_latest_run_never_a_mix(tmp_path, capsys):
    folder = tmp_path / "runs"
    _copy(TINY_NEW, folder)
    _copy(TINY_OLD, folder)  # written last: the newest file, but the older run
    for args in ([folder], ["--results", folder]):
        out_dir = tmp_path / f"rep{len(args)}"
        rc, out, err = _report(capsys, *args, "--out", out_dir)
        assert rc == 0, err
        assert f"latest of 2 runs in {folder}/: {TINY_NEW}" in out
        md = (out_dir / "report.md").read_text()
        assert TINY_NEW in md and "latest of 2 runs" in md and "4 (4 ok)" in md
        assert TINY_OLD not in out + md + (out_dir / "report.html").read_text()
        assert "linear_ce" in md and "| ce " not in md  # only the newer run's family


def test_results_folder_reports_its_latest_run(tmp_path, capsys):
    rc, out, err = _report(capsys, f"{RESULTS}/", "--out", tmp_path)
    assert rc == 0, err
    runs = sorted(p.stem for p in RESULTS.glob("*.jsonl") if RUN_ID.match(p.stem))
    assert len(runs) > 2
    assert f"latest of {len(runs)} runs in {RESULTS}/: {runs[-1]}" in out
    md = (tmp_path / "report.md").read_text()
    assert [r for r in runs if r in md] == [runs[-1]]
    # the nightly runs on this CPU have no bandwidth rate (every working set fits 4x the LLC): said in
    # words, with no empty plot
    assert "pct_peak_bw is empty in every ok row" in md
    assert len(list(tmp_path.glob("report-*.png"))) == 4


def _slowed(r):
    # one implementation 3x slower in every mode: what a bad kernel commit does
    if r["impl"] == "torch_composed" and r["raw_ms"]:
        r["raw_ms"] = [3 * x for x in r["raw_ms"]]
        r["time_median_ms"] *= 3


def test_comparison_report_shows_the_changed_rows_samples(tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    head_id = "20261202T000000Z-aaaaaa"
    _copy(NIGHTLY, results, family="ce")  # one family: 84 rows, 12 of them torch_composed and ok
    _copy(NIGHTLY, results, head_id, edit=_slowed, family="ce")
    monkeypatch.chdir(tmp_path)
    rc, out, err = _report(capsys, NIGHTLY, head_id, "--results", results)
    assert rc == 0, err
    folder = tmp_path / "reports" / f"{NIGHTLY}_vs_{head_id}"
    md, html = (folder / "report.md").read_text(), (folder / "report.html").read_text()
    assert f"{NIGHTLY} -> {head_id}" in out  # compare's summary line
    samples = md.split("## Raw timing samples of the rows that changed")[1].split("\n## ")[0]
    rows = [line for line in samples.splitlines() if re.match(r"\|\s+\d+ \| regressed ", line)]  # numbered as the panels
    assert rows and all("torch_composed" in line for line in rows)
    assert len(rows) == 12  # every ok torch_composed row (cases x modes), and nothing else
    pngs = sorted(folder.glob("report-*.png"))
    assert [p.name.split("-", 2)[2] for p in pngs] == [
        "raw-timing-samples-of-the-rows-that-changed.png", "time-every-row-s-change-per-implementation.png",
        "memory-head-against-base.png", "accuracy-head-against-base.png"]
    assert all(_decodes(p) for p in pngs)
    changes = md.split("## Time: every row's change, per implementation")[1].split("\n## ")[0]
    assert re.search(r"\| ce\s+\| torch_composed\s+\|\s+\d+ \|", changes)  # its counts row
    assert "<h2>Verdicts</h2>" in html and "regressed" in html
    assert "<h2>Failed and unsupported rows (head)</h2>" in html


def test_identical_runs_have_no_samples_plot(tmp_path, capsys):
    results = tmp_path / "results"
    _copy(TINY_NEW, results)
    _copy(TINY_NEW, results, "20261202T000000Z-bbbbbb")
    # 4 rows are too few to estimate the between-run noise: compare assumes 5%, so only a threshold above
    # that can call a row unchanged
    rc, out, err = _report(capsys, TINY_NEW, "20261202T000000Z-bbbbbb", "--results", results, "--out", tmp_path / "r",
                           "--threshold", 20)
    assert rc == 0, err
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Every time verdict is unchanged" in md and not list((tmp_path / "r").glob("*raw-timing*.png"))


def test_three_runs_are_refused(tmp_path, capsys):
    line = _one_error_line(capsys, QUICK, NIGHTLY, TINY_NEW, "--results", RESULTS, "--out", tmp_path / "r")
    assert "not 3" in line and not (tmp_path / "r").exists()


def test_bad_input_is_one_line(tmp_path, capsys):
    assert "no run '20990101T000000Z-000000'" in _one_error_line(
        capsys, "20990101T000000Z-000000", "--results", RESULTS, "--out", tmp_path / "r")
    garbage = tmp_path / "20261203T000000Z-cccccc.jsonl"
    garbage.write_bytes(bytes(range(256)) * 8)
    assert "not a lossbench results file" in _one_error_line(capsys, garbage, "--out", tmp_path / "r")
    (tmp_path / "empty").mkdir()
    assert "no run in" in _one_error_line(capsys, tmp_path / "empty", "--out", tmp_path / "r")
    assert "no results folder" in _one_error_line(capsys, "--results", tmp_path / "nowhere", "--out", tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_incompatible_runs_need_force(tmp_path, capsys):
    results = tmp_path / "results"
    _copy(TINY_NEW, results)
    _copy(TINY_NEW, results, "20261202T000000Z-dddddd", edit=lambda r: r.update(torch_version="2.99.0"))
    args = (TINY_NEW, "20261202T000000Z-dddddd", "--results", results, "--out", tmp_path / "r")
    assert "not comparable" in _one_error_line(capsys, *args)
    rc, out, err = _report(capsys, *args, "--force")
    assert rc == 0, err
    assert "2.13.0+cpu → 2.99.0" in (tmp_path / "r" / "report.md").read_text()


def test_foreign_files_in_a_folder_are_not_runs(tmp_path, capsys):
    folder = tmp_path / "runs"
    _copy(TINY_OLD, folder)
    shutil.copy(folder / f"{TINY_OLD}.jsonl", folder / "zz-copy.jsonl")  # sorts last, but is no run id
    rc, out, err = _report(capsys, folder, "--out", tmp_path / "r")
    assert rc == 0, err
    assert f"latest of 1 run in {folder}/: {TINY_OLD}" in out
    assert err.strip().startswith("lossbench: warning:") and "zz-copy.jsonl" in err and len(err.splitlines()) == 1
