"""The offloading simulator against independent references: hit rates worked out by hand on small traces (LRU, LFU,
Belady), Belady equal to a brute-force optimum over every eviction choice and above LRU/LFU on random traces, an
oracle predictor (and a trained one given deterministic routing) reaching what prefetching can give, the timing
model on a hand-computed example and checkpoint sizes read from the safetensors file; bad options refused."""

from __future__ import annotations

import itertools
import json
from functools import cache

import pytest
import torch
from safetensors import safe_open

from moeprune.errors import MoePruneError
from moeprune.offload import OffloadOptions, TimingModel, TransitionPredictor, accuracy, oracle, simulate
from moeprune.offload.options import parse_quality
from moeprune.offload.run import POLICIES, Streams
from moeprune.tiny import save_tiny


def hits(requests: list, E: int, m: int, rule: str) -> list[int]:
    return simulate(torch.tensor(requests), E, m, rule).hits.tolist()


# ------------------------------------------------------------------------------------------ hand-computed traces


def test_lru_lfu_belady_by_hand_one_expert_per_token():
    # E = 3, m = 2, k = 1: 0 0 0 1 2 1 2 1 2
    trace = [[0], [0], [0], [1], [2], [1], [2], [1], [2]]
    # LRU: t3 loads 1 -> {0,1}; t4 evicts 0 (used at t2, 1 at t3) -> {1,2}; t5..t8 hit
    assert hits(trace, 3, 2, "lru") == [0, 1, 1, 0, 0, 1, 1, 1, 1]
    # LFU: 0 was requested 3 times, so t4 evicts 1, t5 evicts 2, t6 evicts 1, ...: 1 and 2 thrash
    assert hits(trace, 3, 2, "lfu") == [0, 1, 1, 0, 0, 0, 0, 0, 0]
    # Belady: at t4, 0 is never requested again, 1 at t5 -> evict 0; everything after hits
    assert hits(trace, 3, 2, "belady") == [0, 1, 1, 0, 0, 1, 1, 1, 1]
    # 0 1 0 2 1 0: LRU evicts 1 at t3, 0 at t4, 2 at t5 (1/6); LFU keeps 0 (count 2) -> 2/6; Belady evicts 0 at t3
    # (next use t5, 1's is t4), hits t4 -> 2/6, which is optimal (3 first uses + one of t4/t5 must miss)
    trace = [[0], [1], [0], [2], [1], [0]]
    assert hits(trace, 3, 2, "lru") == [0, 0, 1, 0, 0, 0]
    assert hits(trace, 3, 2, "lfu") == [0, 0, 1, 0, 0, 1]
    assert hits(trace, 3, 2, "belady") == [0, 0, 1, 0, 1, 0]


def test_two_experts_per_token_by_hand():
    # E = 4, m = 3, k = 2; a token's own experts are never evicted for each other
    trace = [[0, 1], [2, 3], [0, 1], [2, 3], [0, 2]]
    # LRU: t1 loads 2 (fills), loads 3 evicting 0 (0 and 1 both used at t0: lowest index) -> {1,2,3};
    # t2: 1 hits, 0 evicts 2 (2, 3 used at t1) -> {0,1,3}; t3: 3 hits, 2 evicts 0 -> {1,2,3};
    # t4: 2 hits, 0 evicts 1 (used t2; 3 at t3)
    assert hits(trace, 4, 3, "lru") == [0, 0, 1, 1, 1]
    # Belady: t1 evicts 0 (0, 1 both next at t2); t2 evicts 2 for 0 (2, 3 both next at t3: lowest index);
    # t3 evicts 1 for 2 (1 never again, 0 at t4) -> {0,2,3}; t4 hits both
    assert hits(trace, 4, 3, "belady") == [0, 0, 1, 1, 2]
    run = simulate(torch.tensor(trace), 4, 3, "belady")
    assert run.demand.tolist() == [2, 2, 1, 1, 0] and run.hit_rate == pytest.approx(4 / 10)
    assert run.loads_per_token == pytest.approx(6 / 5)


# ------------------------------------------------------------------------------------ optimum and upper bound


def brute_force_min_loads(trace: list[list[int]], m: int) -> int:
    """Fewest loads over every eviction choice (demand paging: load what is missing when it is requested)."""

    @cache
    def best(t: int, cache: frozenset) -> int:
        if t == len(trace):
            return 0
        want = frozenset(trace[t])
        missing = want - cache
        keep = cache | want
        over = len(keep) - m
        if over <= 0:
            return len(missing) + best(t + 1, keep)
        return len(missing) + min(best(t + 1, keep - set(out))
                                  for out in itertools.combinations(sorted(cache - want), over))

    return best(0, frozenset())


