"""NAEE's route cache (`select/naee_route_cache.py`): the keys against each token's route computed by hand from its
router's logits, and children served from the cache against the block-forward reference (`reconstruction.
block_evaluator`: the model's own block with the set masked in its own router, every token)."""

from __future__ import annotations

import math

import pytest
import torch

from moeprune.calibration.session import eager_experts
from moeprune.models import get_adapter
from moeprune.select.naee_incremental import incremental_evaluator
from moeprune.select.naee_outputs import expert_outputs
from moeprune.select.naee_route_cache import NO_KEY, RouteCache
from moeprune.select.reconstruction import block_evaluator
from moeprune.tiny import FAMILY_CONFIGS, tiny_model
from test_naee_fast import block_outputs

RTOL = 1e-6  # routers round their softmax in float32 (test_naee_incremental.py); the block forward is float64


COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")  # the expert count's name in tiny configs


def _case(num_experts: int = 16, top_k: int = 2, family: str = "qwen3_moe", seed: int = 8, tokens: int = 48):
    """(float64 tiny model, adapter, its last MoE layer, X: two [2, tokens, H] random batches, Z: its block's)."""
    count = next(k for k in COUNT_KEYS if k in FAMILY_CONFIGS[family])
    model = tiny_model(family, seed=seed, **{count: num_experts}, num_experts_per_tok=top_k).double()
    adapter = get_adapter(model.config, model=model)
    layer = adapter.moe_layers()[-1]
    g = torch.Generator().manual_seed(seed)
    X = [torch.randn(2, tokens, adapter.config.hidden_size, generator=g, dtype=torch.float64) for _ in range(2)]
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
        key = int(RouteCache.key(RouteCache.parent_route(out.order[0], held, 2), out.slots[0], t, j))
        route = tuple(e for e in free if e != int(j))[:2]  # its route under D ∪ {j}
        assert routes.setdefault(key, route) == route
    assert len(routes) < 300  # keys repeat


@pytest.mark.parametrize("key_bits", [None, 3])
def test_children_served_from_the_cache_equal_the_masked_block(monkeypatch, key_bits):
    """Parents after the first are scored from the cache too (their tokens' keys were stored when they were
    children), each from the parent before it: only the root's route goes through the router. With keys of 3 bits
    (`key_bits`), routes that end at slot 3 or beyond are routed, the others still served: the same errors."""
    if key_bits is not None:
        monkeypatch.setattr(RouteCache, "key_bits", staticmethod(lambda tokens: key_bits))
    model, adapter, layer, X, Z = _case()
    with eager_experts(model):
        out = expert_outputs(model, adapter, layer, X, Z, max_dropped=6)
        ev = incremental_evaluator(model, adapter, layer, out)
        ref = block_evaluator(model, adapter, layer, X, Z)
        c = out.gram[0].shape[0]  # tokens of the one chunk: keys t + c·key_t of 62 − ⌈log2(c + 1)⌉ bits
        assert ev.cache is not None and ev.cache.limit == (key_bits or 62 - math.ceil(math.log2(c + 1)))
        routed = []
        real = ev._parent_route
        monkeypatch.setattr(ev, "_parent_route", lambda *a, **kw: routed.append(a[2]) or real(*a, **kw))
        rerouted = []
        reroute = ev._reroute
        monkeypatch.setattr(ev, "_reroute", lambda *a: rerouted.append(a[4].shape[0]) or reroute(*a))
        for parent in [(), (3,), (3, 9), (3, 9, 14), (1, 3, 9, 14)]:  # a beam's chain: each a child of the last
            js = [j for j in range(16) if j not in parent]
            for j, got in zip(js, ev.extend(parent, js), strict=True):
                want = ref(tuple(sorted((*parent, j))))
                assert abs(got - want) <= RTOL * abs(want) + 1e-12 * out.target_sq, (parent, j, got, want)
    assert ev.derived == 4  # every parent after the root scored from the one before it, on the tokens it moves
    # one router call per scoring of the root, then per parent two (its tokens the last drop moves, under the
    # parent before it and under itself), each fewer rows than the root's
    assert len(rerouted) == 1 + 2 * 4 and max(rerouted[1:]) < rerouted[0], rerouted
    if key_bits is None:
        assert routed and set(routed) == {()}, routed  # the root (once per chunk and its check), no other parent
        assert not any(rerouted[1::2]) and ev.cache.hits > 0, rerouted  # the rows under D' all from the cache
    else:  # some parents' routes reach slot 3: routed whole; their later children still hit the cache
        assert len(set(routed)) > 1 and ev.cache.hits > 0 and sum(rerouted[-4:]) > 0, (routed, rerouted)


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


