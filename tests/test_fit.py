"""The automatic choice between a whole-model load and layer by layer (`io/fit.py`), and the --lazy/--no-lazy flags."""

from __future__ import annotations

import argparse

import pytest
import torch

from moeprune.io import fit
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.load import load_model
from moeprune.tiny import save_tiny


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_bytes_equal_the_loaded_model(tmp_path, dtype):
    """Reference: the bytes of every tensor of the stock from_pretrained model (tied head counted once)."""
    path = save_tiny("qwen3_moe", tmp_path / "m", dtype=dtype)
    model = load_model(path)
    seen, want = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "inv_freq" not in n]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            want += t.numel() * t.element_size()
    ckpt = Checkpoint.open(path)
    assert fit.loaded_bytes(ckpt) == want
    # asked for float32, a bf16 checkpoint doubles
    assert fit.loaded_bytes(ckpt, "float32") == want * (4 // dtype.itemsize)


def _cgroup_tree(tmp_path, v1: bool, limit: str, used: int):
    proc = tmp_path / "cgroup"
    root = tmp_path / "sys"
    if v1:
        proc.write_text("4:memory:/job\n0::/\n")
        d = root / "memory" / "job"
        d.mkdir(parents=True)
        (d / "memory.limit_in_bytes").write_text(limit)
        (d / "memory.usage_in_bytes").write_text(str(used + 5 * 2**30))  # page cache included
        (d / "memory.stat").write_text(f"cache {5 * 2**30}\nrss {used}\ntotal_rss {used}\n")
    else:
        proc.write_text("0::/job\n")
        d = root / "unified" / "job"
        d.mkdir(parents=True)
        (d / "memory.max").write_text(limit)
        (d / "memory.current").write_text(str(used))
    return str(proc), str(root)


@pytest.mark.parametrize("v1", [True, False])
def test_cgroup_room(tmp_path, v1):
    proc, root = _cgroup_tree(tmp_path, v1, str(3 * 2**30), 2**30)
    assert fit._cgroup_room(proc, root) == 2 * 2**30  # v1: page cache is reclaimable, not counted


def test_unlimited_cgroup(tmp_path):
    proc, root = _cgroup_tree(tmp_path, False, "max", 2**30)
    assert fit._cgroup_room(proc, root) is None
    (tmp_path / "v1").mkdir()
    proc, root = _cgroup_tree(tmp_path / "v1", True, str(2**63 - 4096), 2**30)  # v1 writes "no limit" like this
    assert fit._cgroup_room(proc, root) is None


def test_choose_lazy(tmp_path, monkeypatch):
    ckpt = Checkpoint.open(save_tiny("qwen3_moe", tmp_path / "m"))
    need = fit.loaded_bytes(ckpt)
    assert fit.choose_lazy(True, ckpt) is True and fit.choose_lazy(False, ckpt) is False  # flags win
    monkeypatch.setattr(fit, "available", lambda: int(need * fit.HEADROOM) + fit.RESERVE + 1)
    assert fit.choose_lazy(None, ckpt) is False
    monkeypatch.setattr(fit, "available", lambda: int(need * fit.HEADROOM) + fit.RESERVE - 1)
    assert fit.choose_lazy(None, ckpt) is True


def test_lazy_flag_has_three_states():
    from moeprune.cli.common import add_lazy_flag

    p = argparse.ArgumentParser()
    add_lazy_flag(p)
    assert p.parse_args([]).lazy is None
    assert p.parse_args(["--lazy"]).lazy is True
    assert p.parse_args(["--no-lazy"]).lazy is False
