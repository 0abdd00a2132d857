"""Expert steering (MoTE), each part against an independent reference:

- the fTRI contrast equals frequencies, gate masses and z-scores counted by hand from the routing the model's
  experts receive (captured by a hook, not read from statistics);
- "off" gives the logits of `masked_experts` with the same experts (the verified masking mechanism);
- "on" with a huge strength puts the expert in every token's top-k (from captured routing), for softmax, sigmoid
  + correction bias + group-limited, and gpt-oss (top-k before softmax) routers;
- an empty plan changes nothing, bit for bit, and patches no router;
- plans are validated on load; plans for another model, and bad flags, are refused before any work.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moeprune import load_model
from moeprune.calibration.data import CalibConfig, CalibSource, build_sets
from moeprune.calibration.run import CalibrateOptions, calibrate_model
from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.eval.run import EvalOptions, evaluate
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.steer.apply import steering
from moeprune.steer.contrast import ftri_contrast, top_experts
from moeprune.steer.plan import STEER_FORMAT, SteerEntry, SteerPlan
from moeprune.steer.run import plan_from_stats
from moeprune.tiny import save_tiny, tiny_model, tiny_tokenizer

# softmax_topk, sigmoid_grouped (+ bias, groups), topk_softmax, softmax_bias with Z identity zero experts
FAMILIES = ("qwen3_moe", "deepseek_v3", "gpt_oss", "longcat_flash")


def _model(family: str, seed: int):
    if family == "longcat_flash":
        from moeprune.tiny_families import tiny_family_model

        torch.manual_seed(seed)
        return tiny_family_model(family).eval()
    return tiny_model(family, seed=seed)


def _ids(seed: int = 0, shape=(3, 20)) -> torch.Tensor:
    return torch.randint(3, 90, shape, generator=torch.Generator().manual_seed(seed))


def _plan(adapter, entries=()) -> SteerPlan:
    return SteerPlan(adapter.model_type, adapter.num_experts, adapter.top_k, adapter.routing().kind,
                     tuple(adapter.moe_layers()), tuple(entries))


class Capture:
    """Each MoE layer's routing as its experts module receives it: {layer: [(indices [T, k], weights [T, k])]}."""

    def __init__(self, model, adapter):
        self.seen: dict[int, list] = {}
        self.hooks = [adapter.experts(adapter.block(model, layer)).register_forward_pre_hook(self._hook(layer))
                      for layer in adapter.moe_layers()]

    def _hook(self, layer):
        def hook(module, args):
            self.seen.setdefault(layer, []).append((args[1].detach().clone(), args[2].detach().clone()))
        return hook

    def close(self):
        for h in self.hooks:
            h.remove()


# ----------------------------------------------------------------------------------------------- contrast


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer")
    digits = root / "digits.txt"
    digits.write_text("\n".join(" ".join(str((i * 7919 + j) % 1000) for j in range(12)) for i in range(40)))
    words = root / "words.txt"
    words.write_text("\n".join(f"the {w} walks to the {v} and back again." for w, v in
                               zip(["cat", "dog", "bird", "fox", "owl"] * 8, ["park", "lake", "hill", "town"] * 10,
                                   strict=True)))
    model = save_tiny("qwen3_moe", root / "m", with_tokenizer=True, seed=3)
    return root, model, digits, words