def random_trace(T: int, E: int, k: int, seed: int, sticky: float = 0.5) -> torch.Tensor:
    """[T, k] distinct experts per token, with some reuse of the previous token's (locality)."""
    g = torch.Generator().manual_seed(seed)
    rows, prev = [], None
    for _ in range(T):
        if prev is not None and float(torch.rand(1, generator=g)) < sticky:
            row = prev.clone()
            row[int(torch.randint(0, k, (1,), generator=g))] = -1
            free = [e for e in torch.randperm(E, generator=g).tolist() if e not in row.tolist()]
            row[row == -1] = free[0]
        else:
            row = torch.randperm(E, generator=g)[:k]
        rows.append(row)
        prev = row
    return torch.stack(rows)


@pytest.mark.parametrize("E,k,m", [(4, 1, 2), (5, 2, 3), (6, 2, 4)])
def test_belady_is_the_brute_force_optimum(E, k, m):
    for seed in range(6):
        trace = random_trace(9, E, k, seed)
        run = simulate(trace, E, m, "belady")
        assert int(run.demand.sum()) == brute_force_min_loads(trace.tolist(), m)


@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (16, 2), (16, 4)])
def test_belady_bounds_lru_and_lfu_and_any_prefetching(E, k):
    for seed in range(5):
        trace = random_trace(300, E, k, seed, sticky=0.3 * (seed % 3))
        for m in range(k, E + 1, max(1, k)):
            bel = simulate(trace, E, m, "belady")
            for rule in ("lru", "lfu"):
                other = simulate(trace, E, m, rule)
                assert int(bel.hits.sum()) >= int(other.hits.sum()), (rule, m, seed)
            guesses = random_trace(300, E, min(k, m), seed + 100, sticky=0.0)  # arbitrary prefetching
            pre = simulate(trace, E, m, "lru", guesses)
            assert int(bel.demand.sum()) <= int((pre.demand + pre.prefetch).sum())  # fewest experts moved


# ---------------------------------------------------------------------------------------------- prefetching


def chained_layers(T: int, E: int, k: int, seed: int) -> list[torch.Tensor]:
    """Three layers whose routing is a fixed function of the previous layer's (a permutation of the experts)."""
    first = random_trace(T, E, k, seed)
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(seed + 7))
    return [first, perm[first], perm[perm[first]]]


def test_oracle_reaches_what_prefetching_can_give():
    """Perfect guesses: every request of a predicted layer is resident when the layer runs (hit rate 1), and the
    experts moved are exactly those demand paging moves with the same eviction rule: LRU's with LRU, the optimum
    (Belady's) with Belady. No prefetch can do better on either count."""
    E, k = 8, 2
    for seed in range(3):
        layers = chained_layers(200, E, k, seed)
        for m in (2, 4, 6):
            for rule in ("lru", "belady"):
                demand = simulate(layers[1], E, m, rule)
                perfect = simulate(layers[1], E, m, rule, oracle(layers[1], k))
                assert perfect.hit_rate == 1.0 and int(perfect.demand.sum()) == 0
                assert perfect.prefetch.tolist() == demand.demand.tolist()


def test_a_trained_predictor_with_perfect_information_equals_the_oracle():
    """Routing that the previous layer determines: the transition table learns it from training traces and, on
    fresh test traces, predicts with recall = precision = 1, so predictive prefetch equals oracle prefetch."""
    E, k, layers = 8, 2, [0, 1, 2]
    train = chained_layers(400, E, k, 0)
    first = random_trace(150, E, k, seed=1)  # other tokens than training, the same routing function
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(7))  # chained_layers' permutation (seed 0)
    test = [first, perm[first], perm[perm[first]]]
    pred = TransitionPredictor.train({la: [t] for la, t in zip(layers, train, strict=True)}, layers, E)
    guesses = [None] + [pred.predict(la, test[i], k) for i, la in enumerate(layers[1:])]
    for g, true in zip(guesses[1:], test[1:], strict=True):
        assert accuracy(g, true) == {"recall": 1.0, "precision": 1.0}
    streams = Streams(layers, test, E, guesses, [None] + [oracle(t, k) for t in test[1:]])
    for m in (2, 4):
        for i in range(3):
            a, b = POLICIES.get("predictive")(streams, i, m), POLICIES.get("oracle")(streams, i, m)
            assert a.hits.tolist() == b.hits.tolist() and a.prefetch.tolist() == b.prefetch.tolist()
        assert POLICIES.get("predictive")(streams, 1, m).hit_rate == 1.0


