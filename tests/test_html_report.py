"""Static HTML report: structure (html.parser), escaping, validation, and a real render in headless Chromium.

The Chromium test never skips: without a chromium binary it fails and says how to install one. Its screenshot is kept
under tests/artifacts/ (git-ignored) for a human to look at.
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure  # Agg canvas, no pyplot / global backend state
from matplotlib.image import imread

from moeprune import __version__
from moeprune.analysis.html import format_cell, render_html
from moeprune.errors import MoePruneError

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_TIMEOUT_S = 60
# distinctive plot colours (matplotlib's tab:red / tab:green) looked for in the screenshot to prove the PNGs loaded
RED = (214, 39, 40)
GREEN = (44, 160, 44)
SCRIPT_TEXT = "Note: <script>alert(1)</script> must stay text & not run."


# ---------------------------------------------------------------- fixtures


def _bar_png(path: Path, color: tuple[int, int, int], title: str) -> None:
    fig = Figure(figsize=(6.4, 2.6), dpi=100)
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    ax.bar(np.arange(16), rng.uniform(0.2, 1.0, 16), color=np.array(color) / 255.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("share of tokens")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)


def _report(out: Path) -> dict:
    _bar_png(out / "usage.png", RED, "Expert usage, layer 3")
    (out / "figs").mkdir()
    _bar_png(out / "figs" / "balance.png", GREEN, "Load balance after pruning")
    return {
        "title": "Routing analysis — Tiny-MoE <demo>",
        "subtitle": "Calibration: 64 sequences × 128 tokens & 8 experts/layer",
        "sections": [
            {
                "id": "usage",
                "title": "Expert usage",
                "paragraphs": ["Tokens routed to each expert, summed over the calibration set.", SCRIPT_TEXT],
                "images": [{"file": "usage.png", "caption": "Usage per expert (layer 3)"}],
                "tables": [
                    {
                        "caption": "Per-layer statistics",
                        "columns": ["layer", "tokens", "entropy", "CV", "note"],
                        "rows": [
                            [0, 8192, 2.0794415416798357, 0.123456, "balanced"],
                            [1, 1234567, 1.5, None, "<b>hot</b> expert 5"],
                            [2, 0, 12345.678, 1e-05, None],
                            [3, -4, 3.0, -0.5, "a & b"],
                        ],
                    }
                ],
            },
            {
                "id": "lrc",
                "title": "Local routing consistency",
                "paragraphs": ["SRP and SCH per layer; higher means more cacheable routing."],
                "images": [],
                "tables": [{"caption": "", "columns": ["layer", "SRP"], "rows": [[0, 0.5], [1, 0.25]]}],
            },
        ],
        "results": [
            {
                "id": "prune-compare",
                "title": "Prune vs. original",
                "paragraphs": ["Keep 6 of 8 experts per layer."],
                "images": [{"file": "figs/balance.png", "caption": "Balance after pruning"}],
                "tables": [],
            }
        ],
    }


# The table cells as they must read (independent of format_cell): 4 significant digits, None -> em dash.
EXPECTED_ROWS = [
    ["0", "8192", "2.079", "0.1235", "balanced"],
    ["1", "1234567", "1.5", "\u2014", "<b>hot</b> expert 5"],
    ["2", "0", "1.235e+04", "1e-05", "\u2014"],
    ["3", "-4", "3", "-0.5", "a & b"],
]
EXPECTED_NUM = [
    [True, True, True, True, False],
    [True, True, True, False, False],
    [True, True, True, True, False],
    [True, True, True, True, False],
]


class _Dom(HTMLParser):
    """Collects what the checks need from the rendered page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: list[str] = []
        self.toc_links: list[str] = []
        self.imgs: list[dict[str, str | None]] = []
        self.tags: list[str] = []
        self.tables: list[dict] = []
        self.paragraphs: list[str] = []
        self.headings: list[str] = []
        self.footer = ""
        self._stack: list[str] = []
        self._text: list[str] | None = None
        self._cell_cls: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if a.get("id"):
            self.ids.append(a["id"])
        if tag == "a" and "nav" in self._stack:
            self.toc_links.append(a.get("href") or "")
        if tag == "img":
            self.imgs.append(a)
        if tag == "table":
            self.tables.append({"caption": "", "head": [], "rows": [], "num": []})
        if tag == "tr" and self.tables:
            if "tbody" in self._stack:
                self.tables[-1]["rows"].append([])
                self.tables[-1]["num"].append([])
        if tag in ("td", "th", "p", "h1", "h2", "caption", "footer"):
            self._text = []
            self._cell_cls = a.get("class")
        if tag not in ("img", "meta", "br"):
            self._stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th", "p", "h1", "h2", "caption", "footer") and self._text is not None:
            text = "".join(self._text)
            if tag == "td":
                self.tables[-1]["rows"][-1].append(text)
                self.tables[-1]["num"][-1].append(self._cell_cls == "num")
            elif tag == "th":
                self.tables[-1]["head"].append(text)
            elif tag == "caption":
                self.tables[-1]["caption"] = text
            elif tag == "p":
                self.paragraphs.append(text)
            elif tag == "footer":
                self.footer = text
            else:
                self.headings.append(text)
            self._text = None
        if self._stack and self._stack[-1] == tag:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


