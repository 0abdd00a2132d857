"""Verify of exports whose new weights are stored in bf16: the reference rounds the values a stage computes (merged
experts, weighted router rows) to the dtype the export stores them in before comparing (`stages/reference.py`).
Without that rounding, every merge of a bf16 checkpoint failed its own verification (M-SMoE 25 %: relative
6.0e-04 against a 1e-04 tolerance). References: the export's safetensors headers read directly, and the same verify
with the rounding switched off, which must fail (so the tests can)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from moeprune import api
from moeprune.calibration.run import CalibrateOptions
from moeprune.pipeline import verify as verify_module
from moeprune.pipeline.verify import verify
from moeprune.stages.reference import AS_COMPUTED
from moeprune.tiny import save_tiny
from textgen import write_words


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    save_tiny("qwen3_moe", root / "model", seed=1, dtype=torch.bfloat16, with_tokenizer=True)
    write_words(root / "web.txt")
    return root


def _calib(root) -> CalibrateOptions:
    return CalibrateOptions((f"web={root / 'web.txt'}",), samples=8, seq_len=64)


def _header_dtypes(folder) -> dict[str, set[torch.dtype]]:
    """The stored dtypes of the routed experts' and the routers' tensors, read from the safetensors files."""
    out: dict[str, set[torch.dtype]] = {"experts": set(), "router": set()}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                if ".mlp.experts." in key:
                    out["experts"].add(f.get_slice(key).get_dtype())
                elif ".mlp.gate." in key:
                    out["router"].add(f.get_slice(key).get_dtype())
    return out


@pytest.mark.parametrize("method, options, lazy", [
    ("msmoe", {}, False), ("msmoe", {"router": "weighted"}, False), ("dern", {"recombine": 0.5}, False),
    ("msmoe", {"router": "weighted"}, True),
])
def test_merges_of_a_bf16_checkpoint_verify(bf16, tmp_path, method, options, lazy, monkeypatch):
    applied, result = api.prune(bf16 / "model", tmp_path / "out", method=method, ratio=0.25, calib=_calib(bf16),
                                lazy=lazy, **options)
    assert result.passed, result.line()
    headers = _header_dtypes(applied.out)
    assert headers == {"experts": {"BF16"}, "router": {"BF16"}}, headers
    storage = verify_module.stored_dtypes(verify_module.Checkpoint.open(applied.out), _export_adapter(applied.out))
    assert (storage.experts, storage.router) == (torch.bfloat16, torch.bfloat16)
    # the same comparison with the rounding off: the float32 reference then differs beyond tolerance
    monkeypatch.setattr(verify_module, "stored_dtypes", lambda *a: AS_COMPUTED)
    unrounded = verify(bf16 / "model", applied.out, lazy=lazy)
    assert not unrounded.passed, unrounded.line()


def test_expert_removal_and_float32_exports_need_no_rounding(bf16, tmp_path, monkeypatch):
    """Expert removal writes no new value (kept bytes are the original's), and a float32 export stores what the
    float32 reference computes: both verify with the rounding off too."""
    applied, result = api.prune(bf16 / "model", tmp_path / "reap", method="reap", ratio=0.25, calib=_calib(bf16))
    assert result.passed
    monkeypatch.setattr(verify_module, "stored_dtypes", lambda *a: AS_COMPUTED)
    assert verify(bf16 / "model", applied.out).passed
    save_tiny("qwen3_moe", tmp_path / "f32", seed=1, with_tokenizer=True)
    applied, result = api.prune(tmp_path / "f32", tmp_path / "f32-out", method="msmoe", ratio=0.25,
                                calib=_calib(bf16))
    assert result.passed and _header_dtypes(applied.out)["experts"] == {"F32"}


def _export_adapter(folder):
    from moeprune.models import get_adapter

    ckpt = verify_module.Checkpoint.open(folder)
    return get_adapter(ckpt.config, weight_keys=ckpt.names())
