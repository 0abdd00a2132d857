"""err(D) on the re-routed tokens only (`select/rerouted.py`, the redundancy probe's evaluator) equals the model's
own block run by hand on every token with D masked in its own router, for every routing kind: softmax-top-k with and
without renormalisation, Mixtral, gpt-oss, group-limited sigmoid routers with correction bias and shared experts,
pre-scaled experts (Llama 4), zero experts (LongCat-Flash), unflattened expert inputs (DBRX). Where the router
renormalises, exactly the tokens with a dropped expert among their unmasked top-k (top-k of the router logits, by
hand) are re-run; where it does not, also those whose weights move."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeprune.analysis.probe import uniform_drop
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.select.rerouted import ReroutedEvaluator
from moeprune.tiny import FAMILY_CONFIGS, tiny_model
from moeprune.tiny_families import NOT_BUILDABLE, tiny_family_model

MORE = ["llama4_text", "longcat_flash", "dbrx", "hy_v3", "minimax_m2", "ernie4_5_moe", "qwen3_next"]
N = 64  # token rows


def _block_case(family: str):
    model = (tiny_model(family, seed=3) if family in FAMILY_CONFIGS else tiny_family_model(family, seed=3)).eval()
    adapter = get_adapter(model.config, model=model)
    layer = adapter.moe_layers()[0]
    H = model.config.get_text_config().hidden_size
    x = torch.randn(N, H, generator=torch.Generator().manual_seed(5))  # [N, H]
    with torch.no_grad():
        z = adapter.block(model, layer)(x[None])
    z = (z[0] if isinstance(z, tuple) else z).reshape(N, H)  # [N, H] (llama4's block returns it flattened)
    return model, adapter, layer, x, z


def _masked_error(model, adapter, layer, x, z, dropped) -> float:
    """Σ_t ‖z_t − block_{E∖D}(x_t)‖² over every row, the block run by hand."""
    with torch.no_grad(), masked_experts(model, adapter, {layer: list(dropped)}):
        out = adapter.block(model, layer)(x[None])
    out = (out[0] if isinstance(out, tuple) else out).reshape(z.shape)
    return float((z.double() - out.double()).square().sum())


def _drops(model, adapter, layer, x, z) -> list[tuple[int, ...]]:
    """Group-equal sets at 25 % and 50 % of the experts whose masking alone costs the most (so that the sets
    matter on these rows), and the costliest expert alone where groups allow it."""
    E, routing = adapter.num_experts, adapter.routing()
    alone = torch.tensor([_masked_error(model, adapter, layer, x, z, (e,)) for e in range(E)])  # [E]
    sets = [tuple(uniform_drop(-alone, r, routing, higher_keeps=True)) for r in (0.25, 0.5)]
    return sets + ([(int(alone.argmax()),)] if not routing.group_limited else [])


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS) + [m for m in MORE if m not in NOT_BUILDABLE])
def test_rerouted_error_equals_the_masked_block_on_every_token(family):
    model, adapter, layer, x, z = _block_case(family)
    ev = ReroutedEvaluator(model, adapter, layer, x, z)
    scale = float(z.double().square().sum())
    drops = _drops(model, adapter, layer, x, z)
    for dropped in drops:
        want = _masked_error(model, adapter, layer, x, z, dropped)
        assert want > 1e-6 * scale, (family, dropped)  # the set changes the output: the comparison means something
        assert ev(dropped) == pytest.approx(want, rel=1e-5, abs=1e-9 * scale), (family, dropped)
    assert 0 < ev.tokens_run <= ev.tokens_seen == N * len(drops)


def _router_probs(model, adapter, layer, x) -> torch.Tensor:
    """[N, E] softmax of the router's logits, computed by hand in float64."""
    router = adapter.router(adapter.block(model, layer))
    return torch.softmax(F.linear(x.double(), router.weight.double()), dim=-1)


def _topk_hits(probs: torch.Tensor, k: int, dropped) -> set[int]:
    """Rows whose unmasked top-k holds a dropped expert."""
    top = probs.topk(k, dim=-1).indices  # [N, k]
    return {t for t in range(probs.shape[0]) if set(top[t].tolist()) & set(dropped)}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_renormalising_routers_rerun_exactly_the_tokens_that_lose_an_expert(family):
    model, adapter, layer, x, z = _block_case(family)
    ev = ReroutedEvaluator(model, adapter, layer, x, z)
    probs = _router_probs(model, adapter, layer, x)
    for dropped in _drops(model, adapter, layer, x, z):
        want = _topk_hits(probs, adapter.top_k, dropped)
        assert 0 < len(want) < N, (family, dropped)  # some tokens keep their experts, some lose one
        assert set(ev.rerouted(dropped).tolist()) == want, (family, dropped)


def test_without_renormalisation_tokens_rerun_when_their_weights_move():
    """qwen2_moe weights are a softmax over every expert: masking D scales a token's kept weights by 1/(1 − p_D(t))
    (p_D = its probability mass on D, by hand). Tokens that lose an expert or whose weights move by more than
    100·TOL run; those that keep their experts with weights moving by less than TOL/100 do not."""
    from moeprune.select.rerouted import TOL

    model, adapter, layer, x, z = _block_case("qwen2_moe")
    ev = ReroutedEvaluator(model, adapter, layer, x, z)
    probs = _router_probs(model, adapter, layer, x)
    moved_alone = 0
    for dropped in _drops(model, adapter, layer, x, z):
        hits = _topk_hits(probs, adapter.top_k, dropped)
        mass = probs[:, list(dropped)].sum(-1)  # [N]
        move = mass / (1 - mass)  # relative change of every kept weight
        must = hits | {t for t in range(N) if move[t] > 100 * TOL}
        may = hits | {t for t in range(N) if move[t] > TOL / 100}
        rows = set(ev.rerouted(dropped).tolist())
        assert must <= rows <= may, (dropped, sorted(must - rows), sorted(rows - may))
        moved_alone += len(must - hits)
    assert moved_alone > 0  # tokens that keep their experts are re-run because their weights move


def test_prescaled_experts_run_every_token():
    """llama4 pre-scales its experts' inputs, so no routing reaches them to compare: every row runs."""
    model, adapter, layer, x, z = _block_case("llama4_text")
    ev = ReroutedEvaluator(model, adapter, layer, x, z)
    assert ev.base is None
    for dropped in _drops(model, adapter, layer, x, z):
        assert ev.rerouted(dropped).tolist() == list(range(N)), dropped
