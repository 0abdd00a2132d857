"""Intra-expert (neuron-level) surgery on every supported family (tiny fp32 models, expert width I = 16):

- the sliced tensors are the kept rows/columns of the original ones (gate/up rows, down columns, biases), and the
  config width and the experts modules' width attributes follow;
- sliced logits == logits of the original with the removed neurons' down columns zeroed (`mask_neurons`);
- save_pretrained -> stock from_pretrained reproduces them; `verify` agrees;
- a keep-all plan is the identity (bit-exact);
- expert removal then neuron removal equals the original with experts masked out of routing and neurons zeroed;
- bad plans are refused before any tensor changes.

Kept width 8 of 16: stock grouped_mm needs widths that are multiples of 8 (bf16), and DeepSeek-style shared experts
(width moe_intermediate_size × n_shared_experts = 16) need a width dividing 16.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoConfig

from moeprune.errors import MoePruneError
from moeprune.io.stock import auto_class
from moeprune.models import get_adapter
from moeprune.models.layouts import WIDTH_ATTRS, experts_shape
from moeprune.models.masking import masked_experts
from moeprune.pipeline.verify import logits_of, seeded_inputs, verify
from moeprune.select.neuron_plan import NeuronPlan
from moeprune.select.plan import PrunePlan
from moeprune.surgery.in_memory import apply_plan
from moeprune.surgery.neurons import apply_neuron_plan, mask_neurons, text_config
from moeprune.tiny import FAMILY_CONFIGS, tiny_model
from test_modulelist_generic import legacy_model

FAMILIES = sorted(FAMILY_CONFIGS)
WIDTH, KEEP = 16, 8
COUPLED = {"deepseek_v3", "glm4_moe"}  # shared experts sized moe_intermediate_size × n_shared_experts


def random_plan(model, adapter, keep: int, seed: int = 0, width: int = WIDTH) -> NeuronPlan:
    """A different random subset of `keep` neurons for every expert of every MoE layer (E read from the model)."""
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for layer in adapter.moe_layers():
        E, _ = experts_shape(adapter, adapter.experts(adapter.block(model, layer)))
        kept[layer] = {j: sorted(torch.randperm(width, generator=g)[:keep].tolist()) for j in range(E)}
    return NeuronPlan(kept, width, method="random", ratio=1 - keep / width, model_type=adapter.model_type)


def _load(path):
    config = AutoConfig.from_pretrained(str(path))
    return auto_class(config).from_pretrained(str(path), dtype=torch.float32).eval()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _maxdiff(a, b, inputs) -> float:
    keep = inputs["attention_mask"].bool()
    return float((a - b)[keep].abs().max())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin-waits on a busy machine (~0.8 s -> ~6 ms a forward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs():
    return seeded_inputs(vocab_size=96, batch=3, seq_len=20, seed=7)  # last row left-padded


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory, inputs):
    """(family, original, plan, sliced model, masked logits, saved folder)."""
    family = request.param
    original = tiny_model(family, seed=1)
    adapter = get_adapter(original.config)
    plan = random_plan(original, adapter, KEEP, seed=2)
    sliced = copy.deepcopy(original)
    apply_neuron_plan(sliced, get_adapter(sliced.config), plan)
    masked = copy.deepcopy(original)
    mask_neurons(masked, get_adapter(masked.config), plan)
    folder = tmp_path_factory.mktemp(family) / "pruned"
    sliced.save_pretrained(folder)
    return family, original, plan, sliced, logits_of(masked, inputs), folder


def test_tensors_shrink_to_the_kept_neurons(case):
    family, original, plan, sliced, _, _ = case
    a, b = get_adapter(original.config), get_adapter(sliced.config)
    assert getattr(text_config(sliced.config), a.intermediate_key) == KEEP
    assert getattr(text_config(original.config), a.intermediate_key) == WIDTH  # the original is untouched
    if family in COUPLED:
        assert text_config(sliced.config).n_shared_experts == 2  # shared width 16 = 8 × 2 still
    for layer in plan.layers:
        before, after = a.expert_roles(a.block(original, layer)), b.expert_roles(b.block(sliced, layer))
        assert set(before) == set(after) and {"gate", "up", "down"} <= set(after)
        E = len(plan.kept_neurons[layer])
        assert after["gate"].shape == (E, KEEP, 32) and after["down"].shape == (E, 32, KEEP)
        for j in range(E):
            k = torch.tensor(plan.kept_neurons[layer][j])
            for role in ("gate", "up", "gate_bias", "up_bias"):
                if role in before:
                    assert torch.equal(after[role][j], before[role][j][k]), (family, role)
            assert torch.equal(after["down"][j], before["down"][j][:, k])
            if "down_bias" in before:
                assert torch.equal(after["down_bias"][j], before["down_bias"][j])
        experts = b.experts(b.block(sliced, layer))
        widths = {a_: getattr(experts, a_) for a_ in WIDTH_ATTRS if isinstance(getattr(experts, a_, None), int)}
        assert widths and set(widths.values()) == {KEEP}, (family, widths)
    n_before = sum(p.numel() for p in original.parameters())
    n_after = sum(p.numel() for p in sliced.parameters())
    assert n_after < n_before


def test_sliced_equals_masked_reference(case, inputs):
    family, original, _, sliced, want, _ = case
    got = logits_of(sliced, inputs)
    assert _maxdiff(got, want, inputs) < 1e-5, family
    assert _maxdiff(logits_of(original, inputs), want, inputs) > 1e-2  # removing neurons changed something real


def test_stock_reload_equals_masked_reference(case, inputs):
    family, _, _, _, want, folder = case
    config = json.loads((folder / "config.json").read_text())
    adapter = get_adapter(AutoConfig.from_pretrained(str(folder)))
    config = config.get("text_config", config)
    assert config[adapter.intermediate_key] == KEEP
    reloaded = _load(folder)
    assert _maxdiff(logits_of(reloaded, inputs), want, inputs) < 1e-5, family
    layer = adapter.moe_layers()[0]
    assert experts_shape(adapter, adapter.experts(adapter.block(reloaded, layer))) == (8, KEEP)


def test_keep_all_plan_is_the_identity(case, inputs):
    family, original, _, _, _, _ = case
    adapter = get_adapter(original.config)
    model = copy.deepcopy(original)
    apply_neuron_plan(model, get_adapter(model.config), random_plan(model, adapter, WIDTH, seed=3))
    assert torch.equal(logits_of(model, inputs), logits_of(original, inputs)), family


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_then_neuron_removal(family, tmp_path, inputs):
    """Expert PrunePlan (in memory) then a NeuronPlan on the survivors; the stock reload and `verify` equal
    the original with the dropped experts masked out of routing and the removed neurons' down columns zeroed."""
    original = tiny_model(family, seed=4)
    adapter = get_adapter(original.config)
    g = torch.Generator().manual_seed(5)
    expert_plan = PrunePlan({layer: sorted(torch.randperm(8, generator=g)[:6].tolist()) for layer in
                             adapter.moe_layers()}, num_experts=8, model_type=adapter.model_type)
    if family in COUPLED:  # group-limited router: keep 3 of each group of 4
        expert_plan = PrunePlan({layer: [0, 1, 3, 4, 6, 7] for layer in adapter.moe_layers()}, 8)
    pruned = copy.deepcopy(original)
    pruned_adapter = get_adapter(pruned.config)
    apply_plan(pruned, pruned_adapter, expert_plan)
    neuron_plan = random_plan(pruned, pruned_adapter, KEEP, seed=6)
    assert all(sorted(v) == list(range(6)) for v in neuron_plan.kept_neurons.values())
    apply_neuron_plan(pruned, pruned_adapter, neuron_plan)
    pruned.save_pretrained(tmp_path / "pruned")
    original.save_pretrained(tmp_path / "original")

    reference = copy.deepcopy(original)
    mask_neurons(reference, get_adapter(reference.config), neuron_plan.to_original(expert_plan))
    dropped = {layer: expert_plan.dropped(layer) for layer in expert_plan.layers}
    with masked_experts(reference, adapter, dropped) as hits:
        want = logits_of(reference, inputs)
    assert all(c["hits"] >= 1 for c in hits.values())
    got = logits_of(_load(tmp_path / "pruned"), inputs)
    assert _maxdiff(got, want, inputs) < 1e-5, family
    result = verify(tmp_path / "original", tmp_path / "pruned", [expert_plan, neuron_plan], seq_len=20)
    assert result.passed and result.max_abs_diff < 1e-5, result


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - COUPLED))
def test_unaligned_width_with_align_1_and_eager_experts(family, inputs):
    """Width 10 is refused by default (grouped_mm needs multiples of 8) but is exact with align=1 + eager."""
    original = tiny_model(family, seed=1)
    original.set_experts_implementation("eager")
    adapter = get_adapter(original.config)
    plan = random_plan(original, adapter, 10, seed=8)
    sliced = copy.deepcopy(original)
    with pytest.raises(MoePruneError, match="not a multiple of 8.*nearest: \\[8, 16\\].*align=1"):
        apply_neuron_plan(sliced, get_adapter(sliced.config), plan)
    apply_neuron_plan(sliced, get_adapter(sliced.config), plan, align=1)
    mask_neurons(original, adapter, plan)
    assert _maxdiff(logits_of(sliced, inputs), logits_of(original, inputs), inputs) < 1e-5


