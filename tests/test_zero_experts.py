"""LongCat-Flash's identity "zero experts" (Z router classes after the E experts, no expert weights): they are not
experts — never counted, scored or removed — and stay the last Z router classes after pruning, so a stock model
built with n_routed_experts = K routes classes K.. to them.

References here are independent of surgery: a stock model built from a config with K experts whose weights are
copied by hand (kept rows, then the zero-expert rows), and brute-force loops over (token, slot) pairs.

Both transformers layouts are checked by the same tests: 5.24 keeps the zero experts in the experts module (which
also gives them unused gate/up rows), 5.25 in the MoE block, which hands the experts dummy routes at weight 0 for
zero-expert slots (`stats/block_routes.py`); the collectors' counts are checked against the router's own routes.
"""

from __future__ import annotations

import pytest
import torch

from moeprune.io.checkpoint import Checkpoint
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.models.structure import discover
from moeprune.pipeline.verify import logits_of, seeded_inputs
from moeprune.select.plan import PrunePlan
from moeprune.stats.routed import RoutedStats
from moeprune.surgery.in_memory import apply_plan
from moeprune.surgery.streaming import plan_tensors
from moeprune.tiny_families import tiny_family_model

KEPT = [0, 2, 5, 7]  # of E = 8; Z = 2 zero experts


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
        elif ".mlp.router." in name or (".mlp.experts.gate_up_proj" in name and t.shape[0] == E + Z):
            new[name] = t[rows]  # transformers 5.24 also gives the zero experts unused gate/up rows
        elif ".mlp.experts.gate_up_proj" in name:
            new[name] = t[kept]
        else:
            new[name] = t
    ref.load_state_dict(new)
    return ref


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
    zero_rows = model.model.layers[0].mlp.experts.gate_up_proj.shape[0] - 8  # 2 on transformers 5.24, 0 on 5.25
    assert tuple(block.experts.gate_up_proj.shape[:1]) == (4 + zero_rows,) and block.experts.down_proj.shape[0] == 4
    assert block.router.classifier.weight.shape[0] == 6 and block.router.e_score_correction_bias.shape == (6,)
    if zero_rows:  # 5.24: the experts module holds the zero experts
        assert (block.experts.num_routed_experts, block.experts.total_experts, block.router.n_routed_experts) == (
            4, 6, 6)
    else:  # 5.25: the block does (it routes classes ≥ num_routed_experts to them)
        assert (block.num_routed_experts, block.experts.num_experts, block.router.n_routed_experts) == (4, 4, 6)
    assert pruned.config.n_routed_experts == 4 and pruned.config.zero_expert_num == 2


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


def test_streaming_keeps_zero_expert_rows_last(model, tmp_path):
    adapter = get_adapter(model.config)
    model.save_pretrained(tmp_path)
    out = {t.name: t.shape for t in plan_tensors(Checkpoint.open(tmp_path), adapter, _plan(adapter))}
    head = "model.layers.0.mlp."
    assert out[head + "router.classifier.weight"] == (6, 32) and out[head + "router.e_score_correction_bias"] == (6,)
    experts = sorted({int(n[len(head) + 8:].split(".")[0]) for n in out if n.startswith(head + "experts.")})
    if model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 10:  # transformers 5.24: zero experts' gate/up
        assert experts == list(range(6))  # kept 0..3, then the zero experts' unused gate/up rows as 4, 5
        assert head + "experts.4.gate_proj.weight" in out and head + "experts.4.down_proj.weight" not in out
    else:  # 5.25: the experts hold the 8 real experts only
        assert experts == list(range(4))


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


def _router_routes(m, E: int, ids: torch.Tensor, mask: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (count [E], gate_sum [E]) over real tokens, from each router's own top-k output (a forward hook):
    the brute-force reference for both collectors, in either transformers layout."""
    seen: dict[int, list] = {}
    hooks = [layer.mlp.router.register_forward_hook(lambda mod, a, out, i=i: seen.setdefault(i, []).append(out))
             for i, layer in enumerate(m.model.layers)]
    with torch.no_grad():
        m(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    valid = mask.reshape(-1).bool()
    ref = {}
    for i, outs in seen.items():
        _, weights, idx = outs[0]  # LongcatFlashTopkRouter: (logits, weights, indices)
        count, gate = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
        for t in valid.nonzero().view(-1).tolist():
            for s in range(idx.shape[1]):
                j = int(idx[t, s])
                if j < E:
                    count[j] += 1
                    gate[j] += float(weights[t, s])
        ref[i] = (count, gate)
    return ref


def test_both_collectors_count_the_routes_the_router_chose():
    """With ~a third of the slots on zero experts, the routed and the neuron statistics count exactly the router's
    own routes to real experts (transformers 5.25 hands the experts dummy routes at weight 0 for zero-expert
    slots: counted as such they would inflate the dummies' counts)."""
    from moeprune.calibration.data import CalibSet
    from moeprune.calibration.session import collect
    from moeprune.stats.neurons import collect_neuron_stats

    torch.manual_seed(0)
    m = tiny_family_model("longcat_flash").eval()
    E = m.config.n_routed_experts
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.router.e_score_correction_bias[E:] = 0.12  # lifts the zero experts into many top-k
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 96, (3, 16), generator=g)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 11:] = 0
    ref = _router_routes(m, E, ids, mask)
    zero_share = 1 - sum(c.sum() for c, _ in ref.values()) / (len(ref) * int(mask.sum()) * m.config.moe_topk)
    assert 0.1 < zero_share < 0.9, zero_share
    adapter = get_adapter(m.config)
    data = CalibSet("s", ids, mask, "-", "-", 1, 1)
    routed = collect(m, adapter, [data]).stats["s"]
    neurons = collect_neuron_stats(m, adapter, [data], gradients=False)
    for i, layer in enumerate(adapter.moe_layers()):
        count, gate = ref[i]
        assert torch.equal(routed[layer].sums["count"].double(), count)
        torch.testing.assert_close(routed[layer].sums["gate_sum"].double(), gate, rtol=1e-5, atol=1e-6)
        assert torch.equal(neurons[layer].sums["count"].double(), count)
