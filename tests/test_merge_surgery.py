"""Merge surgery on every family: merged tensors land in the right slots (checked against averages computed
by hand from the original weights), router rows follow the strategy, counts shrink, the save reloads with stock
`from_pretrained` and equals the in-memory merged model."""

from __future__ import annotations

import copy

import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.io.load import load_model  # the stock Auto class's from_pretrained for each family
from moeprune.merge.plan import MergePlan
from moeprune.models import get_adapter
from moeprune.models.base import expert_indexed
from moeprune.pipeline.verify import logits_of, seeded_inputs
from moeprune.surgery.merge import apply_merge_plan
from moeprune.tiny import FAMILY_CONFIGS, tiny_model

FAMILIES = sorted(FAMILY_CONFIGS)


def plain_average(members, weights):
    """Reference merge for the surgery test: weighted mean of every role, no alignment."""
    w = torch.tensor(list(weights), dtype=torch.float64)
    return {r: (torch.stack([m[r].double() for m in members]) * w.view(-1, *[1] * members[0][r].dim())).sum(0)
            .div(w.sum()).to(members[0][r].dtype) for r in members[0]}


def _plan(adapter, router: str) -> MergePlan:
    """E=8 -> 5: merge (0, 3) and (5, 6, 7), dominants 0 and 5."""
    groups = {layer: [[0, 3], [1], [2], [4], [5, 6, 7]] for layer in adapter.moe_layers()}
    weights = {layer: [[0.7, 0.3], [1.0], [1.0], [1.0], [0.5, 0.2, 0.3]] for layer in adapter.moe_layers()}
    return MergePlan(groups, adapter.num_experts, weights, method="manual", router=router)


def _roles(model, adapter, layer):
    return {k: v.detach().clone() for k, v in adapter.expert_roles(adapter.block(model, layer)).items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("router", ["dominant", "weighted"])
def test_merge_surgery_every_family(family, router, tmp_path):
    torch.manual_seed(0)
    original = tiny_model(family, seed=11).eval()
    adapter = get_adapter(original.config, model=original)
    if family in ("deepseek_v3", "glm4_moe"):  # 2 router groups of 4: merge inside a group, equal counts
        plan = MergePlan({layer: [[0, 3], [1, 2], [4, 5], [6, 7]] for layer in adapter.moe_layers()}, 8,
                         {layer: [[0.7, 0.3], [0.9, 0.1], [0.4, 0.6], [0.5, 0.5]] for layer in adapter.moe_layers()},
                         router=router)
    else:
        plan = _plan(adapter, router)
    merged = copy.deepcopy(original)
    apply_merge_plan(merged, adapter, plan, plain_average)
    G = len(plan.groups[adapter.moe_layers()[0]])
    m_adapter = get_adapter(merged.config, model=merged)
    assert m_adapter.num_experts == G
    for layer in adapter.moe_layers():
        before, after = _roles(original, adapter, layer), _roles(merged, m_adapter, layer)
        router_before = expert_indexed(adapter.router(adapter.block(original, layer)), 8)
        router_after = expert_indexed(m_adapter.router(m_adapter.block(merged, layer)), G)
        for g, (group, w) in enumerate(zip(plan.groups[layer], plan.weights[layer], strict=True)):
            wt = torch.tensor(w, dtype=torch.float64)
            for role in after:
                want = (torch.stack([before[role][j].double() for j in group]) *
                        wt.view(-1, *[1] * before[role][0].dim())).sum(0) / wt.sum()
                torch.testing.assert_close(after[role][g].double(), want, rtol=1e-6, atol=1e-7)
            for name, t in router_after.items():
                src = router_before[name][group].double()
                want = src[0] if router == "dominant" else (wt.view(-1, *[1] * (src.dim() - 1)) * src).sum(0) / wt.sum()
                torch.testing.assert_close(t[g].double(), want, rtol=1e-6, atol=1e-7)
    merged.save_pretrained(tmp_path / "m")
    reloaded = load_model(tmp_path / "m", dtype="float32")
    inputs = seeded_inputs(96, 2, 16, seed=1)
    torch.testing.assert_close(logits_of(reloaded, inputs), logits_of(merged, inputs), rtol=1e-5, atol=1e-5)


def test_merge_plan_refusals():
    model = tiny_model("qwen3_moe", seed=1)
    adapter = get_adapter(model.config, model=model)
    layers = adapter.moe_layers()
    cases = [
        ({L: [[0, 1], [2], [3], [4], [5], [6]] for L in layers}, "exactly one merge group .*missing \\[7\\]"),
        ({L: [[0, 1, 1], [2], [3], [4], [5], [6], [7]] for L in layers}, "repeated \\[1\\]"),
        ({L: [[2, 0, 1], [3], [4], [5], [6], [7]] for L in layers}, None),  # ok: dominant 2 first
        ({L: [[3], [2, 0, 1], [4], [5], [6], [7]] for L in layers}, "order the groups by their dominant"),
        ({L: [[0, 1, 2, 3, 4, 5, 6, 7]] for L in layers}, "top-2"),
    ]
    for groups, message in cases:
        plan = MergePlan(groups, 8)
        if message is None:
            plan.validate(adapter)
        else:
            with pytest.raises(MoePruneError, match=message):
                plan.validate(adapter)
    ds = tiny_model("deepseek_v3", seed=1)
    ds_adapter = get_adapter(ds.config, model=ds)
    with pytest.raises(MoePruneError, match="different router groups"):
        MergePlan({L: [[0, 4], [1], [2], [3], [5], [6], [7]] for L in ds_adapter.moe_layers()}, 8).validate(ds_adapter)
    with pytest.raises(MoePruneError, match="unknown router strategy"):
        MergePlan({1: [[0]]}, 8, router="mean")