def _parse(path: Path) -> _Dom:
    dom = _Dom()
    dom.feed(path.read_text(encoding="utf-8"))
    dom.close()
    return dom


@pytest.fixture
def rendered(tmp_path: Path) -> tuple[dict, Path]:
    out = tmp_path / "report"
    out.mkdir()
    report = _report(out)
    return report, render_html(report, out)


# ---------------------------------------------------------------- structure


def test_structure_links_images_tables_escaping(rendered: tuple[dict, Path]) -> None:
    report, path = rendered
    assert path == path.parent / "report.html" and path.is_file()
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".report.")] == []  # no temp file left
    dom = _parse(path)

    sections = report["sections"] + report["results"]
    for sec in sections:
        assert dom.ids.count(sec["id"]) == 1, sec["id"]
        assert f"#{sec['id']}" in dom.toc_links, sec["id"]
        assert sec["title"] in dom.headings
    for href in dom.toc_links:
        assert href.startswith("#") and href[1:] in dom.ids, href
    assert dom.headings[0] == report["title"]  # h1, unescaped back to the original text

    srcs = [img["src"] for img in dom.imgs]
    assert srcs == ["usage.png", "figs/balance.png"]
    for img in dom.imgs:
        assert (path.parent / img["src"]).is_file()
        assert img["alt"] in ("Usage per expert (layer 3)", "Balance after pruning")

    first = dom.tables[0]
    assert first["caption"] == "Per-layer statistics"
    assert first["head"] == ["layer", "tokens", "entropy", "CV", "note"]
    assert first["rows"] == EXPECTED_ROWS
    assert first["num"] == EXPECTED_NUM
    assert dom.tables[1]["rows"] == [["0", "0.5"], ["1", "0.25"]]

    # the paragraph's <script> is text, not an element; nothing executable or remote in the file
    assert "script" not in dom.tags
    assert SCRIPT_TEXT in dom.paragraphs
    raw = path.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    assert "<script" not in raw.lower()
    for banned in ("http://", "https://", "<link", "@import", "url("):
        assert banned not in raw
    assert "td.num" in raw and "text-align: right" in raw and "max-width: 100%" in raw
    assert f"moeprune {__version__}" in dom.footer and "Generated" in dom.footer