def test_contrast_equals_counts_from_captured_routing(texts):
    root, ckpt, digits, words = texts
    sets = build_sets(CalibConfig((CalibSource.parse(f"digits={digits}"), CalibSource.parse(f"words={words}")),
                                  samples=6, seq_len=32), tiny_tokenizer())
    model = load_model(ckpt, dtype="float32")
    stats = calibrate_model(model, sets, CalibrateOptions(("x=y",), batch_size=4), source=ckpt)
    got = {(c.layer, c.expert): c for c in ftri_contrast(stats, ["digits"], ["words"])}

    adapter = get_adapter(model.config, model=model)
    E = adapter.num_experts
    count = {s.name: {layer: [0] * E for layer in adapter.moe_layers()} for s in sets}
    gate = {s.name: {layer: [0.0] * E for layer in adapter.moe_layers()} for s in sets}
    tokens = {}
    for s in sets:
        cap = Capture(model, adapter)
        with torch.no_grad():
            model(input_ids=s.input_ids, attention_mask=s.attention_mask)
        cap.close()
        real = s.attention_mask.reshape(-1).tolist()  # [B·S]
        tokens[s.name] = sum(real)
        for layer, [(idx, w)] in cap.seen.items():
            for t, keep in enumerate(real):
                if keep:
                    for j, g in zip(idx[t].tolist(), w[t].tolist(), strict=True):
                        count[s.name][layer][j] += 1
                        gate[s.name][layer][j] += g
    na, nb = tokens["digits"], tokens["words"]
    for layer in adapter.moe_layers():
        for j in range(E):
            ca, cb = count["digits"][layer][j], count["words"][layer][j]
            pooled = (ca + cb) / (na + nb)
            se = math.sqrt(pooled * (1 - pooled) * (na + nb) / (na * nb))
            c = got[(layer, j)]
            assert c.freq_with == pytest.approx(ca / na) and c.freq_without == pytest.approx(cb / nb)
            assert c.d_freq == pytest.approx(ca / na - cb / nb)
            assert c.d_mass == pytest.approx(gate["digits"][layer][j] / na - gate["words"][layer][j] / nb, abs=1e-6)
            assert c.z == pytest.approx((ca / na - cb / nb) / se if se > 0 else 0.0, rel=1e-9)
    assert any(abs(c.z) > 3 for c in got.values()), "the two texts must route differently, or nothing is tested"

    chosen = top_experts(list(got.values()), 3, min_z=3.0)
    brute = sorted(((c.d_freq, -c.layer, -c.expert, c) for c in got.values() if c.z >= 3 and c.d_freq > 0),
                   key=lambda x: x[:3], reverse=True)[:3]
    assert [(c.layer, c.expert) for c in chosen] == [(b[3].layer, b[3].expert) for b in brute]
    plan = plan_from_stats(stats, ["digits"], ["words"], top=3)
    assert [(e.layer, e.expert, e.action) for e in plan.steer] == [(c.layer, c.expert, "off") for c in chosen]
    assert plan.router_sha256 == stats.router_sha256 and len(plan.experts) == E * len(adapter.moe_layers())


# ----------------------------------------------------------------------------------------------- applying


@pytest.mark.parametrize("family", FAMILIES)
def test_off_equals_masked_experts_and_empty_plan_is_bit_exact(family):
    model = _model(family, 1)
    adapter = get_adapter(model.config, model=model)
    layers = adapter.moe_layers()
    ids = _ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with steering(model, _plan(adapter)) as handle:
            assert not any("forward" in adapter.router(adapter.block(model, la)).__dict__ for la in layers)
            empty = model(input_ids=ids).logits
        assert handle.calls == {}
        assert torch.equal(empty, base)

        drop = {layers[0]: [1, 6], layers[-1]: [0]} if len(layers) > 1 else {layers[0]: [1, 6, 0]}
        plan = _plan(adapter, [SteerEntry(la, j, "off") for la, js in drop.items() for j in js])
        with steering(model, plan) as handle:
            off = model(input_ids=ids).logits
        with masked_experts(model, adapter, drop):
            masked = model(input_ids=ids).logits
    assert set(handle.calls) == set(drop) and all(n > 0 for n in handle.calls.values())
    assert torch.equal(off, masked)
    assert not torch.equal(off, base), "switching experts off must change the output, or nothing is tested"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base), "the routers are restored after the context"


