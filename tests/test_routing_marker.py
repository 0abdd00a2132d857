"""A dynamic routing export is never loaded silently by a plain `from_pretrained` (`routing/marker.py`).

The reference for "the weights are unchanged" is the export's own tensors read back with safetensors and the
original model loaded stock; the warning is transformers' own LOAD REPORT, captured from its logger.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moeprune
from moeprune.calibration.run import CalibrateOptions
from moeprune.gguf.export import refusal
from moeprune.io.checkpoint import INDEX_NAME, Checkpoint
from moeprune.io.load import load_model
from moeprune.routing.apply import apply_routing, read_routing
from moeprune.routing.marker import MARKER_FILE, marker_key, write_marker
from moeprune.routing.plan import RoutingPlan
from moeprune.tiny import save_tiny
from textgen import write_words

K = 4


@pytest.fixture
def hf_warnings():
    """Everything transformers logs at WARNING and above while the test runs (its logger does not propagate)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    log = logging.getLogger("transformers")
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    root = tmp_path_factory.mktemp("marker")
    write_words(root / "web.txt")
    src = save_tiny("qwen3_moe", root / "src", seed=3, with_tokenizer=True, num_experts_per_tok=K)
    calib = CalibrateOptions((f"web={root / 'web.txt'}",), samples=6, seq_len=48)
    _, result = moeprune.prune(src, root / "dyn", recipe=[{"method": "top_p", "target_active": 2.5}], calib=calib)
    assert result.passed
    return src, root / "dyn"


def test_stock_load_warns_naming_the_block_and_keeps_every_weight(dynamic, hf_warnings):
    src, dyn = dynamic
    index = json.loads((dyn / INDEX_NAME).read_text())
    key = marker_key("top_p")
    assert index["weight_map"][key] == MARKER_FILE and not (dyn / "model.safetensors").exists()
    stored = json.loads(bytes(load_file(dyn / MARKER_FILE)[key].tolist()).decode())
    assert stored["method"] == "top_p" and stored["thresholds"] == json.loads((dyn / "config.json").read_text())[
        "moeprune_routing"]["thresholds"]
    stock = AutoModelForCausalLM.from_pretrained(dyn, dtype=torch.float32).eval()
    report = [m for m in hf_warnings if key in m]
    assert report and "UNEXPECTED" in report[0]
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    want = original.state_dict()
    got = stock.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(stock(input_ids=ids).logits, original(input_ids=ids).logits)


def test_load_model_applies_the_policy_without_the_warning(dynamic, hf_warnings):
    src, dyn = dynamic
    model = load_model(dyn, dtype="float32")
    assert not [m for m in hf_warnings if "moeprune_routing" in m]
    original = load_model(src, dtype="float32")
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        plain = original(input_ids=ids).logits
        apply_routing(original, read_routing(dyn))
        want = original(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert torch.equal(got, want) and not torch.equal(got, plain)
    # the marker's key is ignored for this load only: a later stock load still reports it
    AutoModelForCausalLM.from_pretrained(dyn, dtype=torch.float32)
    assert [m for m in hf_warnings if marker_key("top_p") in m]


def test_checkpoint_reader_skips_the_marker_and_gguf_refuses(dynamic):
    src, dyn = dynamic
    ckpt = Checkpoint.open(dyn)
    assert not [n for n in ckpt.names() if n.startswith("moeprune_routing")]
    assert sorted(ckpt.names()) == sorted(Checkpoint.open(src).names())
    assert "dynamic routing policy (top_p" in refusal(ckpt)


def test_marker_added_to_a_sharded_folder(tmp_path, hf_warnings):
    src = save_tiny("qwen3_moe", tmp_path / "src", seed=1, num_experts_per_tok=K)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())["weight_map"]
    assert len(set(shards.values())) > 1
    plan = RoutingPlan("top_p", K, [0], thresholds={0: 0.5})
    key = write_marker(tmp_path / "sharded", plan)
    after = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())["weight_map"]
    assert after == {**shards, key: MARKER_FILE}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32)
    assert [m for m in hf_warnings if key in m]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values(),
                                                  strict=True))


def test_static_topk_export_has_no_marker(tmp_path):
    src = save_tiny("qwen3_moe", tmp_path / "src", seed=2, with_tokenizer=True, num_experts_per_tok=K)
    moeprune.prune(src, tmp_path / "k2", recipe=[{"method": "topk", "k": 2}])
    assert not (tmp_path / "k2" / MARKER_FILE).exists() and (tmp_path / "k2" / "model.safetensors").is_file()
