"""Routing policies (topk, top_p, naee_skip) inside the family's own router, against brute force.

The reference re-implements, per token and in plain Python, each family's routing from the router logits captured
on the same forward (softmax top-k renormalised: qwen3_moe; sigmoid + correction bias + groups + scaling:
deepseek_v3; top-k then softmax: gpt_oss) and each policy's rule, then compares the experts the policy-routed
model hands to its experts (a pre-hook on the experts module) and their weights. Exports: a static topk is a stock
config change (stock from_pretrained == the policy applied in memory); a dynamic export loaded by
`moeprune.load_model` == the policy in memory, while stock from_pretrained loads the model's own routing.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeprune
from moeprune.calibration.run import CalibrateOptions
from moeprune.errors import MoePruneError
from moeprune.eval.run import EvalOptions, evaluate
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.routing import rules
from moeprune.routing.apply import apply_routing, read_routing, remove_routing, routing_report
from moeprune.routing.fit import fit_naee, fit_top_p
from moeprune.routing.plan import RoutingPlan
from moeprune.tiny import save_tiny, tiny_model
from refusal import assert_refused
from textgen import write_words

K = 4  # experts per token of the tiny models here (E = 8)
FAMILIES = {"qwen3_moe": dict(num_experts_per_tok=K),
            "deepseek_v3": dict(num_experts_per_tok=K, n_group=4, topk_group=3),  # 4 groups of 2, 3 kept
            "gpt_oss": dict(num_experts_per_tok=K)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    write_words(root / "web.txt")
    return root


def calib(root) -> CalibrateOptions:
    return CalibrateOptions((f"web={root / 'web.txt'}",), samples=6, seq_len=48)


# ------------------------------------------------------------------------------------------- brute force
def family_routing(family: str, router, logits_row: list[float]) -> tuple[list[int], dict[int, float], dict]:
    """(T: selected experts in the router's ranking order, w: their gate weights, σ: selection score per expert)
    of one token, from its logits, written from the family's routing formulas (not the model's code)."""
    E = len(logits_row)
    if family == "qwen3_moe":
        m = max(logits_row)
        ex = [math.exp(v - m) for v in logits_row]
        p = [v / sum(ex) for v in ex]
        T = sorted(range(E), key=lambda j: -p[j])[:K]
        return T, {j: p[j] for j in T}, {j: p[j] for j in range(E)}
    if family == "gpt_oss":
        T = sorted(range(E), key=lambda j: -logits_row[j])[:K]
        return T, {j: logits_row[j] for j in T}, {j: logits_row[j] for j in range(E)}
    s = [1 / (1 + math.exp(-v)) for v in logits_row]
    b = router.e_score_correction_bias.tolist()
    c = [s[j] + b[j] for j in range(E)]
    G = router.num_group
    size = E // G
    gscore = [sum(sorted(c[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(G)]
    groups = sorted(range(G), key=lambda g: -gscore[g])[: router.topk_group]
    allowed = [j for j in range(E) if j // size in groups]
    T = sorted(allowed, key=lambda j: -c[j])[:K]
    return T, {j: s[j] for j in T}, {j: c[j] for j in range(E)}


def family_weights(family: str, router, S: list[int], raw: dict[int, float]) -> dict[int, float]:
    """The gate weights of the kept experts S, renormalised as the family renormalises."""
    if family == "qwen3_moe":  # norm_topk_prob: p_i / Σ_S p
        return {j: raw[j] / sum(raw[i] for i in S) for j in S}
    if family == "gpt_oss":  # softmax over the selected logits
        m = max(raw[i] for i in S)
        z = sum(math.exp(raw[i] - m) for i in S)
        return {j: math.exp(raw[j] - m) / z for j in S}
    return {j: raw[j] / (sum(raw[i] for i in S) + 1e-20) * router.routed_scaling_factor for j in S}


def rule(policy: RoutingPlan, T: list[int], w: dict[int, float], sel: dict[int, float], layer: int) -> list[int]:
    by_w = sorted(T, key=lambda j: -w[j])
    if policy.method == "topk":
        return sorted(T, key=lambda j: -sel[j])[: policy.k]
    if policy.method == "top_p":
        total, mass, n = sum(w.values()), 0.0, 0
        for j in by_w:
            if mass >= policy.thresholds[layer] and n:
                break
            mass += w[j] / total
            n += 1
        n = max(policy.k_min, min(policy.k_max or K, n))
        return by_w[:n]
    beta = policy.thresholds[layer]
    return [j for i, j in enumerate(by_w) if i == 0 or w[j] >= beta * w[by_w[0]]]


def captured_run(model, adapter, ids, policy: RoutingPlan | None):
    """Per MoE layer: the router's own logits (a hook registered before the policy's) and the (indices, weights)
    the experts receive."""
    logits, handed, hooks = {}, {}, []
    for layer in adapter.moe_layers():
        block = adapter.block(model, layer)
        hooks.append(adapter.router(block).register_forward_hook(
            lambda m, a, out, layer=layer: logits.__setitem__(layer, out[0].detach().reshape(-1, out[0].shape[-1]))))
        hooks.append(adapter.experts(block).register_forward_pre_hook(
            lambda m, a, layer=layer: handed.__setitem__(layer, (a[1].clone(), a[2].detach().clone()))))
    if policy is not None:
        apply_routing(model, policy, adapter)
    try:
        with torch.no_grad():
            out = model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
        remove_routing(model)
    return logits, handed, out


POLICIES = [("topk", dict(k=2)), ("topk", dict(k=1)), ("top_p", dict(p=0.7)), ("top_p", dict(p=0.95, k_min=2, k_max=3)),
            ("naee_skip", dict(beta=0.3))]


@pytest.mark.parametrize("family", FAMILIES)
def test_policies_equal_brute_force_on_captured_logits(family):
    torch.manual_seed(0)
    model = tiny_model(family, seed=2, **FAMILIES[family])
    adapter = get_adapter(model.config, model=model)
    ids = torch.randint(0, 96, (2, 12))
    layers = adapter.moe_layers()
    for method, given in POLICIES:
        opts = dict(given)
        beta = opts.pop("beta", None) if method == "naee_skip" else None
        thresholds = dict.fromkeys(layers, opts.pop("p")) if method == "top_p" else (
            dict.fromkeys(layers, beta) if beta is not None else {})
        policy = RoutingPlan(method, K, layers, thresholds=thresholds, **opts)
        if method == "top_p":
            policy.k_max = policy.k_max or K
        logits, handed, out = captured_run(model, adapter, ids, policy)
        assert torch.isfinite(out).all() and out.abs().max() > 0
        fewer = 0
        for layer in layers:
            router = adapter.router(adapter.block(model, layer))
            E = logits[layer].shape[-1]
            idx, w = handed[layer]
            for t in range(idx.shape[0]):
                T, wt, sel = family_routing(family, router, logits[layer][t].tolist())
                if family == "gpt_oss":  # the rule reads the family's gate weights: softmax over T
                    wt = family_weights(family, router, T, wt)
                S = rule(policy, T, wt, sel, layer)
                raw = family_routing(family, router, logits[layer][t].tolist())[1]
                want = family_weights(family, router, S, raw)
                got = {int(j): float(v) for j, v in zip(idx[t], w[t], strict=True) if v != 0 and int(j) < E}
                assert set(got) == set(want), (family, method, layer, t, got, want)
                for j in want:
                    assert got[j] == pytest.approx(want[j], rel=1e-4, abs=1e-6), (family, method, layer, t)
                fewer += len(S) < K
        assert fewer > 0, f"{family} {method}: the policy never dropped an expert (test too weak)"


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_with_the_models_k_is_bit_exact(family):
    model = tiny_model(family, seed=2, **FAMILIES[family])
    adapter = get_adapter(model.config, model=model)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    _, _, before = captured_run(model, adapter, ids, None)
    _, _, same = captured_run(model, adapter, ids, RoutingPlan("topk", K, adapter.moe_layers(), k=K))
    assert torch.equal(before, same)


def test_rules_pure():
    w = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]])
    assert rules.top_p_counts(w, 0.7).tolist() == [2, 1, 3]
    assert rules.top_p_counts(w, 0.7, k_min=2, k_max=2).tolist() == [2, 2, 2]
    assert rules.naee_counts(w, 0.5).tolist() == [2, 1, 4]
    assert rules.naee_beta(w) == pytest.approx(0.6)  # w2/w1 = 0.6, 0.056, 1.0
    keep = rules.keep_topk(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2)
    assert keep.tolist() == [[False, True, True, False]]


def test_target_active_fitting_global_and_per_layer():
    g = torch.Generator().manual_seed(0)
    weights = {1: torch.rand(2000, 4, generator=g) ** 3, 2: torch.rand(2000, 4, generator=g) ** 0.5}
    for scope in ("global", "per_layer"):
        p = fit_top_p(weights, 2.5, scope, 1, 4)
        act = {layer: rules.top_p_counts(w, p[layer]).double().mean().item() for layer, w in weights.items()}
        if scope == "global":
            assert len(set(p.values())) == 1
            assert sum(act.values()) / 2 == pytest.approx(2.5, abs=0.01)
        else:
            assert all(a == pytest.approx(2.5, abs=0.01) for a in act.values())
        thr, beta, lam = fit_naee(weights, 2.0, scope)
        act = {layer: rules.naee_counts(w, thr[layer]).double().mean().item() for layer, w in weights.items()}
        if scope == "global":
            assert thr[1] / beta[1] == pytest.approx(lam) and thr[2] / beta[2] == pytest.approx(lam)
            assert sum(act.values()) / 2 == pytest.approx(2.0, abs=0.01)
        else:
            assert all(a == pytest.approx(2.0, abs=0.01) for a in act.values())


# ------------------------------------------------------------------------------------------- exports
@pytest.mark.parametrize("family", FAMILIES)
def test_static_topk_export_is_stock_and_equals_the_policy(root, tmp_path, family):
    src = save_tiny(family, tmp_path / "src", seed=3, with_tokenizer=True, **FAMILIES[family])
    applied, result = moeprune.prune(src, tmp_path / "k2", recipe=[{"method": "topk", "k": 2}])
    assert result.passed  # verify: stock reload == the original with the policy in its router
    cfg = json.loads((tmp_path / "k2" / "config.json").read_text())
    assert cfg["num_experts_per_tok"] == 2 and "moeprune_routing" not in cfg
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "k2", dtype=torch.float32).eval()
    original = load_model(src, dtype="float32")
    adapter = get_adapter(original.config, model=original)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    _, _, want = captured_run(original, adapter, ids, RoutingPlan("topk", K, adapter.moe_layers(), k=2))
    with torch.no_grad():
        got = stock(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert applied.report["top_k_after"] == 2 and applied.report["loadable_by_stock_config"]


@pytest.mark.parametrize("method", ["top_p", "naee_skip"])
def test_dynamic_export_loaded_by_load_model_equals_the_policy(root, tmp_path, method, caplog):
    src = save_tiny("deepseek_v3", tmp_path / "src", seed=3, with_tokenizer=True, **FAMILIES["deepseek_v3"])
    stage = {"method": method, "target_active": 2.5}
    applied, result = moeprune.prune(src, tmp_path / "dyn", recipe=[stage], calib=calib(root))
    assert result.passed
    assert applied.report["calibrated_active"] == pytest.approx(2.5, abs=0.15)
    cfg = json.loads((tmp_path / "dyn" / "config.json").read_text())
    assert cfg["num_experts_per_tok"] == K and cfg["moeprune_routing"]["method"] == method
    plan = read_routing(tmp_path / "dyn")
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(5))
    original = load_model(src, dtype="float32")
    adapter = get_adapter(original.config, model=original)
    _, _, want = captured_run(original, adapter, ids, plan)
    with torch.no_grad():
        plain = original(input_ids=ids).logits
        got = load_model(tmp_path / "dyn", dtype="float32")(input_ids=ids).logits
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "dyn", dtype=torch.float32).eval()
        stock_out = stock(input_ids=ids).logits
    assert torch.equal(got, want)
    assert not torch.equal(want, plain)
    # stock from_pretrained: the block rides along as a config attribute, the routing is the model's own
    assert torch.equal(stock_out, plain) and stock.config.moeprune_routing["method"] == method
    assert load_model(tmp_path / "dyn", dtype="float32", routing=False)(input_ids=ids).logits.equal(plain)
    from moeprune.pipeline.verify import verify

    assert verify(src, tmp_path / "dyn", lazy=True).passed  # layer by layer: the export's block applied too


def test_prune_then_top_p_and_eval_routing_report(root, tmp_path):
    src = save_tiny("qwen3_moe", tmp_path / "src", seed=3, with_tokenizer=True, **FAMILIES["qwen3_moe"])
    recipe = [{"method": "frequency", "ratio": 0.25}, {"method": "top_p", "p": 0.6}]
    _, result = moeprune.prune(src, tmp_path / "both", recipe=recipe, calib=calib(root))
    assert result.passed
    opts = EvalOptions(data=(f"web={root / 'web.txt'}",), seq_len=32, max_sequences=4)
    res = evaluate(tmp_path / "both", opts)  # the export's own block
    assert res.routing["active_per_token"] < res.routing["selected_per_token"] == K
    plan = RoutingPlan("top_p", K, [1, 2], thresholds={1: 0.5, 2: 0.5}, k_max=K)
    plan.save(tmp_path / "policy.json")
    on = evaluate(src, EvalOptions(data=opts.data, seq_len=32, max_sequences=4, routing=str(tmp_path / "policy.json")))
    off = evaluate(src, opts)
    assert off.routing is None
    r = on.routing
    assert 1 <= r["active_per_token"] < K and set(r["layers"]) == {"1", "2"}
    H, inter = 32, 16
    assert r["routed_flops_per_token"] == pytest.approx(sum(v["active"] for v in r["layers"].values()) * 6 * H * inter)
    assert on.scores["web"].perplexity != off.scores["web"].perplexity


def test_eager_path_skips_dropped_experts():
    model = tiny_model("qwen3_moe", seed=2, **FAMILIES["qwen3_moe"])
    model.set_experts_implementation("eager")
    adapter = get_adapter(model.config, model=model)
    apply_routing(model, RoutingPlan("topk", K, adapter.moe_layers(), k=1), adapter)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 96, (2, 8)))
    r = routing_report(model)
    assert r["active_per_token"] == 1 and r["computed_per_token"] == 1  # the weight-0 slots were not computed
    model.set_experts_implementation("grouped_mm")
    from moeprune.routing.apply import reset_counters

    reset_counters(model)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 96, (2, 8)))
    assert routing_report(model)["computed_per_token"] == K  # the kernel computes them (with weight 0)


# ------------------------------------------------------------------------------------------- refusals
REFUSALS = [
    ([{"method": "topk", "k": 2, "p": 0.5}], "p does not apply to method 'topk'"),
    ([{"method": "topk"}], "topk needs k"),
    ([{"method": "top_p", "p": 0.5, "target_active": 2.0}], "either p .* or target_active"),
    ([{"method": "top_p", "p": 1.5}], r"p must be a number in \(0, 1\]"),
    ([{"method": "naee_skip", "k": 2}], "k does not apply to method 'naee_skip'"),
    ([{"method": "top_p", "p": 0.5, "scope": "per_layer"}], "scope .* without target_active"),
    ([{"method": "topk", "k": 2, "ratio": 0.25}], "ratio does not apply"),
    ([{"method": "topk", "k": 5}], "routes top-4"),
    ([{"method": "naee_skip", "target_active": 6.0}], "more than the model's top-4"),
    ([{"method": "top_p", "p": 0.5}, {"method": "frequency", "ratio": 0.25}], "put the routing stage last"),
    ([{"method": "top-p", "p": 0.5}], "did you mean 'top_p'"),
]


@pytest.mark.parametrize("recipe,match", REFUSALS)
def test_refusals_before_any_work(root, tmp_path, no_work, recipe, match):
    src = root / "qwen_k4"
    if not src.exists():
        save_tiny("qwen3_moe", src, seed=3, with_tokenizer=True, **FAMILIES["qwen3_moe"])
    needs_calib = any(s.get("method") in ("naee_skip", "frequency") for s in recipe)
    assert_refused(lambda: moeprune.prune(src, tmp_path / "out", recipe=recipe,
                                          calib=calib(root) if needs_calib else None),
                   f"(?i){match}", inputs=[src], out=tmp_path / "out")


def test_read_routing_refuses_what_is_not_a_policy(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"format": "moeprune.plan/1"}))
    with pytest.raises(MoePruneError, match="not a routing plan"):
        read_routing(tmp_path / "x.json")
    (tmp_path / "f").mkdir()
    with pytest.raises(MoePruneError, match="holds no routing policy"):
        read_routing(tmp_path / "f")


# ------------------------------------------------------------------------------------------- other families
KINDS = ["qwen2_moe", "olmoe", "deepseek_v2", "ernie4_5_moe", "kolibri1", "aria_text", "glm4_moe",
         "longcat_flash"]


@pytest.mark.parametrize("model_type", KINDS)
def test_every_routing_kind_keeps_exactly_the_policy_experts(model_type):
    """One family per routing kind (and aria's top-k-then-softmax softmax router; LongCat-Flash, whose router also
    picks weightless identity "zero experts", which its MoE block adds itself on transformers 5.25): the hook's own
    check (non-zero weights == kept experts) passes, and topk k'=1 equals the stock router with top_k = 1."""
    from moeprune.tiny_families import tiny_family_model

    model = tiny_family_model(model_type, seed=1)
    adapter = get_adapter(model.config, model=model)
    k = adapter.top_k
    assert k >= 2
    ids = torch.randint(0, 90, (2, 10), generator=torch.Generator().manual_seed(2))
    _, handed, got = captured_run(model, adapter, ids, RoutingPlan("topk", k, adapter.moe_layers(), k=1))
    assert all(int((w != 0).sum(dim=-1).max()) == 1 for _, w in handed.values())
    thresholds = dict.fromkeys(adapter.moe_layers(), 0.6)
    captured_run(model, adapter, ids, RoutingPlan("top_p", k, adapter.moe_layers(), thresholds=thresholds))
    touched = []
    for layer in adapter.moe_layers():
        block = adapter.block(model, layer)
        for module in (block, adapter.router(block)):
            for attr in ("top_k", "num_experts_per_tok", "moe_topk"):
                if getattr(module, attr, None) == k:
                    setattr(module, attr, 1)
                    touched.append((module, attr))
    assert touched
    with torch.no_grad():
        stock = model(input_ids=ids).logits
    assert (got - stock).abs().max() <= 1e-5 * stock.abs().max()


@pytest.mark.parametrize("model_type", ["dbrx", "llama4_text"])
def test_families_whose_router_the_hook_cannot_read_are_refused(tmp_path, no_work, model_type):
    from moeprune.tiny_families import tiny_family_model

    src = tmp_path / "src"
    tiny_family_model(model_type).save_pretrained(src)
    assert_refused(lambda: moeprune.prune(src, tmp_path / "out", recipe=[{"method": "topk", "k": 1}]),
                   "cannot run routing policies", inputs=[src], out=tmp_path / "out")


def test_a_router_the_mask_does_not_reach_is_an_error_not_a_silent_route(monkeypatch):
    from moeprune.models import dynamic

    monkeypatch.setitem(dynamic.POLICY_OPS, "softmax_topk", (("sigmoid", "zero"),))  # an op qwen3's router lacks
    model = tiny_model("qwen3_moe", seed=2, **FAMILIES["qwen3_moe"])
    adapter = get_adapter(model.config, model=model)
    with pytest.raises(MoePruneError, match="did not route .* tokens to exactly the experts the policy kept"):
        captured_run(model, adapter, torch.randint(0, 96, (1, 6)), RoutingPlan("topk", K, adapter.moe_layers(), k=1))
