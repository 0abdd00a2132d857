"""`moeprune prune --method heapr|camera`: export, stock reload == original with the removed neurons zeroed
(and removed experts masked), refusals before any work."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune.cli import build_parser, main
from moeprune.errors import MoePruneError
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.pipeline.verify import logits_of, seeded_inputs
from moeprune.select.neuron_plan import NeuronPlan
from moeprune.select.plan import PrunePlan
from moeprune.surgery.neurons import mask_neurons
from moeprune.tiny import save_tiny

TEXT = "The quick brown fox jumps over the lazy dog; 12 + 30 = 42. def f(x): return x\n" * 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("neurons")
    ckpt = save_tiny("qwen3_moe", root / "qwen3", seed=2, with_tokenizer=True)
    (root / "c.txt").write_text(TEXT)
    return root, ckpt, root / "c.txt"


def _reference_logits(ckpt, plan: NeuronPlan, expert_plan: PrunePlan | None, inputs):
    model = load_model(ckpt, dtype="float32")
    adapter = get_adapter(model.config, model=model)
    mask_neurons(model, adapter, plan.to_original(expert_plan) if expert_plan else plan)
    dropped = {layer: expert_plan.dropped(layer) for layer in expert_plan.layers} if expert_plan else {}
    with masked_experts(model, adapter, dropped):
        return logits_of(model, inputs)


@pytest.mark.parametrize("method", ["heapr", "camera"])
def test_cli_prune_neurons_exports_stock_checkpoint(setup, method):
    root, ckpt, calib = setup
    out = root / f"out-{method}"
    assert main(["prune", str(ckpt), "--method", method, "--ratio", "0.5", "--calib", f"web={calib}",
                 "--samples", "8", "--seq-len", "32", "--out", str(out)]) == 0
    report = json.loads((out / "moeprune_report.json").read_text())
    assert report["expert_width_before"] == 16 and report["expert_width_after"] == 8
    assert report["verify"]["passed"] and report["weight_bytes_after"] < report["weight_bytes_before"]
    plan = NeuronPlan.load(out / "moeprune_neurons.json")
    assert plan.method == method and plan.uniform_width == 8
    pruned = AutoModelForCausalLM.from_pretrained(out)  # stock loader, new width
    assert pruned.config.moe_intermediate_size == 8
    inputs = seeded_inputs(96, 2, 24, seed=3)
    got = logits_of(pruned, inputs)
    want = _reference_logits(ckpt, plan, None, inputs)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
    # a different plan (every expert keeps its first 8 neurons) gives different logits: the check can fail
    other = NeuronPlan({L: {j: list(range(8)) for j in d} for L, d in plan.kept_neurons.items()}, 16)
    if other.kept_neurons != plan.kept_neurons:
        assert (got - _reference_logits(ckpt, other, None, inputs)).abs().max().item() > 1e-3


def test_cli_prune_experts_then_neurons(setup):
    root, ckpt, calib = setup
    out = root / "combined"
    assert main(["prune", str(ckpt), "--method", "heapr", "--ratio", "0.5", "--calib", f"web={calib}",
                 "--samples", "8", "--seq-len", "32", "--expert-method", "frequency", "--expert-ratio", "0.25",
                 "--out", str(out)]) == 0
    report = json.loads((out / "moeprune_report.json").read_text())
    assert report["num_experts_after"] == 6 and report["expert_width_after"] == 8
    expert_plan = PrunePlan(kept_experts={int(k): v for k, v in report["kept_experts"].items()}, num_experts=8)
    plan = NeuronPlan.load(out / "moeprune_neurons.json")
    inputs = seeded_inputs(96, 2, 24, seed=4)
    got = logits_of(AutoModelForCausalLM.from_pretrained(out), inputs)
    want = _reference_logits(ckpt, plan, expert_plan, inputs)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()


def test_neuron_prune_refusals_before_work(setup, monkeypatch):
    root, ckpt, calib = setup
    from moeprune.pipeline import context, export

    for module in (context, export):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    base = ["prune", str(ckpt), "--method", "heapr", "--ratio", "0.5", "--out", str(root / "x")]
    cases = [
        ([], "pass --calib"),
        (["--calib", f"web={calib}", "--rho", "0.5"], "method heapr has none. Drop --rho"),
        (["--calib", f"web={calib}", "--expert-method", "aimer"], "--expert-method and --expert-ratio together"),
        (["--calib", f"web={calib}", "--min-width", "17"], "--min-width 17"),
    ]
    for extra, message in cases:
        with pytest.raises(MoePruneError, match=message):
            args = build_parser().parse_args(base + extra)
            args.func(args)
    assert not (root / "x").exists()
    with pytest.raises(MoePruneError, match="--expert-method/--expert-ratio combine"):
        args = build_parser().parse_args(["prune", str(ckpt), "--method", "aimer", "--ratio", "0.5", "--out",
                                          str(root / "y"), "--expert-method", "aimer"])
        args.func(args)


def test_cli_plan_then_apply_neuron_plan(setup):
    root, ckpt, calib = setup
    plan_file, out = root / "neurons.json", root / "applied"
    assert main(["plan", str(ckpt), "--method", "camera", "--rho", "0.5", "--ratio", "0.5", "--calib",
                 f"web={calib}", "--samples", "8", "--seq-len", "32", "--out", str(plan_file)]) == 0
    plan = NeuronPlan.load(plan_file)
    assert plan.method == "camera" and plan.uniform_width == 8 and plan.budget == "expert"
    assert main(["apply", str(ckpt), "--plan", str(plan_file), "--out", str(out)]) == 0
    inputs = seeded_inputs(96, 2, 24, seed=7)
    got = logits_of(AutoModelForCausalLM.from_pretrained(out), inputs)
    want = _reference_logits(ckpt, plan, None, inputs)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
    with pytest.raises(MoePruneError, match="--calib is for the methods that observe the model themselves"):
        args = build_parser().parse_args(["plan", str(ckpt), "--method", "aimer", "--ratio", "0.5",
                                          "--calib", f"web={calib}"])
        args.func(args)


@pytest.mark.parametrize("method", ["camera", "heapr"])
def test_cli_plan_lazy_equals_whole(setup, method):
    """`plan MODEL --calib --lazy` scores neurons one decoder layer at a time (HEAPr: top-down backward) and writes
    the plan the whole-model run writes; `apply --lazy` then exports it layer by layer, tensor for tensor."""
    root, ckpt, calib = setup
    files = {mode: root / f"{method}-{mode}.json" for mode in ("--lazy", "--no-lazy")}
    for mode, f in files.items():
        assert main(["plan", str(ckpt), "--method", method, "--ratio", "0.5", "--calib", f"web={calib}", "--samples",
                     "8", "--seq-len", "32", mode, "--out", str(f)]) == 0
    assert json.loads(files["--lazy"].read_text()) == json.loads(files["--no-lazy"].read_text())
    outs = {mode: root / f"{method}-applied{mode}" for mode in files}
    for mode, out in outs.items():
        assert main(["apply", str(ckpt), "--plan", str(files["--lazy"]), mode, "--out", str(out)]) == 0
    a, b = (AutoModelForCausalLM.from_pretrained(o).state_dict() for o in outs.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
