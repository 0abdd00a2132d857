"""The ModuleList-of-MLP experts layout (remote-code / older models) through the generic fallback adapter.

The model is a tiny Qwen3-MoE whose MoE blocks are replaced by a hand-written legacy block: `gate` is an
nn.Linear and `experts` an nn.ModuleList of MLPs, routed the old way (softmax, top-k, renormalise, loop).
Its model_type is unknown to moeprune, so the generic adapter must recognise it from the module structure.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP

from moeprune.io.checkpoint import Checkpoint
from moeprune.models import get_adapter
from moeprune.models.generic import GenericMoEAdapter
from moeprune.models.layouts import ModuleListLayout, layout_of
from moeprune.models.masking import masked_experts
from moeprune.pipeline.verify import logits_of, seeded_inputs
from moeprune.select.plan import PrunePlan
from moeprune.surgery.in_memory import apply_plan
from moeprune.surgery.streaming import apply_plan_streaming
from moeprune.tiny import tiny_model


class LegacyMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [Qwen3MoeMLP(config, intermediate_size=config.moe_intermediate_size) for _ in range(config.num_experts)]
        )

    def forward(self, x):
        b, s, h = x.shape
        x = x.reshape(-1, h)  # [T, H]
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)  # [T, E]
        w, idx = probs.topk(self.top_k, dim=-1)  # [T, k]
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for j, expert in enumerate(self.experts):
            tok, pos = torch.where(idx == j)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * w[tok, pos, None])
        return out.reshape(b, s, h)


def legacy_model(seed: int = 0):
    model = tiny_model("qwen3_moe", seed=seed)
    torch.manual_seed(seed + 1)
    for layer in model.model.layers[1:]:  # layer 0 is dense (mlp_only_layers=[0])
        block = LegacyMoeBlock(model.config)
        with torch.no_grad():
            block.gate.weight.normal_(0, 4 / model.config.hidden_size**0.5)
            for e in block.experts:
                for p in e.parameters():
                    p.normal_(0, 0.1)
        layer.mlp = block
    model.config.model_type = "legacy_moe"  # unknown to moeprune's registry
    return model.eval()


@pytest.fixture
def plan():
    return PrunePlan({1: [0, 2, 3, 5, 6, 7], 2: [1, 2, 3, 4, 5, 7]}, num_experts=8)


def test_generic_adapter_recognises_modulelist_model():
    model = legacy_model()
    adapter = get_adapter(model.config, model=model)
    assert isinstance(adapter, GenericMoEAdapter)
    assert adapter.moe_layers() == [1, 2] and adapter.num_experts == 8 and adapter.top_k == 2
    assert layout_of(adapter.experts(adapter.block(model, 1))) is ModuleListLayout


def test_modulelist_surgery_equals_masked_original(plan):
    model = legacy_model()
    adapter = get_adapter(model.config, model=model)
    inputs = seeded_inputs(96, 2, 20, seed=5)
    full = logits_of(model, inputs)
    with masked_experts(model, adapter, {layer: plan.dropped(layer) for layer in plan.layers}):
        want = logits_of(model, inputs)
    apply_plan(model, adapter, plan)
    got = logits_of(model, inputs)
    keep = inputs["attention_mask"].bool()
    scale = want[keep].abs().max()
    assert (got - want)[keep].abs().max() <= 1e-4 * scale
    assert (full - want)[keep].abs().max() > 1e-2 * scale  # the mask removed something real
    block = adapter.block(model, 1)
    assert len(block.experts) == 6 and block.gate.weight.shape == (6, 32) and block.gate.out_features == 6
    assert block.num_experts == 6 and model.config.num_experts == 6


def test_modulelist_streaming_matches_in_memory(plan, tmp_path):
    model = legacy_model()
    adapter = get_adapter(model.config, model=model)
    src = tmp_path / "src"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src / "model.safetensors"))
    config = model.config.to_dict() | {"model_type": "legacy_moe"}
    (src / "config.json").write_text(json.dumps(config))
    ckpt = Checkpoint.open(src)
    disk_adapter = GenericMoEAdapter.detect(model.config, weight_keys=ckpt.names())
    assert disk_adapter is not None and disk_adapter.moe_layers() == [1, 2]
    out = tmp_path / "out"
    out.mkdir()
    apply_plan_streaming(ckpt, disk_adapter, plan, out, max_shard_bytes=10**9)
    streamed = load_file(str(out / "model.safetensors"))
    apply_plan(model, adapter, plan)
    expected = model.state_dict()
    assert sorted(streamed) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(streamed[k], v), k
    saved = json.loads((out / "config.json").read_text())
    counts = [saved[k] for k in ("num_experts", "num_local_experts") if k in saved]
    assert counts and all(c == 6 for c in counts)


def test_generic_refuses_sigmoid_router_with_correction_bias():
    """Masking logits is exact only for softmax-based routers: a DeepSeek-style router needs an adapter."""
    from moeprune.errors import MoePruneError

    model = legacy_model()
    for layer in model.model.layers[1:]:
        layer.mlp.gate.register_buffer("e_score_correction_bias", torch.zeros(8))
    with pytest.raises(MoePruneError, match="unknown MoE architecture 'legacy_moe'.*adding-a-model"):
        get_adapter(model.config, model=model)