@pytest.mark.parametrize("family", FAMILIES)
def test_on_with_a_huge_strength_routes_every_token_to_the_expert(family):
    model = _model(family, 2)
    adapter = get_adapter(model.config, model=model)
    layer = adapter.moe_layers()[-1]
    ids = _ids(1)
    cap = Capture(model, adapter)
    with torch.no_grad():
        model(input_ids=ids)
    idx, _ = cap.seen[layer][0]
    rare = min(range(adapter.num_experts), key=lambda j: (int((idx == j).sum()), j))  # least routed expert
    assert bool((idx == rare).any(dim=-1).all()) is False
    cap.seen.clear()
    with torch.no_grad(), steering(model, _plan(adapter, [SteerEntry(layer, rare, "on", 1e4)])):
        model(input_ids=ids)
    cap.close()
    idx, w = cap.seen[layer][0]
    assert bool((idx == rare).any(dim=-1).all()), "every token routes to the forced expert"
    assert idx.shape[-1] == adapter.top_k  # the family's own top-k still chose k experts
    others = [la for la in adapter.moe_layers() if la != layer]
    for la in others:  # untouched layers route as they did (their inputs did not change: they come first)
        if la < layer:
            assert (cap.seen[la][0][0] != rare).any()


def test_moderate_strength_raises_the_experts_share():
    model = tiny_model("qwen3_moe", seed=4)
    adapter = get_adapter(model.config, model=model)
    layer = adapter.moe_layers()[0]
    ids = _ids(2, (4, 24))
    shares = []
    for strength in (None, 1.0, 3.0):
        cap = Capture(model, adapter)
        entries = [] if strength is None else [SteerEntry(layer, 5, "on", strength)]
        with torch.no_grad(), steering(model, _plan(adapter, entries)):
            model(input_ids=ids)
        cap.close()
        shares.append(float((cap.seen[layer][0][0] == 5).any(dim=-1).double().mean()))
    assert shares[0] < shares[1] < shares[2], shares


def test_load_model_steer_persists_until_removed(texts, tmp_path):
    _, ckpt, _, _ = texts
    plain = load_model(ckpt, dtype="float32")
    adapter = get_adapter(plain.config, model=plain)
    plan = _plan(adapter, [SteerEntry(adapter.moe_layers()[0], 2, "off"), SteerEntry(adapter.moe_layers()[-1], 4, "on",
                                                                                      2.5)])
    path = plan.save(tmp_path / "plan.json")
    ids = _ids(3)
    steered = load_model(ckpt, dtype="float32", steer=path)
    with torch.no_grad():
        with steering(plain, plan):
            want = plain(input_ids=ids).logits
        got = steered(input_ids=ids).logits
        assert torch.equal(got, want)
        steered.moeprune_steering.remove()
        assert torch.equal(steered(input_ids=ids).logits, plain(input_ids=ids).logits)


# ----------------------------------------------------------------------------------------------- plans


def _plan_dict(**over) -> dict:
    d = {"format": STEER_FORMAT, "model_type": "qwen3_moe", "num_experts": 8, "top_k": 2, "routing": "softmax_topk",
         "layers": [1, 2], "steer": [{"layer": 1, "expert": 3, "action": "off"},
                                     {"layer": 2, "expert": 0, "action": "on", "strength": 4.0}]}
    d.update(over)
    return d


def test_plan_json_round_trip(tmp_path):
    plan = SteerPlan.from_dict(_plan_dict())
    again = SteerPlan.load(plan.save(tmp_path / "p.json"))
    assert again == plan and again.by_layer() == {1: ([3], {}), 2: ([], {0: 4.0})}
    assert [e.action for e in plan.with_action("on", 2.0).steer] == ["on", "on"]
    assert all(e.strength is None for e in plan.with_action("off").steer)


