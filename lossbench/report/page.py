"""One report, three forms: a standalone HTML page (plots embedded as data URIs, so it opens from a file
or a CI artifact with no server), a Markdown file (a job summary, a pull-request comment) and the PNGs.

`lossbench report` and `lossbench history` build a list of Sections; write_report renders them.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Section:
    title: str
    text: str = ""                      # what the plot shows, how to read it; a newline starts a paragraph
    figure: object | None = None        # a matplotlib Figure (seaborn draws on one); saved as PNG
    table: pd.DataFrame | None = None   # the plot's numbers, shown under it
    png: str | None = field(default=None, init=False)  # set by write_report


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    pngs: list[Path]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "plot"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1200px; color: #222; }
div.table { overflow-x: auto; margin: 0.5em 0 1.5em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; }
img { max-width: 100%; }
dl.header { display: grid; grid-template-columns: max-content auto; gap: 2px 1em; }
dl.header dt { font-weight: bold; }
#plots-loaded { margin-top: 2em; color: #555; }
#plots-loaded.warn { color: #b00; font-weight: bold; }
"""

# Counts the plots the browser decoded, on the page itself: a reader sees a broken image at once, and
# tests/test_report_browser.py reads the same line from headless Chromium's DOM.
_LOAD_CHECK = """<p id="plots-loaded">plots not checked (JavaScript is off)</p><script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var line = document.getElementById("plots-loaded");
  line.textContent = ok + " of " + imgs.length + " plots loaded" +
    (ok < imgs.length ? " - WARNING: " + (imgs.length - ok) + " failed to decode" : "");
  line.setAttribute("data-loaded", ok);
  line.setAttribute("data-total", imgs.length);
  if (ok < imgs.length) line.className = "warn";
});
</script>"""


def write_report(out_dir: str | Path, name: str, title: str, header: dict[str, str],
                 sections: list[Section]) -> ReportFiles:
    """Writes out_dir/name.html, out_dir/name.md and out_dir/name-<section>.png per figure."""
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{name}-*.png"):  # an earlier report's plots would pass for this one's
        stale.unlink()
    pngs: list[Path] = []
    for i, s in enumerate(sections):
        if s.figure is not None:
            path = out / f"{name}-{i:02d}-{_slug(s.title)}.png"
            s.figure.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(s.figure)
            s.png = path.name
            pngs.append(path)

    head = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in header.items())
    body = [f"<h1>{html.escape(title)}</h1>", f'<dl class="header">{head}</dl>']
    md = [f"# {title}", "", *(f"- **{k}**: {v}" for k, v in header.items()), ""]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        md += [f"## {s.title}", ""]
        for para in filter(None, s.text.split("\n")):
            body.append(f"<p>{html.escape(para)}</p>")
            md += [para, ""]
        if s.png:
            data = base64.b64encode((out / s.png).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(s.title)}" src="data:image/png;base64,{data}">')
            md += [f"![{s.title}]({s.png})", ""]
        if s.table is not None and len(s.table):
            # a wide table scrolls sideways rather than squeezing its columns into a column of words
            body.append(f'<div class="table">{s.table.to_html(index=False, na_rep="-", border=0)}</div>')
            md += [s.table.to_markdown(index=False), ""]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}{_LOAD_CHECK}</body></html>")
    html_path, md_path = out / f"{name}.html", out / f"{name}.md"
    html_path.write_text(page, encoding="utf-8")
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return ReportFiles(html_path, md_path, pngs)
