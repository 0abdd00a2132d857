"""NAEE's route cache (`select/naee_route_cache.py`): the keys against each token's route computed by hand from its
router's logits, and children served from the cache against the block-forward reference (`reconstruction.
block_evaluator`: the model's own block with the set masked in its own router, every token)."""

from __future__ import annotations

import torch

from moeprune.calibration.session import eager_experts
from moeprune.models import get_adapter
from moeprune.select.naee_incremental import incremental_evaluator
from moeprune.select.naee_outputs import expert_outputs
from moeprune.select.naee_route_cache import RouteCache
from moeprune.select.reconstruction import block_evaluator
from moeprune.tiny import tiny_model
from test_naee_fast import block_outputs

RTOL = 1e-6  # routers round their softmax in float32 (test_naee_incremental.py); the block forward is float64


def _case(num_experts: int = 16, top_k: int = 2):
    model = tiny_model("qwen3_moe", seed=8, num_experts=num_experts, num_experts_per_tok=top_k).double()
    adapter = get_adapter(model.config, model=model)
    layer = adapter.moe_layers()[-1]
    g = torch.Generator().manual_seed(8)
    X = [torch.randn(2, 48, model.config.hidden_size, generator=g, dtype=torch.float64) for _ in range(2)]
    return model, adapter, layer, X, block_outputs(model, adapter, layer, X)


def test_equal_keys_mean_equal_routes():
    """Rows with one key have one route: each token's first k experts outside D ∪ {j}, from its logits by hand."""
    model, adapter, layer, X, Z = _case()
    with eager_experts(model):
        out = expert_outputs(model, adapter, layer, X, Z, max_dropped=4)
    router = adapter.router(adapter.block(model, layer))
    logits = out.x[0] @ router.weight.T  # [c, E] by hand
    c = logits.shape[0]
    g = torch.Generator().manual_seed(1)
    routes: dict[int, tuple] = {}
    for _ in range(300):
        D = torch.randperm(16, generator=g)[:3]
        held = torch.zeros(16, dtype=torch.bool)
        held[D] = True
        t = torch.randint(0, c, (1,), generator=g)
        free = [e for e in logits[t[0]].argsort(descending=True).tolist() if not held[e]]
        j = torch.tensor([free[int(torch.randint(0, 2, (1,), generator=g))]])  # an expert t selects under D
        key = int(RouteCache.key(RouteCache.parent_bits(out.order[0], held, 2), out.slots[0], t, j))
        route = tuple(e for e in free if e != int(j))[:2]  # its route under D ∪ {j}
        assert routes.setdefault(key, route) == route
    assert len(routes) < 300  # keys repeat


def test_children_served_from_the_cache_equal_the_masked_block(monkeypatch):
    """Parents after the first are scored from the cache too (their tokens' keys were stored when they were
    children): only the root's route goes through the router."""
    model, adapter, layer, X, Z = _case()
    with eager_experts(model):
        out = expert_outputs(model, adapter, layer, X, Z, max_dropped=6)
        ev = incremental_evaluator(model, adapter, layer, out)
        ref = block_evaluator(model, adapter, layer, X, Z)
        assert ev.cache is not None
        routed = []
        real = ev._parent_route
        monkeypatch.setattr(ev, "_parent_route", lambda *a, **kw: routed.append(a[2]) or real(*a, **kw))
        for parent in [(), (3,), (3, 9), (3, 9, 14), (1, 3, 9, 14)]:  # a beam's chain: each a child of the last
            js = [j for j in range(16) if j not in parent]
            for j, got in zip(js, ev.extend(parent, js), strict=True):
                want = ref(tuple(sorted((*parent, j))))
                assert abs(got - want) <= RTOL * abs(want) + 1e-12 * out.target_sq, (parent, j, got, want)
    assert ev.cache.hits > ev.cache.misses  # most rows came from the cache
    assert routed and set(routed) == {()}, routed  # the root (once per chunk and its check), no other parent


def _key_by_hand(cands: list[int], dropped: set[int], k: int) -> int:
    """key(M) = Σ_{s < end} [cand[s] ∈ M]·2^s, end = 1 + the slot of the k-th candidate not in M (every slot if
    fewer than k are kept): the module docstring's definition, one slot at a time."""
    key, kept = 0, 0
    for s, e in enumerate(cands):
        if e in dropped:
            key += 1 << s
        else:
            kept += 1
            if kept == k:
                break
    return key


def test_keys_equal_the_definition_for_every_selected_child():
    """Per parent bits + one slot per child against the definition by hand, on random candidate orders and parents
    that drop from none to nearly all of a token's candidates (the k-th kept one at the last slot, or missing)."""
    g = torch.Generator().manual_seed(5)
    E, C, c, k = 24, 10, 40, 3
    order = torch.stack([torch.randperm(E, generator=g)[:C] for _ in range(c)])  # [c, C] candidates in order
    slot_of = torch.full((c, E), -1, dtype=torch.long)
    slot_of.scatter_(1, order, torch.arange(C).expand(c, C).contiguous())
    checked = 0
    for size in (0, 1, 3, 6, 9, 14, 20):
        held = torch.zeros(E, dtype=torch.bool)
        held[torch.randperm(E, generator=g)[:size]] = True
        bits = RouteCache.parent_bits(order, held, k)
        own, _, route = RouteCache.parent_route(order, held, k)
        D = set(held.nonzero().view(-1).tolist())
        short = False  # D leaves some token fewer than k candidates
        for t in range(c):
            cands = order[t].tolist()
            selected = [e for e in cands if e not in D][:k]  # the experts t selects under D (its children)
            assert int(own[t]) == _key_by_hand(cands, D, k), (size, t)
            short |= len(selected) < k
            if route is not None:
                assert route[t].tolist() == selected, (size, t)
            for j in selected:
                got = int(RouteCache.key(bits, slot_of, torch.tensor([t]), torch.tensor([j])))
                assert got == t + c * _key_by_hand(cands, D | {j}, k), (size, t, j)
                checked += 1
        assert (route is None) == short, size
    assert checked > 500
