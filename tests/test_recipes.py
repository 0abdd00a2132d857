"""Recipes end to end on qwen3_moe, deepseek_v3 and gpt_oss: experts → neurons, merge → neurons, experts → experts.

For each: the stock reload equals the original under the chained references, built here by hand from the plans
in the export (masking, zeroing, and for merges the in-memory merge of the original), and `moeprune verify`
agrees; replaying the export's plans with `moeprune apply --recipe` gives identical tensors; a tampered export
fails verify (exit 1). Refusals come before any work and name the stage."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moeprune
from moeprune import api
from moeprune.calibration.run import CalibrateOptions
from moeprune.cli import main
from moeprune.merge.plan import MergePlan
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.pipeline.verify import logits_of, seeded_inputs
from moeprune.select.neuron_plan import NeuronPlan
from moeprune.select.plan import PrunePlan
from moeprune.surgery.merge import apply_merge_plan
from moeprune.surgery.neurons import mask_neurons
from moeprune.tiny import save_tiny
from refusal import assert_refused
from textgen import write_words

FAMILIES = ("qwen3_moe", "deepseek_v3", "gpt_oss")
RECIPES = {
    "experts-neurons": [{"method": "reap", "ratio": 0.25}, {"method": "camera", "ratio": 0.5}],
    "merge-neurons": [{"method": "msmoe", "ratio": 0.25}, {"method": "heapr", "ratio": 0.5}],
    "experts-experts": [{"method": "reap", "ratio": 0.25}, {"method": "frequency", "ratio": 0.34}],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    write_words(root / "web.txt")
    for family in FAMILIES:
        save_tiny(family, root / family, seed=3, with_tokenizer=True)
    return root


def calib(root) -> CalibrateOptions:
    return CalibrateOptions((f"web={root / 'web.txt'}",), samples=6, seq_len=48)


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        if not f.name.startswith("moeprune_"):
            out.update(load_file(f))
    return out


def hand_reference(src, plans, inputs) -> torch.Tensor:
    """The original under the chained references, built from the plans without the pipeline's Reference:
    expert stages compose into one masked set; a merge is done in memory on the original (then later expert
    indices refer to the merged model); neuron stages zero down columns mapped back through earlier expert plans."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    adapter = get_adapter(model.config, model=model)
    kept = {layer: list(range(adapter.num_experts)) for layer in adapter.moe_layers()}
    for plan in plans:
        if isinstance(plan, MergePlan):
            assert kept == {layer: list(range(adapter.num_experts)) for layer in kept}, "merge must come first here"
            apply_merge_plan(model, adapter, plan)
            adapter = get_adapter(model.config, model=model)
            kept = {layer: list(range(adapter.num_experts)) for layer in kept}
        elif isinstance(plan, PrunePlan):
            kept = {layer: [kept[layer][i] for i in plan.kept_experts[layer]] for layer in kept}
        else:
            assert isinstance(plan, NeuronPlan)
            full = PrunePlan({layer: v for layer, v in kept.items()}, adapter.num_experts)
            mask_neurons(model, adapter, plan.to_original(full) if full.kept_count < adapter.num_experts else plan)
    dropped = {layer: [j for j in range(adapter.num_experts) if j not in set(v)] for layer, v in kept.items()}
    with masked_experts(model, adapter, dropped):
        return logits_of(model, inputs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_export_replay_and_tamper(root, tmp_path, family, name):
    src, out = root / family, tmp_path / "out"
    applied, result = moeprune.prune(src, out, recipe=RECIPES[name], calib=calib(root))
    assert result.passed and result.max_abs_diff < 1e-4 * result.max_abs_logit, result

    # the export holds the recipe, each stage's plan and a report per stage
    recipe = json.loads((out / "moeprune_recipe.json").read_text())
    assert [s["method"] for s in recipe["stages"]] == [s["method"] for s in RECIPES[name]]
    report = json.loads((out / "moeprune_report.json").read_text())
    assert len(report["stages"]) == 2 and report["verify"]["passed"]
    plans = []
    for entry in recipe["stages"]:
        raw = json.loads((out / entry["plan"]).read_text())
        plans.append({"moeprune.plan/1": PrunePlan, "moeprune.merge/1": MergePlan,
                      "moeprune.neurons/1": NeuronPlan}[raw["format"]].from_dict(raw))

    # stock reload == original with the chained references, built by hand
    inputs = seeded_inputs(96, 2, 24, seed=11)
    got = logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), inputs)
    want = hand_reference(src, plans, inputs)
    keep = inputs["attention_mask"].bool()
    assert (got - want)[keep].abs().max().item() <= 1e-4 * want[keep].abs().max().item()
    original = logits_of(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), inputs)
    assert (got - original)[keep].abs().max().item() > 1e-3  # the recipe changed the model
    text = AutoModelForCausalLM.from_pretrained(out).config.get_text_config()
    adapter = get_adapter(text)
    assert adapter.num_experts == report["num_experts_after"] < 8

    # replaying the plans with `apply --recipe` gives identical tensors
    replay = tmp_path / "replay"
    assert main(["apply", str(src), "--recipe", str(out), "--out", str(replay)]) == 0
    a, b = _tensors(out), _tensors(replay)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["verify", str(src), str(replay)]) == 0
    # expert stages replay on the shards, stage by stage, without the model; merges and neurons layer by layer
    streamed = tmp_path / "streamed"
    assert main(["apply", str(src), "--recipe", str(out / "moeprune_recipe.json"), "--streaming",
                 "--out", str(streamed)]) == 0
    c = _tensors(streamed)
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    mode = json.loads((streamed / "moeprune_report.json").read_text())["apply_mode"]
    assert mode == ("streaming" if name == "experts-experts" else "layered")

    # a tampered export fails verify
    shard = next(f for f in sorted(out.glob("model*.safetensors")))
    tensors = load_file(shard)
    key = next(k for k in tensors if "experts" in k and tensors[k].dim() >= 2)
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert main(["verify", str(src), str(out)]) == 1


