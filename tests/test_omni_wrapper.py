"""Qwen3-Omni-MoE's wrapper (`Qwen3OmniMoeForConditionalGeneration`) has no forward of its own: moeprune runs it
through its thinker (`io/stock.runnable`). References: the thinker's own logits from a stock `from_pretrained`, and
the original checkpoint's tensors for everything the plan does not touch (the talker, a second MoE decoder)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMultimodalLM

import moeprune
from moeprune.calibration.run import CalibrateOptions
from moeprune.errors import MoePruneError
from moeprune.io.load import load_model
from moeprune.io.stock import runnable
from moeprune.tiny import tiny_tokenizer
from moeprune.tiny_families import tiny_family_model
from textgen import write_words


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni")
    tiny_family_model("qwen3_omni_moe", seed=3).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    write_words(root / "web.txt")
    return root


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_the_wrapper_runs_as_its_thinker(omni):
    model = load_model(omni / "model", dtype="float32")
    stock = AutoModelForMultimodalLM.from_pretrained(omni / "model", dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = stock.thinker(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert model.get_input_embeddings() is model.thinker.get_input_embeddings()
    assert type(stock).forward is torch.nn.Module.forward  # the class itself still has none
    with pytest.raises(NotImplementedError):
        stock.get_input_embeddings()


@pytest.mark.parametrize("recipe", [[{"method": "reap", "ratio": 0.25}], [{"method": "heapr", "ratio": 0.5}],
                                    [{"method": "msmoe", "ratio": 0.25}]])
def test_prune_the_thinker_and_keep_the_talker(omni, tmp_path, recipe):
    calib = CalibrateOptions((f"web={omni / 'web.txt'}",), samples=4, seq_len=32)
    applied, result = moeprune.prune(omni / "model", tmp_path / "out", recipe=recipe, calib=calib)
    assert result.passed, result.line()
    before, after = _tensors(omni / "model"), _tensors(applied.out)
    talker = [k for k in before if not k.startswith("thinker.")]
    assert talker and all(torch.equal(before[k], after[k]) for k in talker)  # untouched, bit for bit
    changed = [k for k in before if k.startswith("thinker.") and (k not in after or after[k].shape != before[k].shape)]
    assert changed and all(".mlp." in k for k in changed)  # only the thinker's MoE blocks lost experts / neurons


@pytest.mark.parametrize("method, ratio, mode", [("reap", 0.25, "streaming"), ("heapr", 0.5, "lazy"),
                                                ("dern", 0.25, "lazy")])
def test_layer_by_layer_and_streaming_equal_the_in_memory_export(omni, tmp_path, method, ratio, mode):
    """The talker is a second MoE decoder whose keys also read `*.layers.N.mlp.experts.*`: the shard edit and the
    lazy reader take the thinker's (the adapter's decoder path, `models/structure.py`), and the config's expert
    count is the thinker's text config (thinker_config.text_config)."""
    calib = CalibrateOptions((f"web={omni / 'web.txt'}",), samples=4, seq_len=32)
    whole, result = moeprune.prune(omni / "model", tmp_path / "whole", method=method, ratio=ratio, calib=calib,
                                   lazy=False)
    assert result.passed, result.line()
    other, result = moeprune.prune(omni / "model", tmp_path / mode, method=method, ratio=ratio, calib=calib,
                                   **{mode: True})
    assert result.passed, result.line()
    want, got = _tensors(whole.out), _tensors(other.out)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    before = _tensors(omni / "model")
    assert all(torch.equal(before[k], got[k]) for k in before if not k.startswith("thinker."))
    config = json.loads((other.out / "config.json").read_text())
    thinker, talker = config["thinker_config"]["text_config"], config["talker_config"]["text_config"]
    original = json.loads((omni / "model" / "config.json").read_text())["talker_config"]["text_config"]
    assert talker == original and thinker["num_experts"] == (6 if method != "heapr" else 8)


def test_a_class_without_forward_and_no_text_owner_is_refused():
    class Shell(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config

    from moeprune.tiny import tiny_config

    with pytest.raises(MoePruneError, match="has no forward"):
        runnable(Shell(tiny_config("qwen3_moe")))