def test_without_results_and_rerender_replaces(tmp_path: Path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    report = _report(out)
    report.pop("results")
    path = render_html(report, out)
    dom = _parse(path)
    assert "prune-compare" not in dom.ids and "results" not in dom.ids
    report["title"] = "Second run"
    assert render_html(report, out) == path
    assert _parse(path).headings[0] == "Second run"
    assert sorted(p.name for p in out.iterdir()) == ["figs", "report.html", "usage.png"]


def test_format_cell() -> None:
    assert format_cell(None) == "\u2014"
    assert format_cell(3) == "3"
    assert format_cell(0.000123456) == "0.0001235"
    assert format_cell(float("nan")) == "NaN"
    assert format_cell("x") == "x"


# ---------------------------------------------------------------- validation


def _mutations():
    def missing_image(r):
        r["sections"][0]["images"][0]["file"] = "nope.png"

    def escaping_image(r):
        r["sections"][0]["images"][0]["file"] = "../outside.png"

    def absolute_image(r):
        r["sections"][0]["images"][0]["file"] = "/etc/hostname"

    def no_title(r):
        del r["title"]

    def sections_not_list(r):
        r["sections"] = {"id": "x"}

    def bad_row_len(r):
        r["sections"][0]["tables"][0]["rows"][0].append(1)

    def bad_cell(r):
        r["sections"][0]["tables"][0]["rows"][0][0] = [1, 2]

    def dup_id(r):
        r["results"][0]["id"] = "usage"

    def bad_id(r):
        r["sections"][1]["id"] = 'x" onclick="y'

    def paragraph_not_str(r):
        r["sections"][1]["paragraphs"] = [1]

    return [
        (missing_image, "not found"),
        (escaping_image, "escapes"),
        (absolute_image, "relative"),
        (no_title, "'title'"),
        (sections_not_list, "list"),
        (bad_row_len, "columns"),
        (bad_cell, "cells must be"),
        (dup_id, "duplicate"),
        (bad_id, "id"),
        (paragraph_not_str, "string"),
    ]


@pytest.mark.parametrize(("mutate", "needle"), _mutations(), ids=lambda m: getattr(m, "__name__", ""))
def test_malformed_report_refused(tmp_path: Path, mutate, needle: str) -> None:
    out = tmp_path / "r"
    out.mkdir()
    (tmp_path / "outside.png").write_bytes(b"")
    report = _report(out)
    mutate(report)
    with pytest.raises(MoePruneError, match=needle):
        render_html(report, out)
    assert not (out / "report.html").exists()


def test_not_a_dict_refused(tmp_path: Path) -> None:
    with pytest.raises(MoePruneError, match="must be a dict"):
        render_html(["title"], tmp_path)  # type: ignore[arg-type]


# ---------------------------------------------------------------- headless Chromium


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail(
            "Chromium is not installed, and this test renders the HTML report in headless Chromium. "
            "Install it with `bash scripts/install.sh dev` (runs `apt-get install -y chromium` on Debian/Ubuntu), "
            "or put a `chromium`/`chromium-browser` binary on PATH."
        )
    return exe


def _run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,2000",
        *args,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"headless Chromium did not finish within {CHROMIUM_TIMEOUT_S} s: {' '.join(cmd)}")
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def _has_colour(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 30, min_pixels: int = 200) -> bool:
    diff = np.abs(img[..., :3].astype(int) - np.array(rgb)).max(axis=-1)
    return int((diff <= tol).sum()) >= min_pixels


def test_renders_in_headless_chromium(rendered: tuple[dict, Path], tmp_path: Path) -> None:
    exe = _chromium()
    report, path = rendered
    url = path.resolve().as_uri()

    shot = tmp_path / "screenshot.png"
    _run_chromium(exe, tmp_path / "profile-shot", f"--screenshot={shot}", url)
    assert shot.is_file() and shot.stat().st_size > 10_000, "Chromium wrote no (or an empty) screenshot"
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "html_report_chromium.png")

    img = imread(shot)  # float RGBA in [0, 1]
    img = (img * 255).round().astype(np.uint8) if img.dtype != np.uint8 else img
    assert img.shape[0] == 2000 and img.shape[1] == 1280, img.shape
    rgb = img[..., :3].reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 50, "screenshot is (nearly) a single colour: nothing rendered"
    # dark text pixels in the top band (title, TOC) and both plots' bar colours: the PNGs were loaded and drawn
    assert (img[:300, :, :3].max(axis=-1) < 80).sum() > 500, "no dark text in the page header"
    assert _has_colour(img, RED), "the usage plot (red bars) is not visible in the screenshot"
    assert _has_colour(img, GREEN), "the balance plot (green bars) is not visible in the screenshot"

    proc = _run_chromium(exe, tmp_path / "profile-dom", "--dump-dom", url)
    dom = _Dom()
    dom.feed(proc.stdout)
    dom.close()
    for sec in report["sections"] + report["results"]:
        assert sec["title"] in dom.headings, sec["title"]
        assert sec["id"] in dom.ids
    assert [i["src"] for i in dom.imgs] == ["usage.png", "figs/balance.png"]
    assert "script" not in dom.tags
    assert SCRIPT_TEXT in dom.paragraphs
    assert dom.tables[0]["rows"] == EXPECTED_ROWS