@pytest.mark.parametrize("change, message", [
    (dict(format="moeprune.plan/1"), "not a moeprune steering plan"),
    (dict(steer=[{"layer": 1, "expert": 3, "action": "mute"}]), "not one of off, on"),
    (dict(steer=[{"layer": 0, "expert": 3, "action": "off"}]), "not a MoE layer"),
    (dict(steer=[{"layer": 1, "expert": 8, "action": "off"}]), "not in 0..7"),
    (dict(steer=[{"layer": 1, "expert": True, "action": "off"}]), "must be integers"),
    (dict(steer=[{"layer": 1, "expert": 3, "action": "on"}]), "finite number > 0"),
    (dict(steer=[{"layer": 1, "expert": 3, "action": "on", "strength": float("inf")}]), "finite number > 0"),
    (dict(steer=[{"layer": 1, "expert": 3, "action": "on", "strength": -1}]), "finite number > 0"),
    (dict(steer=[{"layer": 1, "expert": 3, "action": "off", "strength": 2}]), "applies to action 'on' only"),
    (dict(steer=[{"layer": 1, "expert": 3, "action": "off"}, {"layer": 1, "expert": 3, "action": "on",
                                                               "strength": 1}]), "listed twice"),
    (dict(steer=[{"layer": 1, "expert": j, "action": "off"} for j in range(7)]), "at least top_k = 2"),
    (dict(steer=[{"layer": 1, "expert": 3, "action": "off", "why": "x"}]), "unknown keys"),
    (dict(steer={"layer": 1}), "must be lists"),
])
def test_bad_plans_are_refused_on_load(tmp_path, change, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_plan_dict(**change)))
    with pytest.raises(MoePruneError, match=message):
        SteerPlan.load(path)


def test_plan_for_another_model_is_refused_before_loading(texts, tmp_path, monkeypatch):
    _, ckpt, _, words = texts
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_plan_dict(num_experts=16)))
    import moeprune.eval.run as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    with pytest.raises(MoePruneError, match="made for another model: num_experts 16"):
        evaluate(ckpt, EvalOptions((f"words={words}",), seq_len=32, steer=str(path)))
    with pytest.raises(MoePruneError, match="does not exist"):
        evaluate(ckpt, EvalOptions((f"words={words}",), seq_len=32, steer=str(tmp_path / "none.json")))


# ----------------------------------------------------------------------------------------------- CLI


