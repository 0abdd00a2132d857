"""NAEE's precomputed-outputs evaluator against the block-forward reference (`reconstruction.block_evaluator`: the
model's own MoE block run with the experts masked in its own router), for every family, and the beam search
against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moeprune.calibration.session import eager_experts
from moeprune.errors import MoePruneError
from moeprune.models import get_adapter
from moeprune.select.naee_evaluator import fast_evaluator
from moeprune.select.naee_outputs import expert_outputs
from moeprune.select.reconstruction import block_evaluator, search
from moeprune.tiny import FAMILY_CONFIGS, tiny_model

# fast err(D) vs the block forward's, both float64 sums over float32 models: relative, plus an absolute floor for
# D = ∅ (0 in exact arithmetic; float32 rounding of two routes to the same output, ~1e-13 here)
RTOL, ATOL = 1e-5, 1e-9


def cache(family: str, seed: int = 2, batches: int = 2):
    """(model, adapter, layer, X, Z, valid): random block inputs [2, 12, H] with ~30 % padding rows, block outputs
    from the model's own block (eager experts, as calibration runs it)."""
    model = tiny_model(family, seed=seed)
    adapter = get_adapter(model.config)
    layer = adapter.moe_layers()[-1]
    g = torch.Generator().manual_seed(seed)
    H = adapter.config.hidden_size
    X = [torch.randn(2, 12, H, generator=g) for _ in range(batches)]
    valid = [torch.rand(2, 12, generator=g) > 0.3 for _ in range(batches)]
    return model, adapter, layer, X, block_outputs(model, adapter, layer, X), valid


def block_outputs(model, adapter, layer: int, X: list[torch.Tensor]) -> list[torch.Tensor]:
    """The layer's own MoE block on each input batch (eager experts, as calibration runs it): the cached Z."""
    block = adapter.block(model, layer)
    with torch.no_grad(), eager_experts(model):
        Z = [block(x) for x in X]
    return [z[0] if isinstance(z, tuple) else z for z in Z]  # gpt-oss also returns router scores


