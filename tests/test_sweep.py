"""`moeprune sweep` on a tiny model: the block error per task, layer and ratio equals the block run by hand with the
task's plan masked; the held-out perplexity at a ratio equals the exported pruned checkpoint reloaded stock; the
plans equal `build_plan` on an independent calibration pass; the files are written."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune import api
from moeprune.analysis.run import pass_stats
from moeprune.calibration.run import CalibrateOptions, load_tokenizer, prepare
from moeprune.calibration.session import collect
from moeprune.cli import main
from moeprune.eval.perplexity import evaluate_sets
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.select.build import build_plan
from moeprune.sweep.options import SweepOptions, heldout_sets
from moeprune.tiny import save_tiny
from textgen import write_words

RATIOS = [0.25, 0.5, 0.75]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    model = save_tiny("qwen3_moe", tmp / "m", seed=1, with_tokenizer=True)
    a = write_words(tmp / "a.txt", n=1500, vocab=4, seed=1)  # two tasks with different word distributions
    b = write_words(tmp / "b.txt", n=1500, vocab=10, seed=2)
    b_held = write_words(tmp / "b_held.txt", n=400, vocab=10, seed=3)
    argv = ["sweep", str(model), "--calib", f"a={a}", "--calib", f"b={b}", "--heldout", f"b={b_held}",
            "--held-out", "3", "--samples", "4", "--seq-len", "24", "--batch-size", "3", "--heldout-sequences", "5",
            "--ratios", "0.25..0.75", "--step", "0.25", "--probe-tokens", "0", "--out", str(tmp / "out")]
    assert main(argv) == 0
    data = json.loads((tmp / "out" / "sweep.json").read_text())
    calib = CalibrateOptions((f"a={a}", f"b={b}"), samples=4, seq_len=24, batch_size=3, held_out=3)
    opts = SweepOptions(tuple(RATIOS), heldout=(f"b={b_held}",), heldout_sequences=5, probe_tokens=0)
    _, _, sets = prepare(model, calib)
    held = heldout_sets(opts, calib, sets, load_tokenizer(model, None))
    return tmp, model, data, sets, held


def independent_stats(model_path, sets):
    model = load_model(model_path, dtype="float32")
    adapter = get_adapter(model.config, model=model)
    return model, adapter, pass_stats(adapter, collect(model, adapter, sets, batch_size=3), sets, None, None)


def test_files_and_plans_equal_build_plan_on_an_independent_pass(swept):
    tmp, model_path, data, sets, held = swept
    assert {p.name for p in (tmp / "out").iterdir()} == {"sweep.json", "sweep.md", "sweep.png", "ratios.json"}
    assert data["ratios"] == RATIOS and data["criterion"] == "tcess" and list(data["tasks"]) == ["a", "b"]
    assert json.loads((tmp / "out" / "ratios.json").read_text()) == data["recommended"]
    assert data["tasks"]["a"]["heldout"]["split"] and not data["tasks"]["b"]["heldout"]["split"]
    assert data["tasks"]["a"]["heldout"]["windows"] == 3 and data["tasks"]["b"]["heldout"]["windows"] == 5
    _, adapter, stats = independent_stats(model_path, sets)
    differ = False
    for i, r in enumerate(RATIOS):
        plans = {}
        for task in ("a", "b"):
            plan = build_plan(stats, "tcess", r, calib_set=[task])
            want = [sorted(set(range(adapter.num_experts)) - set(plan.kept_experts[x])) for x in data["layers"]]
            assert data["tasks"][task]["dropped"][i] == want
            plans[task] = want
        differ |= plans["a"] != plans["b"]
    assert differ  # the tasks' own statistics choose different experts somewhere


def test_block_error_equals_the_masked_block_by_hand(swept):
    """‖Z − block_masked(X)‖² / ‖Z‖² over the task's real calibration tokens, X and Z from a whole-model forward."""
    _, model_path, data, sets, _ = swept
    model = load_model(model_path, dtype="float32")
    adapter = get_adapter(model.config, model=model)
    for s in sets:
        io, hooks = {}, []
        for layer in data["layers"]:
            hooks.append(adapter.block(model, layer).register_forward_hook(
                lambda m, a, o, layer=layer, io=io: io.__setitem__(layer, (a[0].clone(),
                                                                    (o[0] if isinstance(o, tuple) else o).clone()))))
        with torch.no_grad():
            model(input_ids=s.input_ids, attention_mask=s.attention_mask, use_cache=False)
        for h in hooks:
            h.remove()
        keep = s.attention_mask.bool()  # [B, S]
        for j, layer in enumerate(data["layers"]):
            x, z = io[layer]  # [B, S, H]
            for i in range(len(RATIOS)):
                dropped = data["tasks"][s.name]["dropped"][i][j]
                with torch.no_grad(), masked_experts(model, adapter, {layer: dropped}):
                    out = adapter.block(model, layer)(x)
                out = out[0] if isinstance(out, tuple) else out
                err = float((z[keep].double() - out[keep].double()).square().sum())
                ref = float(z[keep].double().square().sum())
                assert data["tasks"][s.name]["measured"][j][i] == pytest.approx(err / ref, rel=1e-4, abs=1e-9)
        assert data["tasks"][s.name]["measured"][0][-1] > 0


@pytest.mark.parametrize("task,i", [("a", 1), ("b", 2)])
def test_perplexity_equals_the_exported_plan_reloaded_stock(swept, task, i):
    tmp, model_path, data, sets, held = swept
    _, _, stats = independent_stats(model_path, sets)
    plan = build_plan(stats, "tcess", RATIOS[i], calib_set=[task])
    out = tmp / f"export-{task}-{i}"
    api.apply_plan(model_path, plan, out)
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert pruned.config.num_experts == 8 - round(8 * RATIOS[i])
    h = next(s for s in held if s.name == task)
    got = evaluate_sets(pruned, [h])[task].perplexity
    assert math.isclose(data["tasks"][task]["perplexity"][i], got, rel_tol=1e-5)
    original = evaluate_sets(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval(), [h])[task]
    assert math.isclose(data["tasks"][task]["perplexity_original"], original.perplexity, rel_tol=1e-6)
    assert math.isclose(data["tasks"][task]["quality"][i], got / original.perplexity, rel_tol=1e-5)
    assert got != original.perplexity