def test_steer_cli_then_eval_and_compare_with_the_plan(texts, tmp_path, capsys):
    root, ckpt, digits, words = texts
    plan_path = tmp_path / "steer.json"
    common = ["--seq-len", "32", "--samples", "6", "--held-out", "2"]
    assert main(["steer", str(ckpt), "--with", f"digits={digits}", "--without", f"words={words}", "--top", "2",
                 "--min-z", "0", "--out", str(plan_path), *common]) == 0
    out = capsys.readouterr().out
    plan = SteerPlan.load(plan_path)
    assert len(plan.steer) == 2 and all(e.action == "off" for e in plan.steer)
    assert set(plan.effect["sets"]) == {"digits", "words"} and "effect on digits" in out
    assert main(["steer", str(ckpt), "--with", f"digits={digits}", "--without", f"words={words}", "--out",
                 str(plan_path), *common]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err

    data = ["--data", f"digits={digits}", "--seq-len", "32", "--max-sequences", "4"]
    assert main(["eval", str(ckpt), *data, "--json", str(tmp_path / "a.json")]) == 0
    assert main(["eval", str(ckpt), *data, "--json", str(tmp_path / "b.json"), "--steer", str(plan_path)]) == 0
    a, b = (json.loads((tmp_path / n).read_text())["digits"]["perplexity"] for n in ("a.json", "b.json"))
    assert b != a
    assert (b > a) == (plan.effect["sets"]["digits"]["ratio"] > 1)  # other windows, the same direction
    assert main(["compare", str(ckpt), str(ckpt), *data, "--out", str(tmp_path / "cmp"), "--steer",
                 str(plan_path)]) == 0
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert rows[0]["perplexity_before"] == pytest.approx(a) and rows[0]["perplexity_after"] == pytest.approx(b)


@pytest.mark.parametrize("argv, message", [
    (["--with", "a=x.txt", "--without", "a=y.txt"], "used twice"),
    (["--with", "a=x.txt", "--without", "b=y.txt", "--strength", "3"], "needs --action on"),
    (["--with", "a=x.txt", "--without", "b=y.txt", "--top", "0"], "--top must be >= 1"),
])
def test_steer_cli_refusals(texts, tmp_path, capsys, argv, message):
    _, ckpt, digits, words = texts
    argv = [a.replace("x.txt", str(digits)).replace("y.txt", str(words)) for a in argv]
    assert main(["steer", str(ckpt), *argv, "--out", str(tmp_path / "p.json")]) == 2
    assert message in capsys.readouterr().err


def test_steer_needs_both_sides(texts, tmp_path):
    _, ckpt, digits, _ = texts
    with pytest.raises(SystemExit):
        main(["steer", str(ckpt), "--with", f"d={digits}", "--out", str(tmp_path / "p.json")])


def test_plan_path_is_a_json_file(texts, tmp_path, capsys):
    _, ckpt, digits, words = texts
    assert main(["steer", str(ckpt), "--with", f"d={digits}", "--without", f"w={words}", "--out",
                 str(tmp_path / "p.txt")]) == 2
    assert "*.json" in capsys.readouterr().err
    assert not Path(tmp_path / "p.txt").exists()


def test_analysis_report_gains_a_steering_section(texts, tmp_path):
    from moeprune.analysis.run import analyze_stats

    root, ckpt, digits, words = texts
    plan_path, stats_path = tmp_path / "steer.json", tmp_path / "stats.safetensors"
    assert main(["steer", str(ckpt), "--with", f"digits={digits}", "--without", f"words={words}", "--top", "3",
                 "--min-z", "0", "--out", str(plan_path), "--seq-len", "32", "--samples", "6", "--held-out", "2"]) == 0
    assert main(["calibrate", str(ckpt), "--calib", f"digits={digits}", "--calib", f"words={words}", "--seq-len",
                 "32", "--samples", "6", "--out", str(stats_path)]) == 0
    plan = SteerPlan.load(plan_path)
    analyze_stats(stats_path, tmp_path / "an", results=[plan_path])
    report = json.loads((tmp_path / "an" / "report.json").read_text())
    [sec] = report["results"]
    assert sec["title"] == "Steering: steer.json" and (tmp_path / "an" / sec["images"][0]["file"]).is_file()
    chosen, rest, effect = sec["tables"]
    assert [(r[0], r[1], r[2]) for r in chosen["rows"]] == [(e.layer, f"e{e.expert}", "off") for e in plan.steer]
    ranked = {(r["layer"], r["expert"]): r for r in plan.experts}
    for r in chosen["rows"]:
        assert r[5] == pytest.approx(ranked[(r[0], int(r[1][1:]))]["d_freq"])
    assert {r[0] for r in effect["rows"]} == {"digits", "words"}
    html = (tmp_path / "an" / "report.html").read_text()
    assert "Steering: steer.json" in html and "fTRI" in html

    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(MoePruneError, match="not a moeprune steering plan"):
        analyze_stats(stats_path, tmp_path / "an2", results=[bad])
    assert not (tmp_path / "an2").exists()


def test_action_on_plan_from_the_cli_steers_generation_samples(texts, tmp_path):
    _, ckpt, digits, words = texts
    plan_path = tmp_path / "on.json"
    assert main(["steer", str(ckpt), "--with", f"digits={digits}", "--without", f"words={words}", "--top", "2",
                 "--min-z", "0", "--action", "on", "--strength", "50", "--no-effect", "--out", str(plan_path),
                 "--seq-len", "32", "--samples", "6"]) == 0
    plan = SteerPlan.load(plan_path)
    assert [(e.action, e.strength) for e in plan.steer] == [("on", 50.0)] * 2 and plan.effect is None
    opts = dict(seq_len=32, max_sequences=2, prompts=("the cat",), max_new_tokens=12)
    plain = evaluate(ckpt, EvalOptions((f"words={words}",), **opts))
    steered = evaluate(ckpt, EvalOptions((f"words={words}",), steer=str(plan_path), **opts))
    model = load_model(ckpt, dtype="float32", steer=plan)
    from moeprune.eval.generate import greedy_samples

    assert steered.samples == greedy_samples(model, tiny_tokenizer(), ["the cat"], 12)
    assert steered.samples != plain.samples