def test_modulelist_experts(inputs):
    """The ModuleList-of-MLP layout (generic adapter): Linear weights, in/out_features and widths follow."""
    model = legacy_model(seed=2)
    adapter = get_adapter(model.config, model=model)
    plan = random_plan(model, adapter, KEEP, seed=9)
    reference = mask_neurons(copy.deepcopy(model), adapter, plan)
    before = _state(model)
    apply_neuron_plan(model, adapter, plan)
    assert _maxdiff(logits_of(model, inputs), logits_of(reference, inputs), inputs) < 1e-5
    assert model.config.moe_intermediate_size == KEEP
    for layer in plan.layers:
        for j, mlp in enumerate(adapter.experts(adapter.block(model, layer))):
            k = torch.tensor(plan.kept_neurons[layer][j])
            prefix = f"model.layers.{layer}.mlp.experts.{j}."
            assert torch.equal(mlp.gate_proj.weight, before[prefix + "gate_proj.weight"][k])
            assert torch.equal(mlp.down_proj.weight, before[prefix + "down_proj.weight"][:, k])
            assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == KEEP
            assert mlp.intermediate_size == KEEP


# ----------------------------------------------------------------------------------------------- plan data


def test_plan_json_round_trip(tmp_path):
    model = tiny_model("qwen3_moe", seed=1)
    plan = random_plan(model, get_adapter(model.config), KEEP)
    path = plan.save(tmp_path / "neurons.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == "moeprune.neurons/1" and raw["width"] == WIDTH and raw["budget"] == "uniform"
    assert set(raw["kept_neurons"]) == {"1", "2"} and set(raw["kept_neurons"]["1"]) == {str(j) for j in range(8)}
    again = NeuronPlan.load(path)
    assert again == plan and again.sha256() == plan.sha256() and again.uniform_width == KEEP
    again.kept_neurons[1][0] = again.kept_neurons[1][0][:-1]
    assert again.uniform_width is None and again.sha256() != plan.sha256()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("text, match", [
    ('{"format": "moeprune.plan/1", "width": 16, "kept_neurons": {}}', "format"),
    ('{"width": 0, "kept_neurons": {}}', "width"),
    ('{"width": 16, "kept_neurons": {"1": {"0": [1]}, "1": {"0": [2]}}}', "twice"),
    ('{"width": 16, "kept_neurons": {"x": {"0": [1]}}}', "not an integer"),
    ('{"width": 16, "kept_neurons": {"1": {"0": [1.5]}}}', "list of ints"),
    ('{"width": 16, "kept_neurons": {"1": [1, 2]}}', "map expert indices"),
    ("{not json", "not valid JSON"),
])
def test_plan_load_refuses_bad_json(tmp_path, text, match):
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(MoePruneError, match=match):
        NeuronPlan.load(tmp_path / "p.json")


def _edit(plan: NeuronPlan, fn) -> NeuronPlan:
    bad = copy.deepcopy(plan)
    fn(bad.kept_neurons)
    return bad


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("edit, match", [
    (lambda k: k.pop(2), r"no entry for MoE layers \[2\]"),
    (lambda k: k.__setitem__(7, k[1]), r"layers \[7\] that are not MoE layers"),
    (lambda k: k[1][0].__setitem__(-1, 16), r"layer 1 expert 0: neuron indices \[16\] are outside 0..15"),
    (lambda k: k[1][3].__setitem__(1, k[1][3][0]), r"layer 1 expert 3: neurons \[\d+\] are listed more than once"),
    (lambda k: k[1].__setitem__(5, []), "layer 1 expert 5: keeps no neuron"),
    (lambda k: k[1][2].reverse(), "layer 1 expert 2: kept neurons must be ascending"),
    (lambda k: k[1].pop(4), r"misses \[4\]"),
    (lambda k: k[1].__setitem__(8, [0]), r"unknown experts \[8\]"),
    (lambda k: k[1].__setitem__(6, k[1][6][:4]), "different widths per expert.*own loader"),
])
def test_bad_plans_refused_before_any_change(family, edit, match):
    model = tiny_model(family, seed=1)
    if family == "gpt_oss":  # all layers are MoE: make "layer 2" the missing/extra one work the same way
        model = tiny_model(family, seed=1, num_hidden_layers=3, layer_types=["sliding_attention"] * 3)
    adapter = get_adapter(model.config)
    plan = _edit(random_plan(model, adapter, KEEP), edit)
    before = _state(model)
    with pytest.raises(MoePruneError, match=match):
        apply_neuron_plan(model, adapter, plan)
    after = _state(model)
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert getattr(text_config(model.config), adapter.intermediate_key) == WIDTH


def test_mask_accepts_non_uniform_plans_but_checks_the_rest():
    model = tiny_model("qwen3_moe", seed=1)
    adapter = get_adapter(model.config)
    plan = random_plan(model, adapter, KEEP)
    plan.kept_neurons[1][6] = plan.kept_neurons[1][6][:3]
    mask_neurons(model, adapter, plan)  # the reference works for any plan
    down = adapter.experts(adapter.block(model, 1)).down_proj  # [E, H, I]
    assert (down[6].abs().sum(0) != 0).sum() == 3
    plan.kept_neurons[1][6] = []
    with pytest.raises(MoePruneError, match="keeps no neuron"):
        mask_neurons(model, adapter, plan)


def test_width_and_model_type_mismatch_refused():
    model = tiny_model("mixtral", seed=1)
    adapter = get_adapter(model.config)
    plan = random_plan(model, adapter, KEEP)
    wide = NeuronPlan(plan.kept_neurons, width=32)
    with pytest.raises(MoePruneError, match="intermediate_size=16 but the neuron plan was made for width 32"):
        apply_neuron_plan(model, adapter, wide)
    with pytest.raises(MoePruneError, match="made for width 32"):
        wide.validate(adapter)
    other = NeuronPlan(plan.kept_neurons, WIDTH, model_type="olmoe")
    with pytest.raises(MoePruneError, match="model_type 'olmoe'"):
        apply_neuron_plan(model, adapter, other)


@pytest.mark.parametrize("family", sorted(COUPLED))
def test_shared_expert_coupling_refused(family):
    """DeepSeek-style shared experts are moe_intermediate_size × n_shared_experts = 16 wide: 12 cannot describe them."""
    model = tiny_model(family, seed=1)
    adapter = get_adapter(model.config)
    plan = random_plan(model, adapter, 12)
    before = _state(model)
    with pytest.raises(MoePruneError, match=r"does not divide 16.*multiple of 4 \(nearest: \[4, 8, 16\]\)"):
        apply_neuron_plan(model, adapter, plan, align=4)
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())
    assert text_config(model.config).n_shared_experts == 1


def test_to_original_numbering():
    plan = NeuronPlan({1: {0: [0, 2], 1: [1, 3]}}, width=4)
    expert_plan = PrunePlan({1: [1, 3]}, num_experts=4)
    lifted = plan.to_original(expert_plan)
    assert lifted.kept_neurons == {1: {0: [0, 1, 2, 3], 1: [0, 2], 2: [0, 1, 2, 3], 3: [1, 3]}}
    with pytest.raises(MoePruneError, match="make the neuron plan on the pruned model"):
        plan.to_original(PrunePlan({1: [0, 1, 2]}, num_experts=4))
