"""The CLI log handler prints through tqdm.write, so a log line during a progress bar gets a line of its own."""

from __future__ import annotations

import io
import logging
import sys

import pytest
from tqdm import tqdm

from moeprune import log
from moeprune.log import configure, logger


@pytest.fixture
def fresh_logger():
    """The package logger without handlers, restored afterwards (configure() attaches only once)."""
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers.clear()
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def render(text: str) -> list[str]:
    """What a terminal shows for `text`: '\\r' returns to column 0 and overwrites, '\\n' starts a new line."""
    lines, line, col = [], [], 0
    for ch in text:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        else:
            line[col:col + 1] = [ch]
            col += 1
    return lines + ["".join(line).rstrip()]


def test_render_is_a_terminal():
    assert render("abc\rX\n") == ["Xbc", ""]  # '\r' overwrites from column 0
    assert render("\rbar  30%|###[moeprune] hi\n") == ["bar  30%|###[moeprune] hi", ""]  # glued
    assert render("\rbar  30%|###\r             \rhi\n") == ["hi", ""]  # cleared first: a line of its own


def test_handler_emits_through_tqdm_write(fresh_logger, monkeypatch):
    written = []
    monkeypatch.setattr(log.tqdm, "write", lambda s, file=None, **kw: written.append((s, file)))
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    configure()
    assert [type(h) for h in logger.handlers] == [log.TqdmHandler]
    logger.info("calibrating %s", "web")
    logger.debug("not shown without --verbose")
    assert written == [("[moeprune] calibrating web", sys.stderr)]


def test_log_line_during_a_bar_starts_on_its_own_line(fresh_logger, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    configure()
    bar = tqdm(total=10, desc="calibrating (layer 1/3)", file=sys.stderr, mininterval=0)
    bar.update(3)
    logger.info("hello from the library")
    bar.update(2)
    bar.close()
    screen = render(err.getvalue())
    assert "[moeprune] hello from the library" in screen  # a line of its own, nothing glued before or after
    assert any(s.startswith("calibrating (layer 1/3):  50%") for s in screen)  # the bar was redrawn after it
    # the same bar and line through a plain StreamHandler would be glued (what this handler fixes)
    glued = io.StringIO()
    plain = logging.StreamHandler(glued)
    plain.setFormatter(logging.Formatter("[moeprune] %(message)s"))
    bar = tqdm(total=10, desc="calibrating (layer 1/3)", file=glued, mininterval=0)
    bar.update(3)
    plain.emit(logging.LogRecord("moeprune", logging.INFO, __file__, 0, "hello from the library", None, None))
    bar.close()
    assert "[moeprune] hello from the library" not in render(glued.getvalue())