def test_predictor_accuracy_by_hand():
    guess = torch.tensor([[0, 1], [2, 3], [4, -1]])  # the last guesses one expert (p = 1 after the pad)
    true = torch.tensor([[1, 5], [6, 7], [4, 0]])
    acc = accuracy(guess, true)
    assert acc["recall"] == pytest.approx((1 / 2 + 0 + 1 / 2) / 3)
    assert acc["precision"] == pytest.approx((1 / 2 + 0 + 1) / 3)


# ------------------------------------------------------------------------------------------------------ timing


def test_timing_model_by_hand():
    # β = 50e6 B / 25 GB/s = 2 ms; c = 2 (2·1e6 + 2e6 / 2) / 6e9 FLOP/s = 1 ms
    tm = TimingModel(expert_bytes=50_000_000, expert_params=1_000_000, other_params=2_000_000, moe_layers=2,
                     top_k=2, bandwidth=25.0, tflops=0.006)
    assert tm.transfer_s == pytest.approx(2e-3) and tm.compute_s == pytest.approx(1e-3)
    demand = torch.tensor([[1, 0], [0, 2]])  # [layer, token]
    prefetch = torch.tensor([[0, 0], [3, 1]])
    # token 0: layer 0 = 1 + 1·2 = 3 ms; layer 1 = 1 + 0 + max(0, 3·2 − 1) = 6 ms -> 9 ms
    # token 1: layer 0 = 1 ms; layer 1 = 1 + 2·2 + max(0, 1·2 − 1) = 6 ms -> 7 ms
    assert tm.token_times(demand, prefetch).tolist() == pytest.approx([9e-3, 7e-3])
    assert tm.resident_s == pytest.approx(2e-3) and tm.memory(3) == 3 * 2 * 50_000_000


def test_timing_sizes_from_the_checkpoint(tmp_path):
    ckpt = save_tiny("qwen3_moe", tmp_path / "m", seed=0)
    expert = other = 0
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if ".mlp.experts." in name:
                expert += t.numel() * t.element_size()
            else:
                other += t.numel()
    cfg = json.loads((ckpt / "config.json").read_text())
    E = cfg["num_local_experts"]
    n = sum(1 for i in range(cfg["num_hidden_layers"]) if i not in cfg.get("mlp_only_layers", []))
    tm = TimingModel.from_checkpoint(ckpt, 25, 100)
    assert tm.moe_layers == n and tm.top_k == cfg["num_experts_per_tok"]
    assert tm.expert_bytes * E * n == expert
    assert tm.expert_params == 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]
    assert tm.other_params == other


# ---------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("sizes,match", [(("0k",), "not a cache size"), (("x",), "not a cache size"),
                                         (("1",), "outside"), (("9",), "outside"), ((), "empty")])
def test_bad_cache_sizes_are_refused(sizes, match):
    with pytest.raises(MoePruneError, match=match):
        OffloadOptions(cache_sizes=sizes).sizes(top_k=2, num_experts=8)


def test_bad_options_are_refused():
    for kw, match in [({"bandwidth": 0}, "--bandwidth"), ({"tflops": -1.0}, "--flops"), ({"prefetch": 0}, "prefetch"),
                      ({"static_quality": {1.5: 1.1}}, "--static-quality"), ({"quality_target": 0.9}, "target")]:
        with pytest.raises(MoePruneError, match=match):
            OffloadOptions(**kw)
    with pytest.raises(MoePruneError, match="smallest cache"):
        OffloadOptions(cache_sizes=("k",), prefetch=3).prefetch_count(2, 2)
    with pytest.raises(MoePruneError, match="RATIO=PERPLEXITY_RATIO"):
        parse_quality("0.25:1.1")
    assert parse_quality("0.25=1.05, 0.5=1.9") == {0.25: 1.05, 0.5: 1.9}
    with pytest.raises(MoePruneError, match="k <= m <= E"):
        simulate(torch.tensor([[0, 1]]), 4, 1)
    with pytest.raises(MoePruneError, match="unknown eviction rule"):
        simulate(torch.tensor([[0, 1]]), 4, 2, "fifo")


def test_belady_and_sch_bound_neither_the_other():
    """SCH(L, m) (analysis/lrc.py: a cache fixed per L-token segment, switches free) is no bound of the per-token
    Belady cache either way: at L = 1 it hits always, over a whole phase-switching trace it is one static set."""
    from moeprune.analysis.lrc import sch

    trace = torch.tensor([[0, 1]] * 50 + [[2, 3]] * 50)  # two phases, E = 4, k = m = 2
    bel = simulate(trace, 4, 2, "belady").hit_rate  # only the 4 first uses miss
    assert bel == pytest.approx(1 - 4 / 200)
    assert sch(trace, 4, 1, 2) == 1.0 > bel
    assert sch(trace, 4, 100, 2) == 0.5 < bel
