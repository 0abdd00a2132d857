"""Broken quantized checkpoints are refused before any work: corrupted scale tensors (shape, dtype, missing, NaN,
negative), an unavailable device, an unknown `quant_method`. The checkpoints: `quantized_ckpt.py`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import INDEX_NAME, Checkpoint
from moeprune.io.lazy import load_lazy
from moeprune.models import get_adapter
from moeprune.select.plan import PrunePlan
from moeprune.surgery import streaming
from moeprune.tiny import save_tiny
from quantized_ckpt import CASES, quantized_checkpoint


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> the quantized checkpoint of CASES[name], built once per module; tests edit copies of it."""
    root, made = tmp_path_factory.mktemp("quantized-refusals"), {}

    def get(name: str) -> Path:
        if name not in made:
            family, fmt, overrides = CASES[name]
            made[name] = quantized_checkpoint(family, fmt, root / name, **overrides)
        return made[name]

    return get


def _rewrite(path: Path, change) -> None:
    """Apply change(dict of tensors) -> dict to every shard of `path` (and the index)."""
    weight_map = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors = change(load_file(str(shard)))
        save_file(tensors, str(shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _edit(name: str, edit):
    def change(tensors):
        if name in tensors:
            new = edit(tensors.pop(name))
            if new is not None:
                tensors[name] = new
        return tensors

    return change


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan") if t.is_floating_point() else 255
    return t


FP8_SCALE = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
MX_SCALE = "model.layers.1.mlp.experts.down_proj_scales"
# case, tensor, edit, message; header problems (refused by Checkpoint.open) and bad values (refused before reading)
CORRUPTIONS = {
    "fp8-shape": ("fp8-qwen3_moe", FP8_SCALE, lambda t: t[:, :1].contiguous(), r"scale tensor is corrupted"),
    "fp8-dtype": ("fp8-deepseek_v3", FP8_SCALE, lambda t: t.half(), r"F16 .*needs F32 or BF16"),
    "fp8-missing": ("fp8-qwen3_moe", FP8_SCALE, lambda t: None, r"without their weight_scale_inv.*experts\.3\.up"),
    "fp8-nan": ("fp8-deepseek_v3", FP8_SCALE, _nan, r"non-finite or non-positive"),
    "fp8-negative": ("fp8-qwen3_moe", FP8_SCALE, lambda t: -t, r"non-finite or non-positive"),
    "mxfp4-shape": ("mxfp4-gpt_oss", MX_SCALE, lambda t: t[..., :-1].contiguous(), r"scale tensor is corrupted"),
    "mxfp4-missing": ("mxfp4-gpt_oss", MX_SCALE, lambda t: None, r"down_proj_blocks has no .*down_proj_scales"),
    "mxfp4-nan": ("mxfp4-gpt_oss", MX_SCALE, _nan, r"NaN scales"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupted_scales_are_refused_before_work(corruption, built, tmp_path, monkeypatch):
    name, tensor, edit, match = CORRUPTIONS[corruption]
    path = Path(shutil.copytree(built(name), tmp_path / "broken"))
    _rewrite(path, _edit(tensor, edit))

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the corrupted scale was refused")

    from moeprune.io import lazy

    monkeypatch.setattr(lazy, "load_keys", forbidden)  # no weight is read
    monkeypatch.setattr(streaming, "write_file", forbidden)  # no byte is written
    with pytest.raises(MoePruneError, match=match):
        load_lazy(path)
    if corruption.endswith(("nan", "negative")):  # values: headers are fine, the readers check the scales first
        ckpt = Checkpoint.open(path)
        adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
        plan = PrunePlan({layer: [0, 1, 3, 4, 6, 7] for layer in adapter.moe_layers()}, 8)
        with pytest.raises(MoePruneError, match=match):
            streaming.apply_plan_streaming(ckpt, adapter, plan, tmp_path / "out", 60_000)
    else:  # headers: every command opens the checkpoint first
        with pytest.raises(MoePruneError, match=match):
            Checkpoint.open(path)


@pytest.mark.parametrize("name", sorted(CASES))
def test_unavailable_device_refused_before_work(name, built, monkeypatch):
    from moeprune.io import lazy

    path = built(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(lazy, "load_keys", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(MoePruneError, match="no such CUDA device"):
        load_lazy(path, device="cuda:0")
    with pytest.raises(MoePruneError, match="not a torch device name"):
        load_lazy(path, device="gpu0")


def test_unknown_quant_method_refused_before_work(tmp_path, no_work):
    from moeprune import api
    from refusal import assert_refused

    path = Path(shutil.copytree(save_tiny("qwen3_moe", tmp_path / "gptq-src", seed=1), tmp_path / "gptq"))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    match = r"unknown quant_method 'gptq'.*fp8, mxfp4"
    out = tmp_path / "out"
    assert_refused(lambda: api.prune(path, out, method="frequency", ratio=0.25, streaming=True), match,
                   inputs=[path], out=out)
    with pytest.raises(MoePruneError, match=match):
        load_lazy(path)
