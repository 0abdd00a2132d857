"""Self-contained static HTML report for routing analysis (and prune/compare results).

`render_html(report, out_dir)` writes `out_dir/report.html`: one file, inline CSS, no JavaScript, no network
resources; images are PNGs beside it, referenced by relative path. Every text from the report dict is HTML-escaped.

Report schema::

    {"title": str, "subtitle": str,
     "sections": [{"id": str, "title": str, "paragraphs": [str, ...],
                   "images": [{"file": "usage.png", "caption": str}],
                   "tables": [{"caption": str, "columns": [str], "rows": [[str | int | float | None, ...]]}]}],
     "results": [...same section list, optional...]}
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from moeprune import __version__
from moeprune.errors import MoePruneError

__all__ = ["format_cell", "render_html"]

_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]*$")

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #1d2330;
  font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 960px; margin: 0 auto; padding: 2rem 2.5rem 1rem; background: #fff; min-height: 100vh; }
header h1 { margin: 0 0 .25rem; font-size: 1.9rem; line-height: 1.2; }
header p.subtitle { margin: 0 0 1.5rem; color: #566; font-size: 1.05rem; }
nav.toc { border: 1px solid #dde1e7; background: #f8f9fb; border-radius: 6px; padding: .75rem 1.25rem; }
nav.toc h2 { margin: 0 0 .35rem; font-size: 1rem; text-transform: uppercase; letter-spacing: .05em; color: #566; }
nav.toc ol { margin: 0; padding-left: 1.4rem; }
nav.toc a { color: #1f5fbf; text-decoration: none; }
nav.toc a:hover { text-decoration: underline; }
h2.part { margin: 2.5rem 0 0; padding-bottom: .2rem; border-bottom: 2px solid #1d2330; font-size: 1.35rem; }
section { margin-top: 2rem; }
section h2 { margin: 0 0 .6rem; font-size: 1.3rem; border-bottom: 1px solid #dde1e7; padding-bottom: .2rem; }
p { margin: .5rem 0; }
figure { margin: 1rem 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eceef2; }
figcaption, table caption { color: #566; font-size: .9rem; margin-top: .35rem; }
table caption { caption-side: top; text-align: left; margin: 0 0 .35rem; }
.table-wrap { overflow-x: auto; margin: 1rem 0; }
table { border-collapse: collapse; font-size: .92rem; }
th, td { padding: .3rem .7rem; border-bottom: 1px solid #e3e6eb; text-align: left; vertical-align: top; }
th { background: #f1f3f6; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.none { color: #999; text-align: center; }
tbody tr:nth-child(even) td { background: #fafbfc; }
footer { margin-top: 3rem; padding: .75rem 0 1rem; border-top: 1px solid #dde1e7; color: #778; font-size: .8rem; }
"""