def random_drops(adapter, n: int, seed: int) -> list[tuple[int, ...]]:
    """n random dropped sets of 1..3 experts that the router can still route around (≤ 2 per router group)."""
    E, routing = adapter.num_experts, adapter.routing()
    size = E // routing.n_group if routing.group_limited else E
    g = torch.Generator().manual_seed(seed)
    out: list[tuple[int, ...]] = []
    while len(out) < n:
        D = tuple(sorted(torch.randperm(E, generator=g)[: int(torch.randint(1, 4, (), generator=g))].tolist()))
        if all(sum(1 for j in D if j // size == grp) <= size - 2 for grp in range(E // size)):
            out.append(D)
    return out


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_fast_error_equals_block_forward_error(family):
    model, adapter, layer, X, Z, valid = cache(family)
    with eager_experts(model):
        ref = block_evaluator(model, adapter, layer, X, Z, valid)
        outputs = expert_outputs(model, adapter, layer, X, Z, valid)
        fast = fast_evaluator(model, adapter, layer, outputs)
        assert outputs.tokens == outputs.total_tokens == sum(int(v.sum()) for v in valid)  # padding excluded
        assert fast(()) == pytest.approx(0.0, abs=ATOL) and ref(()) == pytest.approx(0.0, abs=ATOL)
        errors = []
        drops = random_drops(adapter, 6, seed=len(family))
        for D in drops:
            want, got = ref(D), fast(D)
            assert got == pytest.approx(want, rel=RTOL, abs=ATOL), (family, D)
            errors.append(want)
    assert min(errors) > 1e-3  # dropping experts really changes the block output
    # the valid mask matters: summed over every row (padding included) the same drops cost more
    with eager_experts(model):
        everything = block_evaluator(model, adapter, layer, X, Z)
        assert sum(everything(D) for D in drops) > sum(errors) * (1 + 1e-3)


@pytest.mark.parametrize("family", ["qwen2_moe", "glm4_moe"])
def test_exhaustive_search_picks_the_same_subset_with_both_evaluators(family):
    model, adapter, layer, X, Z, valid = cache(family, seed=5)
    groups = adapter.routing().n_group if adapter.routing().group_limited else 1
    with eager_experts(model):
        tables = []
        for evaluate in (block_evaluator(model, adapter, layer, X, Z, valid),
                         fast_evaluator(model, adapter, layer, expert_outputs(model, adapter, layer, X, Z, valid))):
            table: dict[tuple[int, ...], float] = {}
            result = search(lambda D, f=evaluate, t=table: t.setdefault(D, f(D)), 8, 2, groups=groups)
            assert result.exhaustive
            tables.append((result, table))
    (old, t_old), (new, t_new) = tables
    assert new.dropped == old.dropped and new.error == pytest.approx(old.error, rel=RTOL)
    assert t_new.keys() == t_old.keys() and len(t_new) == (28 if groups == 1 else 16)
    for D in t_old:  # the whole landscape agrees, not just its minimum
        assert t_new[D] == pytest.approx(t_old[D], rel=RTOL, abs=ATOL), D
    ranked = sorted(t_old.values())
    assert ranked[1] - ranked[0] > 1e-3 * ranked[0]  # the optimum is not decided by rounding


def test_token_budget_keeps_evenly_strided_real_tokens(monkeypatch):
    from moeprune.select import naee_outputs

    model, adapter, layer, X, Z, valid = cache("qwen3_moe")
    total = sum(int(v.sum()) for v in valid)
    with eager_experts(model):
        capped = expert_outputs(model, adapter, layer, X, Z, valid, max_tokens=total // 3)
        full = expert_outputs(model, adapter, layer, X, Z, valid)
        monkeypatch.setattr(naee_outputs, "PRECOMPUTE_BYTES", 1)  # the experts then run on one token at a time
        small_chunks = expert_outputs(model, adapter, layer, X, Z, valid, chunk_tokens=5)
    for a, b in ((small_chunks.gram, full.gram), (small_chunks.cross, full.cross)):
        torch.testing.assert_close(torch.cat(a), torch.cat(b), rtol=1e-5, atol=1e-7)  # float32 experts
    stride = math.ceil(total / (total // 3))
    assert capped.total_tokens == total and capped.tokens == -(-total // stride) <= total // 3
    # reference: the real tokens in cache order, every stride-th kept, their router inputs
    rows = torch.cat([x.reshape(-1, x.shape[-1])[v.reshape(-1)] for x, v in zip(X, valid, strict=True)])  # [T, H]
    assert torch.equal(torch.cat(capped.x), rows[::stride])
    assert len(small_chunks.x) == math.ceil(total / 5) and torch.equal(torch.cat(small_chunks.x), torch.cat(full.x))
    D = (1, 4)
    assert fast_evaluator(model, adapter, layer, small_chunks)(D) == pytest.approx(
        fast_evaluator(model, adapter, layer, full)(D), rel=1e-6)
    with pytest.raises(MoePruneError, match="max_tokens"):
        expert_outputs(model, adapter, layer, X, Z, valid, max_tokens=0)
    with pytest.raises(MoePruneError, match="no real"):
        expert_outputs(model, adapter, layer, X, Z, [torch.zeros_like(v) for v in valid])
    with pytest.raises(MoePruneError, match="valid masks"):
        expert_outputs(model, adapter, layer, X, Z, [v[:, :5] for v in valid])


# ------------------------------------------------------------------------------------------------ beam search
def interacting_table(seed: int, E: int):
    """A non-additive error: per-expert costs plus random pairwise interactions (what makes greedy fallible)."""
    g = torch.Generator().manual_seed(seed)
    single, pair = torch.rand(E, generator=g), torch.randn(E, E, generator=g) * 0.3

    def evaluate(D):
        return float(sum(single[j] for j in D) + sum(pair[i, j] for i, j in itertools.combinations(D, 2)))

    return evaluate


def test_beam_is_never_worse_than_greedy_and_wide_beams_are_exhaustive():
    E, n = 10, 4
    wins = optimum_hits = greedy_hits = 0
    for seed in range(30):
        evaluate = interacting_table(seed, E)
        best = min(itertools.combinations(range(E), n), key=evaluate)  # brute force, C(10, 4) = 210
        greedy = search(evaluate, E, n, max_exhaustive=0, beam=1)
        beam = search(evaluate, E, n, max_exhaustive=0, beam=4)
        assert greedy.evaluated == 10 + 9 + 8 + 7 and not beam.exhaustive
        assert beam.evaluated <= 5 * (10 + 9 + 8 + 7)  # ≤ (b + 1)·Σ_{i<n}(E − i)
        assert evaluate(best) <= beam.error <= greedy.error  # by construction: the greedy chain stays in the beam
        assert beam.error == evaluate(beam.dropped)
        wins += beam.error < greedy.error
        optimum_hits += beam.dropped == best
        greedy_hits += greedy.dropped == best
        wide = search(evaluate, E, n, max_exhaustive=0, beam=math.comb(E, n // 2 + 1))  # ≥ every C(E, i), i < n
        assert wide.dropped == best
    assert wins > 0 and optimum_hits > greedy_hits  # the beam does find better sets on these landscapes


def test_beam_on_a_real_block_against_brute_force():
    model, adapter, layer, X, Z, valid = cache("qwen3_moe", seed=7, batches=3)
    with eager_experts(model):
        evaluate = fast_evaluator(model, adapter, layer, expert_outputs(model, adapter, layer, X, Z, valid))
        exact = search(evaluate, 8, 4)  # C(8, 4) = 70, exhaustive
        greedy = search(evaluate, 8, 4, max_exhaustive=0, beam=1)
        beam = search(evaluate, 8, 4, max_exhaustive=0, beam=4)
        ref = block_evaluator(model, adapter, layer, X, Z, valid)
        assert ref(beam.dropped) == pytest.approx(beam.error, rel=RTOL)
    assert exact.exhaustive and exact.evaluated == 70
    assert exact.error <= beam.error <= greedy.error
    assert beam.evaluated < exact.evaluated


def test_beam_respects_groups_and_protection_and_refuses_bad_widths():
    evaluate = interacting_table(3, 12)
    for beam in (1, 3):
        r = search(evaluate, 12, 6, groups=3, protected={0, 5}, max_exhaustive=0, beam=beam)
        assert not {0, 5} & set(r.dropped) and sorted(j // 4 for j in r.dropped) == [0, 0, 1, 1, 2, 2]
    allowed = [D for D in itertools.combinations(range(12), 6)
               if not {0, 5} & set(D) and all(sum(j // 4 == g for j in D) == 2 for g in range(3))]
    wide = search(evaluate, 12, 6, groups=3, protected={0, 5}, max_exhaustive=0, beam=10_000)  # keeps all
    assert wide.dropped == min(allowed, key=evaluate)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(MoePruneError, match="beam"):
            search(evaluate, 12, 6, beam=bad)


def test_stage_beam_option_is_for_naee_only():
    from moeprune.stages.experts import EXPERTS

    assert EXPERTS.parse({"method": "naee", "ratio": 0.25, "beam": 8}, "recipe stage 1").beam == 8
    for raw, msg in (({"method": "reap", "ratio": 0.25, "beam": 8}, "width of NAEE"),
                     ({"method": "naee", "ratio": 0.25, "beam": 0}, "integer >= 1")):
        with pytest.raises(MoePruneError, match=msg):
            EXPERTS.parse(raw, "recipe stage 1")


def test_stage_search_tokens_option_is_for_naee_only_and_reaches_the_search(tmp_path, monkeypatch):
    from moeprune import api
    from moeprune.cli import build_parser
    from moeprune.select import progressive
    from moeprune.select.naee_outputs import DEFAULT_SEARCH_TOKENS
    from moeprune.stages.experts import EXPERTS
    from moeprune.tiny import save_tiny

    assert EXPERTS.parse({"method": "naee", "ratio": 0.25, "search_tokens": 0}, "s").search_tokens == 0
    prune = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("prune"))
    flag = next(a for a in prune._actions if a.dest == "search_tokens")
    assert f"default {DEFAULT_SEARCH_TOKENS};" in flag.help  # the help (no torch import) states the real default
    for raw, msg in (({"method": "reap", "ratio": 0.25, "search_tokens": 512}, "tokens NAEE's search keeps"),
                     ({"method": "naee", "ratio": 0.25, "search_tokens": -1}, "or 0 for every token"),
                     ({"method": "naee", "ratio": 0.25, "search_tokens": True}, "or 0 for every token")):
        with pytest.raises(MoePruneError, match=msg):
            EXPERTS.parse(raw, "recipe stage 1")
    seen = []
    real = progressive.expert_outputs
    monkeypatch.setattr(progressive, "expert_outputs", lambda *a, **kw: seen.append(kw["max_tokens"]) or real(*a, **kw))
    ckpt = save_tiny("qwen3_moe", tmp_path / "m", with_tokenizer=True)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(400)))
    calib = api.CalibrateOptions((f"web={text}",), samples=4, seq_len=32)
    for option, want in (({}, DEFAULT_SEARCH_TOKENS), ({"search_tokens": 0}, None), ({"search_tokens": 40}, 40)):
        seen.clear()
        api.prune(ckpt, tmp_path / f"out{want}", method="naee", ratio=0.25, calib=calib, run_verify=False, **option)
        assert seen == [want] * 2  # both MoE layers
