"""Flat experts (DBRX `experts.mlp.w1/v1/w2` [E·I, H]) and config keys inside a sub-config (`ffn_config.*`),
checked against brute-force references written from DBRX's own formula (modeling_dbrx.DbrxExpertGLU)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from moeprune.io.checkpoint import Checkpoint
from moeprune.models import get_adapter
from moeprune.models.keys import get_key, set_key
from moeprune.models.layouts import FlatLayout, experts_shape, layout_of
from moeprune.models.masking import masked_experts
from moeprune.select.neuron_plan import NeuronPlan
from moeprune.select.plan import PrunePlan
from moeprune.surgery import in_memory, streaming
from moeprune.surgery.neurons import apply_neuron_plan, mask_neurons
from moeprune.tiny_families import tiny_family_model

E, I, H = 8, 16, 32  # tiny_overrides: moe_num_experts, ffn_hidden_size, d_model


@pytest.fixture(scope="module")
def model():
    return tiny_family_model("dbrx")


def _ids(model, n=2, s=12):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (n, s), generator=g)


def _dbrx_expert(mlp, j, x):
    """DBRX's expert j on x [n, H], as modeling_dbrx computes it (w2 used as [I, H])."""
    w1, v1, w2 = (t.view(-1, I, H)[j] for t in (mlp.w1, mlp.v1, mlp.w2))
    return (F.silu(x @ w1.T) * (x @ v1.T)) @ w2  # [n, H]


# ------------------------------------------------------------------ config keys inside a sub-config
def test_dotted_keys_read_and_write_objects_and_dicts():
    class C:
        pass

    c, sub = C(), C()
    sub.moe_num_experts = 8
    c.ffn_config = sub
    assert get_key(c, "ffn_config.moe_num_experts") == 8
    assert get_key(c, "ffn_config.missing", 3) == 3 and get_key(c, "nope.x") is None
    set_key(c, "ffn_config.moe_num_experts", 6)
    assert sub.moe_num_experts == 6
    d = {"ffn_config": {"moe_num_experts": 8}, "n_layers": 4}
    set_key(d, "ffn_config.moe_num_experts", 5)
    set_key(d, "n_layers", 2)
    assert d == {"ffn_config": {"moe_num_experts": 5}, "n_layers": 2}
    with pytest.raises(KeyError):
        set_key(d, "attn_config.x", 1)


def test_adapter_reads_counts_from_ffn_config(model):
    adapter = get_adapter(model.config)
    assert (adapter.count_key, adapter.top_k_key, adapter.intermediate_key) == (
        "ffn_config.moe_num_experts", "ffn_config.moe_top_k", "ffn_config.ffn_hidden_size")
    assert (adapter.num_experts, adapter.top_k, adapter.expert_width) == (E, 2, I)
    assert adapter.moe_layers() == [0, 1, 2, 3]
    experts = adapter.experts(adapter.block(model, 0))
    assert layout_of(experts) is FlatLayout and experts_shape(adapter, experts) == (E, I)
    d = json.loads(model.config.to_json_string())
    adapter.set_config_dict_experts(d, 6)
    assert d["ffn_config"]["moe_num_experts"] == 6


def test_disk_keys_are_classified(model):
    adapter = get_adapter(model.config)
    kinds = {k: adapter.classify_key(k).kind for k in model.state_dict() if ".blocks.1." in k}
    assert {k.rsplit("ffn.", 1)[-1]: v for k, v in kinds.items() if ".ffn." in k} == {
        "router.layer.weight": "router", "experts.mlp.w1": "fused", "experts.mlp.v1": "fused",
        "experts.mlp.w2": "fused"}
    assert kinds["transformer.blocks.1.norm_attn_norm.norm_1.weight"] == "other"


# ------------------------------------------------------------------ roles
@torch.no_grad()
def test_roles_compute_dbrx_experts(model):
    adapter = get_adapter(model.config)
    block = adapter.block(model, 0)
    experts, mlp = block.experts, block.experts.mlp
    roles = adapter.expert_roles(block)
    assert {r: tuple(t.shape) for r, t in roles.items()} == {"gate": (E, I, H), "up": (E, I, H), "down": (E, H, I)}
    glu = adapter.expert_glu(experts)
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(2))
    for j in range(E):
        canonical = F.linear(glu(F.linear(x, roles["gate"][j]), F.linear(x, roles["up"][j])), roles["down"][j])
        torch.testing.assert_close(canonical, _dbrx_expert(mlp, j, x))
        # the stock module routing every row to expert j with weight 1
        stock = experts(x[None], torch.full((5, 1), j), torch.ones(5, 1)).view(5, H)
        torch.testing.assert_close(stock, canonical)
    assert roles["down"].data_ptr() == mlp.w2.data_ptr()  # views: writes reach the parameters