@pytest.mark.parametrize("C,limit", [(10, 62), (10, 6), (10, 3), (80, 50)])
def test_keys_equal_the_definition_for_every_selected_child(C, limit):
    """Per parent bits + one slot per child against the definition by hand, on random candidate orders and parents
    that drop from none to nearly all of a token's candidates (the k-th kept one at the last slot, or missing).
    With keys of `limit` bits: a key is flagged as not fitting exactly when the definition's is ≥ 2^limit, and the
    others are exact (C = 80: candidates past an int64's bits, as at E = 128, top-8, 50 %)."""
    g = torch.Generator().manual_seed(5 + C + limit)
    E, c, k = max(24, 2 * C), 40, 3
    order = torch.stack([torch.randperm(E, generator=g)[:C] for _ in range(c)])  # [c, C] candidates in order
    slot_of = torch.full((c, E), -1, dtype=torch.long)
    slot_of.scatter_(1, order, torch.arange(C).expand(c, C).contiguous())
    checked, flagged = 0, 0
    for size in (0, 1, 3, 6, 9, 14, 20, E // 2, E - 4):
        held = torch.zeros(E, dtype=torch.bool)
        held[torch.randperm(E, generator=g)[:size]] = True
        route_d = RouteCache.parent_route(order, held, k, limit)
        D = set(held.nonzero().view(-1).tolist())
        short = False  # D leaves some token fewer than k candidates
        for t in range(c):
            cands = order[t].tolist()
            selected = [e for e in cands if e not in D][:k]  # the experts t selects under D (its children)
            own = _key_by_hand(cands, D, k)
            # the flags' rule by hand: e = 1 + slot of the k-th kept candidate, u = the first free slot from e on
            free = [s for s, e in enumerate(cands) if e not in D]
            end = free[k - 1] + 1 if len(free) >= k else C + 1
            u = next((s for s in free if s >= end), C)
            assert bool(route_d.own_fits[t]) == (end <= limit), (size, t)
            assert bool(route_d.child_fits[t]) == (u < limit if end <= C else end <= limit), (size, t)
            if route_d.own_fits[t]:  # flagged: exact; a key of L bits or more is never flagged
                assert int(route_d.own[t]) == own, (size, t)
            assert own < 1 << limit or not route_d.own_fits[t], (size, t)
            short |= len(selected) < k
            if route_d.selected is not None:
                assert route_d.selected[t].tolist() == selected, (size, t)
            for j in selected:
                want = _key_by_hand(cands, D | {j}, k)
                got = int(RouteCache.key(route_d, slot_of, torch.tensor([t]), torch.tensor([j])))
                assert got == (t + c * want if route_d.child_fits[t] else NO_KEY), (size, t, j)
                assert want < 1 << limit or not route_d.child_fits[t], (size, t, j)
                checked += 1
                flagged += not route_d.child_fits[t]
        assert (route_d.selected is None) == short, size
    assert checked > 500 and (flagged > 0) == (limit < C), (checked, flagged)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "qwen3_vl_moe"])
def test_parents_scored_from_the_parent_before_them_equal_the_masked_block(family):
    """A beam's parents: each scored from a kept parent it extends by one expert (`IncrementalEvaluator._derived`,
    on the tokens that expert moves), siblings from the same one, a parent whose parents were not extended from
    every token. Every child's error equals the block forward's with its set masked (float64 model)."""
    model, adapter, layer, X, Z = _case(family=family, seed=11, tokens=40)
    with eager_experts(model):
        ev = incremental_evaluator(model, adapter, layer, expert_outputs(model, adapter, layer, X, Z, max_dropped=5,
                                                                         chunk_tokens=48))
        assert ev.cache is not None, family
        ref = block_evaluator(model, adapter, layer, X, Z)
        errors: dict[tuple[int, ...], float] = {}
        parents = [(), "best", "second", "best of best", (0, 5, 9, 12)]  # the last: no parent of it kept
        best = ()
        for step, parent in enumerate(parents):
            if parent in ("best", "second"):
                ranked = sorted((e, D) for D, e in errors.items() if len(D) == 1)
                parent = ranked[0 if parent == "best" else 1][1]
                best = ranked[0][1]
            elif parent == "best of best":
                parent = min((e, D) for D, e in errors.items() if len(D) == 2 and set(best) <= set(D))[1]
            js = [j for j in range(16) if j not in parent]
            for j, got in zip(js, ev.extend(parent, js), strict=True):
                D = tuple(sorted((*parent, j)))
                errors[D] = got
                want = ref(D)
                assert abs(got - want) <= RTOL * abs(want) + 1e-12 * ev.outputs.target_sq, (family, parent, j)
            assert ev.derived == min(step, 3), (family, step, ev.derived)