def format_cell(value: Any) -> str:
    """Text shown for a table cell: ints as-is, floats with 4 significant digits, None as an em dash."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "\u221e" if value > 0 else "\u2212\u221e"
        return f"{value:.4g}"
    return str(value)


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------- validation


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise MoePruneError(f"HTML report: {where}: {msg}")


def _check_str(obj: dict, key: str, where: str) -> str:
    _need(key in obj, where, f"missing key {key!r}")
    _need(isinstance(obj[key], str), where, f"{key!r} must be a string, got {type(obj[key]).__name__}")
    return obj[key]


def _check_list(obj: dict, key: str, where: str, default_empty: bool = True) -> list:
    if key not in obj and default_empty:
        return []
    _need(key in obj, where, f"missing key {key!r}")
    _need(isinstance(obj[key], list), where, f"{key!r} must be a list, got {type(obj[key]).__name__}")
    return obj[key]


def _check_image(img: Any, where: str, out_dir: Path) -> None:
    _need(isinstance(img, dict), where, f"must be a dict with 'file' and 'caption', got {type(img).__name__}")
    rel = _check_str(img, "file", where)
    _check_str(img, "caption", where)
    _need(rel.strip() != "", where, "'file' is empty")
    p = Path(rel)
    _need(not p.is_absolute() and "\\" not in rel, where, f"image path {rel!r} must be relative to the output folder")
    root = out_dir.resolve()
    target = (root / p).resolve()
    _need(target == root or root in target.parents, where, f"image path {rel!r} escapes the output folder {out_dir}")
    _need(target.is_file(), where, f"image file {rel!r} not found in {out_dir} (write the PNG before rendering)")


def _check_table(tab: Any, where: str) -> None:
    _need(isinstance(tab, dict), where, f"must be a dict with 'caption', 'columns', 'rows', got {type(tab).__name__}")
    _check_str(tab, "caption", where)
    cols = _check_list(tab, "columns", where, default_empty=False)
    _need(len(cols) > 0, where, "'columns' is empty")
    for c in cols:
        _need(isinstance(c, str), where, f"column names must be strings, got {c!r}")
    rows = _check_list(tab, "rows", where, default_empty=False)
    for r, row in enumerate(rows):
        _need(isinstance(row, list | tuple), f"{where}.rows[{r}]", f"must be a list, got {type(row).__name__}")
        _need(
            len(row) == len(cols), f"{where}.rows[{r}]", f"has {len(row)} cells but the table has {len(cols)} columns"
        )
        for c, cell in enumerate(row):
            _need(
                cell is None or isinstance(cell, str | int | float),
                f"{where}.rows[{r}][{c}]",
                f"cells must be str, int, float or None, got {type(cell).__name__}",
            )


def _check_sections(sections: Any, key: str, out_dir: Path, seen_ids: set[str]) -> None:
    _need(isinstance(sections, list), "report", f"{key!r} must be a list of sections, got {type(sections).__name__}")
    for i, sec in enumerate(sections):
        where = f"{key}[{i}]"
        _need(isinstance(sec, dict), where, f"must be a dict, got {type(sec).__name__}")
        sid = _check_str(sec, "id", where)
        _need(
            bool(_ID_RE.match(sid)),
            where,
            f"id {sid!r} must start with a letter and contain only letters, digits, '-', '_', '.', ':'",
        )
        _need(sid not in seen_ids, where, f"duplicate section id {sid!r}")
        seen_ids.add(sid)
        _check_str(sec, "title", where)
        for j, par in enumerate(_check_list(sec, "paragraphs", where)):
            _need(isinstance(par, str), f"{where}.paragraphs[{j}]", f"must be a string, got {type(par).__name__}")
        for j, img in enumerate(_check_list(sec, "images", where)):
            _check_image(img, f"{where}.images[{j}]", out_dir)
        for j, tab in enumerate(_check_list(sec, "tables", where)):
            _check_table(tab, f"{where}.tables[{j}]")


def _validate(report: Any, out_dir: Path) -> None:
    _need(isinstance(report, dict), "report", f"must be a dict, got {type(report).__name__}")
    _check_str(report, "title", "report")
    _need("subtitle" not in report or isinstance(report["subtitle"], str), "report", "'subtitle' must be a string")
    _need("sections" in report, "report", "missing key 'sections'")
    seen: set[str] = set()
    _check_sections(report["sections"], "sections", out_dir, seen)
    if report.get("results") is not None:
        _check_sections(report["results"], "results", out_dir, seen)


# ---------------------------------------------------------------- rendering


def _render_table(tab: dict) -> list[str]:
    cols, rows = tab["columns"], tab["rows"]
    # a column is numeric (right-aligned header) when every non-None cell is a number
    num_col = [
        any(_is_num(r[c]) for r in rows) and all(r[c] is None or _is_num(r[c]) for r in rows) for c in range(len(cols))
    ]
    out = ['<div class="table-wrap"><table>']
    if tab["caption"]:
        out.append(f"<caption>{escape(tab['caption'])}</caption>")
    num_cls = ' class="num"'
    head = "".join(f"<th{num_cls if num_col[c] else ''}>{escape(name)}</th>" for c, name in enumerate(cols))
    out.append(f"<thead><tr>{head}</tr></thead><tbody>")
    for row in rows:
        cells = []
        for cell in row:
            cls = ' class="num"' if _is_num(cell) else (' class="none"' if cell is None else "")
            cells.append(f"<td{cls}>{escape(format_cell(cell))}</td>")
        out.append(f"<tr>{''.join(cells)}</tr>")
    out.append("</tbody></table></div>")
    return out


def _render_section(sec: dict) -> list[str]:
    sid = escape(sec["id"], quote=True)
    out = [f'<section id="{sid}">', f"<h2>{escape(sec['title'])}</h2>"]
    for par in sec.get("paragraphs", []):
        out.append(f"<p>{escape(par)}</p>")
    for img in sec.get("images", []):
        src = escape(Path(img["file"]).as_posix(), quote=True)
        cap = img["caption"]
        out.append(
            f'<figure><img src="{src}" alt="{escape(cap, quote=True)}" loading="eager">'
            + (f"<figcaption>{escape(cap)}</figcaption>" if cap else "")
            + "</figure>"
        )
    for tab in sec.get("tables", []):
        out.extend(_render_table(tab))
    out.append("</section>")
    return out


def _toc(sections: list[dict], results: list[dict]) -> list[str]:
    def items(secs: list[dict]) -> list[str]:
        return [f'<li><a href="#{escape(s["id"], quote=True)}">{escape(s["title"])}</a></li>' for s in secs]

    out = ['<nav class="toc" aria-label="Contents"><h2>Contents</h2><ol>']
    out.extend(items(sections))
    if results:
        out.append('<li><a href="#results">Results</a><ol>')
        out.extend(items(results))
        out.append("</ol></li>")
    out.append("</ol></nav>")
    return out


def _document(report: dict, generated: str) -> str:
    sections = report["sections"]
    results = report.get("results") or []
    title = escape(report["title"])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # no scripts, no remote resources; images only from this folder
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' file: data:; "
        "style-src 'unsafe-inline'\">",
        f'<meta name="generator" content="moeprune {escape(__version__, quote=True)}">',
        f"<title>{title}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        "<header>",
        f"<h1>{title}</h1>",
    ]
    if report.get("subtitle"):
        parts.append(f'<p class="subtitle">{escape(report["subtitle"])}</p>')
    parts.append("</header>")
    parts.extend(_toc(sections, results))
    for sec in sections:
        parts.extend(_render_section(sec))
    if results:
        parts.append('<h2 class="part" id="results">Results</h2>')
        for sec in results:
            parts.extend(_render_section(sec))
    parts += [
        f"<footer>Generated by moeprune {escape(__version__)} on {escape(generated)}.</footer>",
        "</main>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(parts)


def render_html(report: dict, out_dir: Path) -> Path:
    """Validate `report`, write `out_dir/report.html` atomically and return its path.

    Image files are relative to `out_dir` and must already exist there. Raises MoePruneError on a malformed report.
    """
    out_dir = Path(out_dir)
    _need(out_dir.is_dir(), "out_dir", f"{out_dir} is not an existing folder")
    _validate(report, out_dir)
    results = report.get("results") or []
    _need(
        not results or all(s["id"] != "results" for s in report["sections"] + results),
        "report",
        "section id 'results' is reserved when a 'results' list is given",
    )
    generated = datetime.now(timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    text = _document(report, generated)
    target = out_dir / "report.html"
    fd, tmp = tempfile.mkstemp(prefix=".report.", suffix=".html.tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
