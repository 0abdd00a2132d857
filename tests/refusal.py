"""Assertions for refusals: the right MoePruneError (or CLI exit 2), input unchanged, nothing left behind."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from moeprune.cli import main
from moeprune.errors import MoePruneError


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (sha256) and folder under `folder`, by relative path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def leftovers(out: Path) -> list[str]:
    """Temporary or backup siblings of `out` (`.out.tmp-*`, `.out.old-*`) and `*.tmp` files."""
    parent = out.parent
    if not parent.exists():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.") or p.name.endswith(".tmp"))


def assert_refused(call, match: str, *, inputs: list[Path], out: Path | None) -> MoePruneError:
    """call() raises MoePruneError matching `match`; inputs unchanged; `out` and temp siblings absent."""
    before = {p: snapshot(p) for p in inputs if p.exists()}
    out_existed = out is not None and out.exists()
    with pytest.raises(MoePruneError, match=match) as info:
        call()
    _assert_nothing_changed(before, out, out_existed)
    return info.value


def assert_cli_refused(argv: list, patterns: list[str], capsys, *, inputs: list[Path], out: Path | None) -> str:
    """main(argv) returns 2 with `moeprune: error: ...` on stderr (matching every pattern) and no traceback."""
    before = {p: snapshot(p) for p in inputs if p.exists()}
    out_existed = out is not None and out.exists()
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert captured.err.startswith("moeprune: error: "), captured.err
    assert "Traceback" not in captured.err
    for pattern in patterns:
        assert re.search(pattern, captured.err), (pattern, captured.err)
    _assert_nothing_changed(before, out, out_existed)
    return captured.err


def _assert_nothing_changed(before: dict, out: Path | None, out_existed: bool) -> None:
    """Inputs hash as before; a new `out` was not created; no temporary siblings were left."""
    for p, snap in before.items():
        assert snapshot(p) == snap, f"input {p} was modified"
    if out is not None:
        if not out_existed:
            assert not out.exists(), f"{out} was left behind"
        assert leftovers(out) == []
