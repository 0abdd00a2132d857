"""Prune-as-you-go and NAEE reconstruction during calibration, against independent references: the statistics
of later layers equal a plain calibration of the model with the earlier choices masked, and NAEE's choice for the
first MoE layer is the brute-force minimum of the reconstruction error (over real tokens) over every subset."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from moeprune import api
from moeprune.calibration.data import CalibSet
from moeprune.calibration.session import collect
from moeprune.criteria import CRITERIA
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.pipeline.verify import seeded_inputs
from moeprune.select.progressive import criterion_decider, reconstruction_decider
from moeprune.tiny import tiny_model


def calib_set(seed: int = 3) -> CalibSet:
    inputs = seeded_inputs(96, batch=3, seq_len=16, seed=seed)
    return CalibSet("s", inputs["input_ids"], inputs["attention_mask"], "-", "-", 1, 1)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_as_you_go_later_layers_see_the_pruned_model(family):
    model = tiny_model(family, seed=4, num_hidden_layers=4)
    adapter = get_adapter(model.config)
    routing, E = adapter.routing(), adapter.num_experts
    data = calib_set()
    decide = criterion_decider(CRITERIA.get("reap"), 0.5, routing, E)
    run = collect(model, adapter, [data], decide=decide)
    layers = adapter.moe_layers()
    assert sorted(run.dropped) == layers and all(len(d) == 4 for d in run.dropped.values())
    # reference: a plain calibration with every earlier choice masked in the model's own routers
    for n, layer in enumerate(layers):
        earlier = {k: run.dropped[k] for k in layers[:n]}
        with masked_experts(model, adapter, earlier):
            ref = collect(model, adapter, [data]).stats["s"][layer]
        got = run.stats["s"][layer]
        for field in ("count", "gate_norm_sum", "prob_topk_sum"):
            assert torch.allclose(got.sums[field], ref.sums[field], rtol=1e-5, atol=1e-9), (layer, field)
        score = CRITERIA.get("reap").fn(ref)
        kept = [j for j in range(E) if j not in run.dropped[layer]]
        if routing.group_limited:
            continue  # per-group choice; the group equality is checked by plan validation in the prune test
        assert min(score[kept]) >= max(score[run.dropped[layer]])
    # the choices differ from a one-shot calibration somewhere, or the test would not show anything
    plain = collect(model, adapter, [data]).stats["s"]
    assert any(not torch.equal(plain[layer].sums["count"], run.stats["s"][layer].sums["count"])
               for layer in layers[1:])


def test_naee_first_layer_is_the_brute_force_optimum():
    model = tiny_model("qwen3_moe", seed=6)
    adapter = get_adapter(model.config)
    data = calib_set(seed=8)
    run = collect(model, adapter, [data], decide=reconstruction_decider(0.25, adapter.routing(), 8))
    first = adapter.moe_layers()[0]
    # reference: the first MoE block's input/output from one whole-model forward, every 2-subset tried by hand
    block = adapter.block(model, first)
    io = {}
    hook = block.register_forward_hook(lambda m, a, o: io.update(x=a[0].detach(), z=o.detach()))
    with torch.no_grad():
        model(input_ids=data.input_ids, attention_mask=data.attention_mask, use_cache=False)
    hook.remove()
    errors = {}
    real = data.attention_mask.bool()  # [B, S] NAEE's error counts real tokens only
    assert not real.all()  # the data has padding, so this is tested
    for drop in itertools.combinations(range(8), 2):
        with masked_experts(model, adapter, {first: list(drop)}), torch.no_grad():
            errors[drop] = float((block(io["x"]).double() - io["z"].double()).square().sum(-1)[real].sum())
    best = min(errors, key=errors.get)
    assert tuple(run.dropped[first]) == best
    assert errors[best] < sorted(errors.values())[len(errors) // 2]  # not a flat landscape


def test_prune_cli_paths_give_verified_stock_loadable_exports(tmp_path):
    from moeprune.tiny import save_tiny

    ckpt = save_tiny("deepseek_v3", tmp_path / "m", with_tokenizer=True)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(400)))
    calib = api.CalibrateOptions((f"web={text}",), samples=4, seq_len=32)
    for name, kw in {"naee": dict(method=None, policy="reconstruction"),
                     "asyougo": dict(method="ean_mean", as_you_go=True),
                     "global": dict(method="reap", policy="global", ratio=0.5, floor=4)}.items():
        kw.setdefault("ratio", 0.25)
        applied, result = api.prune(ckpt, tmp_path / name, calib=calib, **kw)
        assert result.passed, name
        report = json.loads((applied.out / "moeprune_report.json").read_text())
        assert report["policy"] == kw.get("policy", "uniform")
        padded = any(report["padded_experts"].values())
        if name == "global":  # a note exactly when the selection was non-uniform and had to be padded
            assert bool(report["note"]) == padded
        else:
            assert report["note"].startswith("chosen layer by layer") and not padded
        assert (applied.out / "moeprune_stats.safetensors").is_file()
