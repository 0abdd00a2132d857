"""LongCat-Flash's identity "zero experts" (Z router classes after the E experts, no expert weights): they are not
experts — never counted, scored or removed — and stay the last Z router classes after pruning, so a stock model
built with n_routed_experts = K routes classes K.. to them.

References here are independent of surgery: a stock model built from a config with K experts whose weights are
copied by hand (kept rows, then the zero-expert rows), and brute-force loops over (token, slot) pairs.

That layout is transformers 5.24's (the experts module holds the zero experts); 5.25 moved them into the MoE block
and moeprune refuses that layout (`models/families._longcat_zero_experts_in_block`): the layout tests run where the
installed transformers has the 5.24 layout, and the probe test checks the refusal against what the experts module
really receives, on either.
"""

from __future__ import annotations

import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.models.registry import refusal
from moeprune.models.structure import discover
from moeprune.pipeline.verify import logits_of, seeded_inputs
from moeprune.select.plan import PrunePlan
from moeprune.stats.routed import RoutedStats
from moeprune.surgery.in_memory import apply_plan
from moeprune.surgery.streaming import plan_tensors
from moeprune.tiny_families import tiny_family_model

KEPT = [0, 2, 5, 7]  # of E = 8; Z = 2 zero experts


REFUSED_HERE = refusal("longcat_flash")
layout_524 = pytest.mark.skipif(REFUSED_HERE is not None, reason=f"LongCat-Flash refused here: {REFUSED_HERE}")


def test_layout_probe_matches_what_the_experts_module_receives():
    """The refusal holds exactly when zero-expert routes never reach the experts module as indices ≥ E (observed
    with a forward pre-hook, every token pushed to the zero experts by a large correction bias); then every way in
    (`get_adapter`) says which transformers to install."""
    torch.manual_seed(0)
    m = tiny_family_model("longcat_flash").eval()
    E = m.config.n_routed_experts
    seen = []
    hooks = []
    for layer in m.model.layers:
        with torch.no_grad():
            layer.mlp.router.e_score_correction_bias[E:] = 100.0
        hooks.append(layer.mlp.experts.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone())))
    with torch.no_grad():
        m(input_ids=torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1)))
    for h in hooks:
        h.remove()
    zero_routes_reach_experts = any(bool((idx >= E).any()) for idx in seen)
    assert seen and (REFUSED_HERE is None) == zero_routes_reach_experts
    if REFUSED_HERE is not None:
        with pytest.raises(MoePruneError, match=r"transformers==5\.24"):
            get_adapter(m.config)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = tiny_family_model("longcat_flash").eval()
    with torch.no_grad():  # a non-zero correction bias, so the zero experts' bias entries matter
        for layer in m.model.layers:
            layer.mlp.router.e_score_correction_bias.normal_(0, 0.05)
    return m


def _plan(adapter):
    return PrunePlan({layer: list(KEPT) for layer in adapter.moe_layers()}, adapter.num_experts)


@layout_524
def test_structure_counts_experts_not_zero_experts(model):
    c = model.config
    s = discover(c)
    assert (s.num_experts, s.router_rows, s.extra_classes) == (c.n_routed_experts, 10, c.zero_expert_num)
    assert s.num_layers == c.num_layers == 2 and c.num_hidden_layers == 4 and s.moe_layers == (0, 1)
    adapter = get_adapter(c)
    assert (adapter.num_experts, adapter.extra_classes, adapter.router_classes) == (8, 2, 10)
    assert getattr(c, adapter.count_key) == 8 and adapter.num_layers == 2  # num_local_experts: an alias
    routing = adapter.routing()
    assert routing.kind == "softmax_bias" and routing.correction_bias
    assert set(adapter.router_tensors(adapter.block(model, 0))) == {"router.classifier.weight",
                                                                    "router.e_score_correction_bias"}


def _stock_reference(model, kept):
    """A stock LongCat model with len(kept) experts, weights copied by hand: rows kept then E..E+Z-1."""
    import copy

    config = copy.deepcopy(model.config)
    E, Z = config.n_routed_experts, config.zero_expert_num
    config.n_routed_experts = len(kept)
    ref = type(model)(config).eval()
    rows = [*kept, *range(E, E + Z)]
    sd = model.state_dict()
    new = {}
    for name, t in sd.items():
        if ".mlp.experts.down_proj" in name:
            new[name] = t[kept]
        elif ".mlp.experts.gate_up_proj" in name or ".mlp.router." in name:
            new[name] = t[rows]
        else:
            new[name] = t
    ref.load_state_dict(new)
    return ref


