"""Data-free criteria against their formulas computed by brute force; uniform selection against a brute-force
ranking; plan JSON round trip; the byte-level safetensors reader/writer against the safetensors library."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeprune import api
from moeprune.criteria import CRITERIA
from moeprune.criteria.weights import summarize_checkpoint, summarize_model
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.safetensors_io import OutTensor, read_header, read_tensor, row_ranges, write_file
from moeprune.models import get_adapter
from moeprune.models.layouts import layout_of
from moeprune.models.routing import RoutingSpec
from moeprune.select.plan import PrunePlan
from moeprune.select.uniform import drop_count, select_uniform
from moeprune.tiny import save_tiny, tiny_model


def brute_force_expert_params(model, adapter, layer: int) -> list[torch.Tensor]:
    """All parameters of each expert, concatenated, taken straight from the module (fused: row j of each)."""
    experts = adapter.experts(adapter.block(model, layer))
    params = [p for _, p in sorted(experts.named_parameters())]
    E = adapter.num_experts
    return [torch.cat([p[j].detach().flatten().double() for p in params]) for j in range(E)]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_weight_criteria_match_formula(family, tmp_path):
    path = save_tiny(family, tmp_path / "m", seed=2)
    model = tiny_model(family, seed=2)
    ckpt = Checkpoint.open(path)
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    disk = summarize_checkpoint(ckpt, adapter)
    mem = summarize_model(model, adapter)
    for layer in adapter.moe_layers():
        thetas = brute_force_expert_params(model, adapter, layer)
        aimer = torch.stack([t.abs().mean() / t.square().mean().sqrt() for t in thetas])
        norm = torch.stack([t.norm() for t in thetas])
        for summary in (disk[layer], mem[layer]):
            assert torch.allclose(CRITERIA.get("aimer").fn(summary), aimer, rtol=1e-10)
            assert torch.allclose(CRITERIA.get("weight_norm").fn(summary), norm, rtol=1e-10)
        assert aimer.std() > 0  # experts differ, so the ranking means something


def test_aimer_plan_drops_highest_ratio(tmp_path):
    path = save_tiny("qwen3_moe", tmp_path / "m", seed=4)
    plan = api.make_plan(path, "aimer", 0.25)
    model = tiny_model("qwen3_moe", seed=4)
    adapter = get_adapter(model.config)
    for layer in adapter.moe_layers():
        thetas = brute_force_expert_params(model, adapter, layer)
        ratio = [float(t.abs().mean() / t.square().mean().sqrt()) for t in thetas]
        worst = sorted(range(8), key=lambda j: ratio[j])[-2:]  # AIMER: higher = prune
        assert sorted(set(range(8)) - set(plan.kept_experts[layer])) == sorted(worst)


def brute_force_select(scores: torch.Tensor, n_drop: int, groups: int) -> list[int]:
    """Best subset by exhaustive search: drop n_drop/groups per group minimising the dropped score mass,
    ties towards dropping the higher index (lexicographic order of (score, -index))."""
    E = scores.numel()
    size = E // groups
    kept = []
    for g in range(groups):
        idx = list(range(g * size, (g + 1) * size))
        best = min(itertools.combinations(idx, n_drop // groups),
                   key=lambda drop: sorted((float(scores[j]), -j) for j in drop)[::-1])
        kept += [j for j in idx if j not in best]
    return kept


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_select_uniform_matches_brute_force(groups, ratio):
    routing = RoutingSpec("sigmoid_grouped", top_k=2, n_group=groups, topk_group=groups) if groups > 1 \
        else RoutingSpec("softmax_topk", top_k=2)
    g = torch.Generator().manual_seed(groups)
    for trial in range(5):
        scores = torch.randint(0, 5, (16,), generator=g).double()  # many ties on purpose
        kept = select_uniform({0: scores}, ratio, routing)[0]
        n_drop = drop_count(ratio, 16, routing)
        assert len(kept) == 16 - n_drop
        want = brute_force_select(scores, n_drop, groups)
        # same dropped score multiset (exhaustive optimum) and the documented tie rule
        assert sorted(float(scores[j]) for j in kept) == sorted(float(scores[j]) for j in want)
        assert kept == sorted(want), (trial, scores.tolist())
    low = select_uniform({0: torch.arange(16.0)}, 0.25, RoutingSpec("softmax_topk", top_k=2), higher_keeps=False)
    assert low[0] == list(range(12))  # higher = prune keeps the lowest scores


def test_random_method_is_seeded(tmp_path):
    path = save_tiny("mixtral", tmp_path / "m")
    a, b = api.make_plan(path, "random", 0.5, seed=1), api.make_plan(path, "random", 0.5, seed=1)
    c = api.make_plan(path, "random", 0.5, seed=2)
    assert a.kept_experts == b.kept_experts and a.sha256() == b.sha256()
    assert a.kept_experts != c.kept_experts


def test_plan_json_round_trip(tmp_path):
    plan = PrunePlan({3: [0, 2, 5], 1: [1, 2, 7]}, num_experts=8, method="aimer", ratio=0.5, model_type="olmoe",
                     scores={1: [0.5] * 8, 3: [0.25] * 8})
    loaded = PrunePlan.load(plan.save(tmp_path / "p.json"))
    assert loaded.kept_experts == plan.kept_experts and loaded.sha256() == plan.sha256()
    assert loaded.method == "aimer" and loaded.scores == plan.scores and loaded.layers == [1, 3]
    assert plan.dropped(1) == [0, 3, 4, 5, 6] and plan.kept_count == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_byte_level_reader_and_writer(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": (torch.randn(6, 5, 3, generator=g) * 100).to(dtype), "b": torch.arange(7).to(dtype),
               "c": torch.zeros(0, 4, dtype=dtype)}
    save_file(tensors, str(tmp_path / "in.safetensors"))
    entries, _ = read_header(tmp_path / "in.safetensors")
    by_name = {e.name: e for e in entries}
    for name, t in tensors.items():
        assert torch.equal(read_tensor(by_name[name]), t)
    rows = [0, 1, 4]
    assert torch.equal(read_tensor(by_name["a"], rows), tensors["a"][rows])
    e = by_name["a"]
    out = [OutTensor("sliced", e.dtype, (3, 5, 3), e.file, tuple(row_ranges(e, rows))),
           OutTensor("b2", by_name["b"].dtype, (7,), e.file, ((by_name["b"].begin, by_name["b"].end),))]
    write_file(tmp_path / "out.safetensors", out)
    back = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(back["sliced"], tensors["a"][rows]) and torch.equal(back["b2"], tensors["b"])


def test_layouts_expose_roles_consistently(tmp_path):
    """Roles in canonical orientation equal the tensors the experts' own forward uses (brute-force forward)."""
    for family in ("qwen3_moe", "gpt_oss"):
        model = tiny_model(family, seed=0)
        adapter = get_adapter(model.config)
        experts = adapter.experts(adapter.block(model, adapter.moe_layers()[0]))
        roles = layout_of(experts).roles(experts, adapter.fused_style)
        E = adapter.num_experts
        x = torch.randn(5, model.config.hidden_size)
        for j in range(E):
            gate = x @ roles["gate"][j].T + (roles["gate_bias"][j] if "gate_bias" in roles else 0)  # [5, I]
            up = x @ roles["up"][j].T + (roles["up_bias"][j] if "up_bias" in roles else 0)
            assert gate.shape[1] == adapter.expert_width
            if family == "gpt_oss":
                gu = x @ experts.gate_up_proj[j] + experts.gate_up_proj_bias[j]  # [5, 2I] interleaved
                assert torch.allclose(torch.stack([gate, up], -1).flatten(1), gu, atol=1e-6)
            else:
                gu = x @ experts.gate_up_proj[j].T  # [5, 2I] = [gate | up]
                assert torch.allclose(torch.cat([gate, up], 1), gu, atol=1e-6)
            assert roles["down"][j].shape == (model.config.hidden_size, adapter.expert_width)
