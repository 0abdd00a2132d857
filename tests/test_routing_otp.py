"""OTP (MC# Online Top-any Pruning) routing: the selector rule against a by-hand re-implementation on captured
router inputs and weights, training meets its target active rate, export + load_model == the policy in memory,
refusals before work."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeprune
from moeprune.calibration.data import build_sets
from moeprune.calibration.run import CalibrateOptions, load_tokenizer
from moeprune.errors import MoePruneError
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.routing.apply import apply_routing, read_routing, remove_routing, reset_counters, routing_report
from moeprune.routing.otp import SELECTOR_FILE, OTPConfig, train_otp
from moeprune.routing.plan import RoutingPlan
from moeprune.tiny import save_tiny, tiny_model
from refusal import assert_refused
from textgen import write_words

K = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("otp")
    write_words(root / "web.txt")
    save_tiny("qwen3_moe", root / "src", seed=3, with_tokenizer=True, num_experts_per_tok=K)
    return root


def calib(root) -> CalibrateOptions:
    return CalibrateOptions((f"web={root / 'web.txt'}",), samples=6, seq_len=48)


def random_selectors(layers, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {layer: (torch.randn(K, H + K, generator=g) * 0.3, torch.randn(K, generator=g) * 0.5) for layer in layers}


def otp_plan(adapter, selectors) -> RoutingPlan:
    layers = adapter.moe_layers()
    plan = RoutingPlan("otp", adapter.top_k, layers, thresholds=dict.fromkeys(layers, 0.0))
    plan.selectors = selectors
    return plan


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_otp_rule_equals_a_by_hand_selector_on_captured_router_inputs(family):
    extra = dict(n_group=4, topk_group=3) if family == "deepseek_v3" else {}
    model = tiny_model(family, seed=2, num_experts_per_tok=K, **extra)
    adapter = get_adapter(model.config, model=model)
    H = int(model.config.hidden_size)
    selectors = random_selectors(adapter.moe_layers(), H)
    seen, handed, hooks = {}, {}, []
    for layer in adapter.moe_layers():  # registered before the policy's hook: the router's own first pass
        block = adapter.block(model, layer)
        hooks.append(adapter.router(block).register_forward_hook(
            lambda m, a, out, layer=layer: seen.__setitem__(layer, (a[0].detach().reshape(-1, H).double(), out))))
        hooks.append(adapter.experts(block).register_forward_pre_hook(
            lambda m, a, layer=layer: handed.__setitem__(layer, (a[1].clone(), a[2].detach().clone()))))
    apply_routing(model, otp_plan(adapter, selectors), adapter)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    remove_routing(model)
    checked = dropped = 0
    for layer, (x, out) in seen.items():
        W, b = (t.double() for t in selectors[layer])
        w, idx = out[1].double(), out[2]  # [N, K] first pass
        got_idx, got_w = handed[layer]
        for t in range(x.shape[0]):
            slots = sorted(range(K), key=lambda s: (-float(w[t, s]), s))  # by weight, ties by slot
            feats = x[t].tolist() + [float(w[t, s]) for s in slots]
            z = [sum(a * f for a, f in zip(W[r].tolist(), feats, strict=True)) + float(b[r]) for r in range(K)]
            if any(abs(v) < 1e-4 for v in z[1:]):
                continue  # too close to the threshold to compare float orders
            n = 1
            while n < K and z[n] > 0:  # a prefix of the ranks: up to the first logit <= 0
                n += 1
            want = {int(idx[t, slots[r]]) for r in range(n)}
            E = out[0].shape[-1]  # a skipped slot may carry the sentinel index E
            got = {int(e) for e, v in zip(got_idx[t].tolist(), got_w[t].tolist(), strict=True) if v != 0 and e < E}
            assert got == want, (layer, t, z)
            checked += 1
            dropped += K - len(want)
    assert checked > 40 and 0 < dropped < checked * (K - 1)  # the rule really dropped some, not all


def test_trained_selectors_meet_the_target_on_calibration_text(root):
    model = load_model(root / "src", dtype="float32")
    adapter = get_adapter(model.config, model=model)
    sets = build_sets(calib(root).calib_config(), load_tokenizer(root / "src", None))
    before = [p.detach().clone() for p in model.parameters()]
    res = train_otp(model, adapter, sets, OTPConfig(2.5, steps=15, batch_size=4))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))  # the model is frozen
    assert all(p.requires_grad for p in model.parameters())  # and given back as it was
    cal = sum(res.calibrated_active.values()) / len(res.calibrated_active)
    assert cal == pytest.approx(2.5, abs=0.1)
    assert res.cost["steps"] == 15 and res.cost["tokens"] > 0 and res.cost["seconds"] > 0
    apply_routing(model, otp_plan(adapter, res.selectors), adapter)
    reset_counters(model)
    with torch.no_grad():
        for s in sets:
            model(input_ids=s.input_ids, attention_mask=s.attention_mask)
    measured = routing_report(model)["active_per_token"]
    assert measured == pytest.approx(2.5, abs=0.1)  # the shift is re-fitted with the policy routing earlier layers


def test_export_loaded_by_load_model_equals_the_policy_in_memory(root, tmp_path):
    stage = {"method": "otp", "target_active": 2.5, "steps": 5}
    applied, result = moeprune.prune(root / "src", tmp_path / "otp", recipe=[stage], calib=calib(root))
    assert result.passed  # verify: the export (load_model + side file) == the policy installed on the original
    cfg = json.loads((tmp_path / "otp" / "config.json").read_text())
    block = cfg["moeprune_routing"]
    assert block["method"] == "otp" and block["otp"]["selector_file"] == SELECTOR_FILE
    assert (tmp_path / "otp" / SELECTOR_FILE).is_file() and block["otp"]["cost"]["steps"] == 5
    ids = build_sets(calib(root).calib_config(), load_tokenizer(root / "src", None))[0].input_ids[:2]  # [2, 48]
    original = load_model(root / "src", dtype="float32")
    with torch.no_grad():
        plain = original(input_ids=ids).logits
        apply_routing(original, read_routing(tmp_path / "otp"))
        want = original(input_ids=ids).logits
        remove_routing(original)
        from_plans = read_routing(sorted((tmp_path / "otp" / "moeprune_plans").glob("*-routing.json"))[-1])
        apply_routing(original, from_plans)
        again = original(input_ids=ids).logits
        got = load_model(tmp_path / "otp", dtype="float32")(input_ids=ids).logits
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "otp", dtype=torch.float32).eval()(input_ids=ids).logits
    assert torch.equal(got, want) and torch.equal(again, want)
    assert not torch.equal(want, plain)
    assert torch.equal(stock, plain)  # stock from_pretrained: the model's own routing
    from moeprune.pipeline.verify import verify

    assert verify(root / "src", tmp_path / "otp", lazy=True).passed  # layer by layer: the side file applied too


@pytest.mark.parametrize("stage,match", [
    ({"method": "otp"}, "otp needs target_active"),
    ({"method": "otp", "target_active": 2.0, "steps": 0}, "steps must be an integer >= 1"),
    ({"method": "otp", "target_active": 2.0, "lr": -1}, "lr must be a number > 0"),
    ({"method": "otp", "target_active": 2.0, "p": 0.5}, "p does not apply to method 'otp'"),
    ({"method": "otp", "target_active": 6.0}, "more than the model's top-4"),
    ({"method": "top_p", "p": 0.5, "steps": 3}, "steps does not apply to method 'top_p'"),
])
def test_refusals_before_any_work(root, tmp_path, no_work, stage, match):
    assert_refused(lambda: moeprune.prune(root / "src", tmp_path / "out", recipe=[stage], calib=calib(root)),
                   f"(?i){match}", inputs=[root / "src"], out=tmp_path / "out")


def test_a_missing_or_changed_selector_file_is_refused(root, tmp_path):
    model = load_model(root / "src", dtype="float32")
    adapter = get_adapter(model.config, model=model)
    plan = otp_plan(adapter, random_selectors(adapter.moe_layers(), int(model.config.hidden_size)))
    from moeprune.routing.otp import selectors_sha256

    plan.otp = {"selector_sha256": selectors_sha256(plan.selectors)}
    plan.save(tmp_path / "p.json")
    assert read_routing(tmp_path / "p.json").otp["selector_file"] == "p.otp.safetensors"
    without = RoutingPlan.from_dict(json.loads((tmp_path / "p.json").read_text()))
    with pytest.raises(MoePruneError, match="selector weights are not loaded"):
        without.decide()
    side = tmp_path / "p.otp.safetensors"
    from safetensors.torch import load_file, save_file

    flat = load_file(str(side))
    flat[next(iter(flat))] += 1
    save_file(flat, str(side))
    with pytest.raises(MoePruneError, match="do not match the sha256"):
        read_routing(tmp_path / "p.json")
    side.unlink()
    with pytest.raises(MoePruneError, match="selector file .* is missing"):
        read_routing(tmp_path / "p.json")


def test_cli_prune_then_apply_its_plan_json_verify_and_eval(root, tmp_path, capsys):
    """The export's plan JSON (moeprune_plans/1-routing.json + its .otp.safetensors) applies on its own."""
    from moeprune.cli import main

    src, web = str(root / "src"), f"web={root / 'web.txt'}"
    common = ["--calib", web, "--samples", "6", "--seq-len", "48"]
    assert main(["prune", src, "--method", "top_p", "--target-active", "2.5", "--steps", "7", *common, "--out",
                 str(tmp_path / "no")]) == 2  # --steps trains otp's selectors: refused for top_p
    assert "steps does not apply to method 'top_p'" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert main(["prune", src, "--method", "otp", "--target-active", "2.5", "--steps", "7", "--lr", "0.02", *common,
                 "--out", str(tmp_path / "dyn")]) == 0
    block = json.loads((tmp_path / "dyn" / "config.json").read_text())["moeprune_routing"]
    assert block["otp"]["cost"]["steps"] == 7
    plan = tmp_path / "dyn" / "moeprune_plans" / "1-routing.json"
    assert plan.with_name("1-routing.otp.safetensors").is_file()
    assert main(["apply", src, "--plan", str(plan), "--out", str(tmp_path / "again")]) == 0
    assert main(["verify", src, str(tmp_path / "again")]) == 0
    assert "PASS" in capsys.readouterr().out
    assert (tmp_path / "dyn" / SELECTOR_FILE).read_bytes() == (tmp_path / "again" / SELECTOR_FILE).read_bytes()
    assert main(["eval", src, "--data", web, "--seq-len", "32", "--max-sequences", "2", "--routing",
                 str(tmp_path / "dyn"), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["routing"]["method"] == "otp"


@pytest.mark.parametrize("family,extra", [("deepseek_v3", dict(n_group=4, topk_group=3)), ("gpt_oss", {}),
                                          ("mixtral", {})])
def test_training_and_routing_on_other_router_kinds(family, extra):
    """sigmoid + groups + correction bias, top-k then softmax, softmax without renormalisation: the selectors
    train, the hook routes exactly the kept prefix (checked on every call), and the target is met on the text."""
    from moeprune.calibration.data import CalibSet

    model = tiny_model(family, seed=2, num_experts_per_tok=K, **extra)
    adapter = get_adapter(model.config, model=model)
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    res = train_otp(model, adapter, [CalibSet("x", ids, torch.ones_like(ids), "", "", 1, 1)],
                    OTPConfig(2.5, steps=5, batch_size=4))
    apply_routing(model, otp_plan(adapter, res.selectors), adapter)
    reset_counters(model)
    with torch.no_grad():
        model(input_ids=ids)
    assert routing_report(model)["active_per_token"] == pytest.approx(2.5, abs=0.1)
