"""Atomic output folders: write into a temporary sibling, rename into place only when everything succeeded.

Refuses (before any work) to write into the input checkpoint, inside it, or over an existing folder unless
`overwrite` is set; a failed run leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moeprune.errors import MoePruneError


def check_output(out: str | Path, inputs: list[Path], overwrite: bool) -> Path:
    """Validate an output folder path up front; returns it resolved."""
    out = Path(out).expanduser().resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or src in out.parents:
            raise MoePruneError(f"output {out} is the input checkpoint or inside it; moeprune never writes there. "
                                "Choose another --out folder.")
        if out in src.parents:
            raise MoePruneError(f"output {out} contains the input checkpoint {src}; choose another --out folder.")
    if out.exists() and not overwrite:
        raise MoePruneError(f"output {out} already exists; pass --overwrite to replace it or choose another --out.")
    if out.exists() and not out.is_dir():
        raise MoePruneError(f"output {out} exists and is not a folder.")
    if not out.parent.exists():
        raise MoePruneError(f"the parent folder of {out} does not exist; create it first.")
    return out


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out`, on failure it is removed."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