@layout_524
def test_prune_equals_hand_built_stock_model_and_masked_reference(model):
    import copy

    adapter = get_adapter(model.config)
    inputs = seeded_inputs(vocab_size=96, batch=2, seq_len=24, seed=3)
    want = logits_of(_stock_reference(model, KEPT), inputs)
    with masked_experts(model, adapter, {layer: [j for j in range(8) if j not in KEPT]
                                         for layer in adapter.moe_layers()}) as hits:
        masked = logits_of(model, inputs)
    assert all(c["hits"] == c["calls"] >= 1 for c in hits.values())
    pruned = apply_plan(copy.deepcopy(model), adapter, _plan(adapter))
    got = logits_of(pruned, inputs)
    tol = 1e-4 * want.abs().max()
    assert (got - want).abs().max() <= tol and (masked - want).abs().max() <= tol
    assert (logits_of(model, inputs) - want).abs().max() > 10 * tol  # the removal changes the model
    block = adapter.block(pruned, 0)
    assert tuple(block.experts.gate_up_proj.shape[:1]) == (6,) and block.experts.down_proj.shape[0] == 4
    assert block.router.classifier.weight.shape[0] == 6 and block.router.e_score_correction_bias.shape == (6,)
    assert (block.experts.num_routed_experts, block.experts.total_experts, block.router.n_routed_experts) == (4, 6, 6)
    assert pruned.config.n_routed_experts == 4 and pruned.config.zero_expert_num == 2


@layout_524
def test_zero_experts_are_still_routed_after_masking(model):
    """Masking every expert but the kept ones never masks a zero-expert column: tokens still reach them."""
    adapter = get_adapter(model.config)
    router = adapter.router(adapter.block(model, 0))
    seen = []
    hook = router.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    with masked_experts(model, adapter, {0: list(range(1, 8))}):  # one expert left, top-2
        logits_of(model, seeded_inputs(vocab_size=96, batch=2, seq_len=24, seed=3))
    hook.remove()
    idx = torch.cat([s.reshape(-1) for s in seen])
    assert set(idx.tolist()) <= {0, 8, 9} and ({8, 9} & set(idx.tolist()))


@layout_524
def test_streaming_keeps_zero_expert_rows_last(model, tmp_path):
    adapter = get_adapter(model.config)
    model.save_pretrained(tmp_path)
    out = {t.name: t.shape for t in plan_tensors(Checkpoint.open(tmp_path), adapter, _plan(adapter))}
    head = "model.layers.0.mlp."
    assert out[head + "router.classifier.weight"] == (6, 32) and out[head + "router.e_score_correction_bias"] == (6,)
    experts = sorted({int(n[len(head) + 8:].split(".")[0]) for n in out if n.startswith(head + "experts.")})
    assert experts == list(range(6))  # kept 0..3, then the zero experts' unused gate/up rows as 4, 5
    assert head + "experts.4.gate_proj.weight" in out and head + "experts.4.down_proj.weight" not in out


def test_routed_stats_ignore_zero_expert_slots():
    """Brute force over (token, slot): slots routed to class >= E add to no expert's sums."""
    E, T, k, H = 4, 9, 2, 5
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, E + 2, (T, k), generator=g)
    gate = torch.rand(T, k, generator=g)
    f = torch.randn(T, k, H, generator=g)
    valid = torch.rand(T, generator=g) > 0.2
    probs = torch.softmax(torch.randn(T, E, generator=g), -1)
    stats = RoutedStats(E)
    stats.update(idx, gate, f, valid, torch.randn(T, H, generator=g), probs)
    count, gate_sum, coact = torch.zeros(E), torch.zeros(E), torch.zeros(E, E)
    for t in range(T):
        if not valid[t]:
            continue
        for a in range(k):
            j = int(idx[t, a])
            if j >= E:
                continue
            count[j] += 1
            gate_sum[j] += gate[t, a]
            for b in range(k):
                if int(idx[t, b]) < E:
                    coact[j, int(idx[t, b])] += 1
    assert torch.equal(stats.sums["count"].float(), count)
    assert torch.allclose(stats.sums["gate_sum"].float(), gate_sum)
    assert torch.equal(stats.sums["coact"].float(), coact)
    assert stats.sums["count"].sum() > 0 and (idx >= E).any()
