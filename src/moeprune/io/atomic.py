"""Atomic output folders: write into a temporary sibling, rename into place only when everything succeeded.

Refuses (before any work) to write into the input checkpoint, inside it, or over an existing folder unless
`overwrite` is set; even then only an empty folder or a previous moeprune output (see `OUTPUT_MARKERS`) is
replaced, never a folder of someone else's files. A failed run leaves nothing behind. The new folder gets the
permissions of any folder the user creates (0o777 minus the umask), not the private 0o700 of a temp folder, and its
files those of any new file (0o666 minus the umask; safetensors writes 0o600), so a serving container running as
another user can read the checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moeprune.errors import MoePruneError

# A folder holding all the files of one of these groups is a previous moeprune output that --overwrite may replace:
# prune / apply / merge / neuron exports (report and plans), analyze, compare, the demo's report and the testbed.
# Generic names (report.json) only count together with a companion file. Add the marker of every new output here.
OUTPUT_MARKERS: tuple[tuple[str, ...], ...] = (
    ("moeprune_report.json",),
    ("moeprune_recipe.json",),
    ("moeprune_merge.json",),
    ("moeprune_neurons.json",),
    ("analysis.json", "report.json"),
    ("compare.json", "compare.md"),
    ("report.json", "report.md"),
    ("testbed.json",),
    ("taskpack.json",),
)


def is_moeprune_output(folder: Path) -> bool:
    """True when `folder` holds every file of one `OUTPUT_MARKERS` group."""
    return any(all((folder / name).is_file() for name in group) for group in OUTPUT_MARKERS)


def check_replaceable(out: Path) -> None:
    """`out` (an existing folder) may be replaced only when it is empty or a previous moeprune output."""
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    if entries and not is_moeprune_output(out):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise MoePruneError(f"output {out} holds files that moeprune did not write ({shown}); --overwrite replaces "
                            "only an empty folder or a previous moeprune output. Choose another --out, or move "
                            "those files away first.")


def check_output_file(path: str | Path, suffix: str | None, overwrite: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Validate an output *file* up front (resolved path returned): it ends in `suffix` (when given), its folder
    exists, it is not inside an input checkpoint, it is not a folder, and it exists only with `overwrite`."""
    path = Path(path).expanduser().resolve()
    if suffix is not None and path.suffix != suffix:
        raise MoePruneError(f"--out {path}: name the file *{suffix} (the format written).")
    for src in inputs:
        if Path(src).resolve() in path.parents:
            raise MoePruneError(f"--out {path} is inside the input {src}; moeprune never writes there.")
    if not path.parent.is_dir():
        raise MoePruneError(f"cannot write {path}: folder {path.parent} does not exist; create it first.")
    if path.is_dir():
        raise MoePruneError(f"--out {path} is a folder; give the path of the file to write.")
    if path.exists() and not overwrite:
        raise MoePruneError(f"{path} already exists; pass --overwrite to replace it or choose another --out.")
    return path


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
    if out.exists():
        check_replaceable(out)
    if not out.parent.exists():
        raise MoePruneError(f"the parent folder of {out} does not exist; create it first.")
    return out


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out`, on failure it is removed."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0o700: readable by this user only
        yield tmp
        normal_modes(tmp)
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


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it; it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_modes(folder: Path) -> None:
    """Give every file and folder below `folder` the mode the umask gives new ones (0o666 / 0o777 & ~umask; files
    keep their execute bits). safetensors' `save_file` (so `save_pretrained`) writes weights as 0o600, which a
    server running as another user could not read."""
    mask = current_umask()
    for p in folder.rglob("*"):
        if p.is_symlink():
            continue
        executable = p.is_dir() or p.stat().st_mode & 0o111
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)
