"""The HTML report as a reader sees it: rendered by headless Chromium, every plot decoded and the page not blank.

Chromium is Debian's `chromium` package (.ci/run installs it). Without it these tests skip, unless
LOSSBENCH_REQUIRE_BROWSER=1 (set by .ci/run), where a missing browser fails: CI must render the page.
check_page is shown to catch a corrupt image and a blank page."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest

from lossbench.cli import main

RESULTS = Path(__file__).resolve().parent.parent / "results"
RUN = "20261125T024936Z-3a55f8"  # quick suite with every plot (bandwidth rates too) and unsupported rows
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def browser() -> str:
    found = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if found is None:
        reason = "no chromium on PATH, the HTML report is not rendered (apt-get install chromium)"
        if os.environ.get("LOSSBENCH_REQUIRE_BROWSER") == "1":
            pytest.fail(f"LOSSBENCH_REQUIRE_BROWSER=1 and {reason}")
        pytest.skip(reason)
    return found


def _chromium(browser: str, page: Path, work: Path, *args: str) -> str:
    # --no-sandbox: Chromium refuses to run as root with its sandbox (CI containers run as root);
    # a profile of its own, so parallel or leftover instances cannot lock each other out.
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", "--no-default-browser-check", f"--user-data-dir={work / 'profile'}", *args,
           page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def plots_loaded(browser: str, page: Path, work: Path) -> tuple[int, int] | None:
    """(decoded, total) as the page's own load check wrote them into the DOM; None if it never ran."""
    dom = _chromium(browser, page, work, "--dump-dom", "--virtual-time-budget=5000")
    tag = re.search(r'<p[^>]*id="plots-loaded"[^>]*>', dom)
    loaded = tag and re.search(r'data-loaded="(\d+)"', tag.group(0))
    total = tag and re.search(r'data-total="(\d+)"', tag.group(0))
    return (int(loaded.group(1)), int(total.group(1))) if loaded and total else None


def ink(browser: str, page: Path, work: Path) -> tuple[float, float]:
    """Share of non-white pixels and the pixel standard deviation of a 1200x2000 screenshot."""
    shot = work / "shot.png"
    shot.unlink(missing_ok=True)
    _chromium(browser, page, work, f"--screenshot={shot}", "--window-size=1200,2000")
    rgb = matplotlib.image.imread(shot)[..., :3]
    assert rgb.shape[:2] == (2000, 1200)
    return float((rgb.min(axis=2) < 0.9).mean()), float(rgb.std())


def check_page(browser: str, page: Path, work: Path) -> list[str]:
    """What a reader would find wrong with the page: plots that did not decode, a blank screen."""
    problems = []
    counts = plots_loaded(browser, page, work)
    if counts is None:
        problems.append("the page's load check did not run")
    elif counts[1] == 0 or counts[0] < counts[1]:
        problems.append(f"{counts[0]} of {counts[1]} plots decoded")
    share, spread = ink(browser, page, work)
    if share < 0.02 or spread < 0.05:
        problems.append(f"blank screenshot ({share:.1%} non-white, std {spread:.3f})")
    return problems


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert main(["report", RUN, "--results", str(RESULTS), "--out", str(out)]) == 0
    return out / "report.html"


@pytest.mark.slow
def test_report_renders_every_plot(browser, report, tmp_path):
    pngs = len(list(report.parent.glob("report-*.png")))
    assert pngs >= 4
    assert plots_loaded(browser, report, tmp_path) == (pngs, pngs)
    assert check_page(browser, report, tmp_path) == []


@pytest.mark.slow
def test_a_corrupt_image_is_caught(browser, report, tmp_path):
    page = tmp_path / "corrupt.html"
    # the second plot: a PNG signature followed by garbage
    parts = report.read_text().split('src="data:image/png;base64,')
    parts[2] = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB" + "A" * 64 + parts[2][parts[2].index('"'):]
    page.write_text('src="data:image/png;base64,'.join(parts))
    n = len(parts) - 1  # the plots on the page
    assert n >= 4 and plots_loaded(browser, page, tmp_path) == (n - 1, n)
    assert check_page(browser, page, tmp_path) == [f"{n - 1} of {n} plots decoded"]


@pytest.mark.slow
def test_a_blank_page_is_caught(browser, tmp_path):
    page = tmp_path / "blank.html"
    page.write_text("<!doctype html><html><head><meta charset='utf-8'></head><body></body></html>")
    problems = check_page(browser, page, tmp_path)
    assert problems[0] == "the page's load check did not run" and problems[1].startswith("blank screenshot")
