"""Output folders: --overwrite replaces only an empty folder or a previous moeprune output (never someone else's
files), and the new folder gets the permissions the user's umask gives any folder (not mkdtemp's 0o700)."""

from __future__ import annotations

import os
import stat

import pytest

from moeprune import api
from moeprune.errors import MoePruneError
from moeprune.io.atomic import OUTPUT_MARKERS, atomic_dir, check_output
from moeprune.tiny import save_tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("out_folder") / "m", seed=1)


def test_overwrite_refuses_an_unrelated_folder(model, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"):
        (out / name).write_text("mine")
    (out / "sub").mkdir()
    with pytest.raises(MoePruneError, match=r"holds files that moeprune did not write \(a\.jpg, b\.jpg, c\.jpg, "
                                            r"d\.jpg, e\.jpg and 2 more\).*Choose another --out"):
        api.prune(model, out, method="aimer", ratio=0.25, overwrite=True, run_verify=False)
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg", "sub"]
    assert (out / "a.jpg").read_text() == "mine"
    (out / "report.json").write_text("{}")  # a generic name alone does not make it moeprune's
    with pytest.raises(MoePruneError, match=r"did not write \(a\.jpg"):
        check_output(out, [model], overwrite=True)


@pytest.mark.parametrize("marker", [None, *OUTPUT_MARKERS], ids=lambda m: "empty" if m is None else "+".join(m))
def test_overwrite_replaces_an_empty_folder_or_a_previous_output(model, tmp_path, marker):
    out = tmp_path / "out"
    out.mkdir()
    for name in marker or ():
        (out / name).write_text("{}")
    if marker:
        (out / "extra.bin").write_bytes(b"\0")  # anything else in a previous output goes with it
    assert check_output(out, [model], overwrite=True) == out.resolve()
    api.prune(model, out, method="aimer", ratio=0.25, overwrite=True, run_verify=False)
    assert not (out / "extra.bin").exists() and (out / "moeprune_report.json").is_file()


def test_a_real_previous_output_is_replaced(model, tmp_path):
    out = tmp_path / "out"
    api.prune(model, out, method="aimer", ratio=0.25, run_verify=False)
    api.prune(model, out, method="aimer", ratio=0.5, overwrite=True, run_verify=False)
    assert '"ratio": 0.5' in (out / "moeprune_report.json").read_text()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_output_folder_mode_follows_the_umask(model, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "plain") as tmp:
            (tmp / "x.txt").write_text("x")
            (tmp / "private.bin").write_bytes(b"x")
            (tmp / "private.bin").chmod(0o600)  # as safetensors' save_file leaves its files
        api.prune(model, tmp_path / "pruned", method="aimer", ratio=0.25, run_verify=False)  # save_pretrained
        api.prune(model, tmp_path / "streamed", method="aimer", ratio=0.25, run_verify=False, streaming=True)
        (tmp_path / "reference").mkdir()  # what any folder and file made by the user get
        (tmp_path / "reference" / "file").write_text("x")
    finally:
        os.umask(old)
    file_mode = stat.S_IMODE((tmp_path / "reference" / "file").stat().st_mode)
    assert file_mode == mode & 0o666
    for name in ("plain", "pruned", "streamed", "reference"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
        for f in (tmp_path / name).rglob("*"):  # files get the file mode, folders (moeprune_plans/) the folder's
            assert stat.S_IMODE(f.stat().st_mode) == (mode if f.is_dir() else file_mode), f
    assert {f.name for f in (tmp_path / "pruned").iterdir()} >= {"model.safetensors", "config.json"}