# ------------------------------------------------------------------ expert removal
def _kept():
    return {0: [0, 1, 2, 4, 5, 7], 1: [0, 1, 2, 3, 4, 5], 2: [2, 3, 4, 5, 6, 7], 3: [0, 2, 3, 4, 5, 6]}


@torch.no_grad()
def test_keep_takes_row_blocks_and_equals_masked_reference(model):
    import copy

    pruned = copy.deepcopy(model)
    adapter = get_adapter(pruned.config)
    kept = _kept()
    before = {layer: [t.clone() for t in (adapter.block(model, layer).experts.mlp.w1,
                                          adapter.block(model, layer).router.layer.weight)] for layer in kept}
    in_memory.apply_plan(pruned, adapter, PrunePlan(kept, E, model_type="dbrx"))
    for layer, k in kept.items():
        block = adapter.block(pruned, layer)
        w1, router = before[layer]
        assert torch.equal(block.experts.mlp.w1, torch.cat([w1[j * I:(j + 1) * I] for j in k]))  # [K·I, H]
        assert torch.equal(block.router.layer.weight, router[k])
        assert block.experts.num_experts == block.experts.mlp.moe_num_experts == 6
        assert block.router.layer.out_features == 6
    assert pruned.config.ffn_config.moe_num_experts == 6
    ids = _ids(model)
    dropped = {layer: sorted(set(range(E)) - set(k)) for layer, k in kept.items()}
    with masked_experts(model, get_adapter(model.config), dropped) as hits:
        ref = model(ids).logits
    assert all(c["hits"] == c["calls"] > 0 for c in hits.values())
    out = pruned(ids).logits
    assert (ref - model(ids).logits).abs().max() > 1e-3  # the mask changes the output
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_streaming_equals_in_memory_bit_for_bit(model, tmp_path):
    import copy

    from safetensors.torch import load_file

    model.save_pretrained(tmp_path / "src")
    ckpt = Checkpoint.open(tmp_path / "src")
    adapter = get_adapter(model.config)
    plan = PrunePlan(_kept(), E, model_type="dbrx")
    (tmp_path / "out").mkdir()
    streaming.apply_plan_streaming(ckpt, adapter, plan, tmp_path / "out", 60_000)
    streamed = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        streamed.update(load_file(f))
    pruned = in_memory.apply_plan(copy.deepcopy(model), adapter, plan)
    expected = pruned.state_dict()
    assert streamed["transformer.blocks.0.ffn.experts.mlp.w2"].shape == (6 * I, H)
    for name, t in expected.items():
        if name == "lm_head.weight" and name not in streamed:  # tied
            continue
        assert torch.equal(streamed[name], t), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["ffn_config"]["moe_num_experts"] == 6 and config["ffn_config"]["moe_top_k"] == 2


# ------------------------------------------------------------------ neurons
@torch.no_grad()
def test_neuron_slicing_equals_brute_force_and_mask(model):
    import copy

    adapter = get_adapter(model.config)
    g = torch.Generator().manual_seed(3)
    kept = {layer: {j: sorted(torch.randperm(I, generator=g)[:8].tolist()) for j in range(E)} for layer in range(4)}
    plan = NeuronPlan(kept, I, model_type="dbrx")
    sliced = apply_neuron_plan(copy.deepcopy(model), adapter, plan)
    masked = mask_neurons(copy.deepcopy(model), adapter, plan)
    for layer in range(4):
        old, new = adapter.block(model, layer).experts, adapter.block(sliced, layer).experts
        assert new.ffn_hidden_size == new.mlp.ffn_hidden_size == 8
        for name in ("w1", "v1", "w2"):
            blocks = getattr(old.mlp, name).view(E, I, H)
            want = torch.cat([blocks[j, kept[layer][j]] for j in range(E)])  # [E·I', H]
            assert torch.equal(getattr(new.mlp, name), want), name
    assert sliced.config.ffn_config.ffn_hidden_size == 8
    ids = _ids(model)
    ref = masked(ids).logits
    torch.testing.assert_close(sliced(ids).logits, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