def test_single_method_flags_are_one_and_two_stage_recipes(root, tmp_path):
    """`--method/--ratio` == a one-stage recipe, `--expert-method/--expert-ratio` == a two-stage one: same tensors."""
    src = root / "qwen3_moe"
    web = f"web={root / 'web.txt'}"
    flags = ["--calib", web, "--samples", "6", "--seq-len", "48"]
    recipe = tmp_path / "r.yaml"
    for argv, stages in (
        (["--method", "msmoe", "--ratio", "0.25", "--router", "weighted"],
         "stages:\n  - {method: msmoe, ratio: 0.25, router: weighted}\n"),
        (["--method", "heapr", "--ratio", "0.5", "--expert-method", "frequency", "--expert-ratio", "0.25"],
         "stages:\n  - {method: frequency, ratio: 0.25}\n  - {method: heapr, ratio: 0.5}\n"),
    ):
        a, b = tmp_path / "flags", tmp_path / "recipe"
        recipe.write_text(stages)
        assert main(["prune", str(src), *argv, *flags, "--out", str(a), "--overwrite"]) == 0
        assert main(["prune", str(src), "--recipe", str(recipe), *flags, "--out", str(b), "--overwrite"]) == 0
        ta, tb = _tensors(a), _tensors(b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        ra, rb = (json.loads((x / "moeprune_recipe.json").read_text()) for x in (a, b))
        assert [{k: v for k, v in s.items() if k != "plan"} for s in ra["stages"]] == \
               [{k: v for k, v in s.items() if k != "plan"} for s in rb["stages"]]


def test_refusals_name_the_stage_before_any_work(root, tmp_path, no_work):
    src, out = root / "qwen3_moe", tmp_path / "out"
    cases = [
        ([{"method": "reap", "ratio": 0.25}, {"method": "hepar", "ratio": 0.5}],
         r"stage 2: unknown method 'hepar'\. Did you mean 'heapr'\?"),
        ([{"method": "reap", "ratio": 0.25}, {"method": "heapr", "ratio": 0.5, "router": "weighted"}],
         r"stage 2 \(heapr\): --router does not apply to neurons stages"),
        ([{"method": "reap", "ratio": 0.25}, {"method": "camera", "ratio": 0.5, "rho": 2}],
         r"stage 2 \(camera\).*--rho 2"),
        ([{"method": "reap", "ratio": 0.5}, {"method": "frequency", "ratio": 0.75}],
         r"stage 2 \(frequency\), on the model as the stages before leave it \(4 experts \(top-2\).*fewer than "
         r"the router's top-2"),
        ([{"method": "heapr", "ratio": 0.5, "budget": "global"}, {"method": "reap", "ratio": 0.25}],
         r"stage 2 \(reap\): follows stage 1 \(heapr\), whose 'global' budget"),
        ([{"method": "msmoe", "ratio": 0.5}, {"method": "heapr", "ratio": 0.99}], r"stage 2 \(heapr\).*--ratio 0\.99"),
        ([], "non-empty list of stages"),
        ([{"ratio": 0.5}], r"stage 1: give a method"),
    ]
    for recipe, match in cases:
        assert_refused(lambda r=recipe: api.prune(src, out, r, calib=calib(root)), match, inputs=[src], out=out)
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [{method: reap, ratio: 0.25}, {method: tcess_top1, ratio: 0.25, budget: layer}]\n")
    assert_refused(lambda: api.prune(src, out, bad, calib=calib(root)),
                   r"bad\.yaml: stage 2 \(tcess_top1\): --budget does not apply to experts stages", inputs=[src],
                   out=out)
