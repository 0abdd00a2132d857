"""Distillation (`distill/`, `stages/distill.py`) on tiny qwen3_moe models.

The KL the loop must lower is computed here with `F.kl_div` from the teacher's and the student's own logits; a run
interrupted between checkpoints and resumed ends bit-identical to an uninterrupted one; a routers-only run leaves
every other tensor bit-identical; LoRA merged back equals W + (α/r)·B·A computed here from peft's factors (in the
export); recipes (expert removal + distill, SlimMoE's staged slimming, `--distill-steps`) export, reload with stock
`from_pretrained`, pass verify against their own result, and report the distill settings."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from moeprune import api
from moeprune.calibration.run import CalibrateOptions
from moeprune.cli import main
from moeprune.distill import run as distill_run
from moeprune.distill.config import DistillConfig
from moeprune.distill.data import batch_indices
from moeprune.distill.loss import TeacherBatch, token_kl
from moeprune.distill.optim import lr_factor
from moeprune.distill.run import distill_model
from moeprune.distill.teacher import teacher_targets
from moeprune.distill.trainable import router_parameters, trained_values
from moeprune.models import get_adapter
from moeprune.pipeline.recipe import parse_recipe
from moeprune.select.plan import PrunePlan
from moeprune.surgery.in_memory import apply_plan
from moeprune.tiny import save_tiny, tiny_model
from refusal import assert_refused

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "slimmoe.yaml"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


# ----------------------------------------------------------------------------------------------- helpers
def pair(seed: int = 3):
    """(teacher, student): a tiny qwen3_moe and a copy that keeps experts 0..3 of 8 in its MoE layers."""
    teacher = tiny_model("qwen3_moe", seed=seed)
    student = copy.deepcopy(teacher)
    adapter = get_adapter(student.config, model=student)
    apply_plan(student, adapter, PrunePlan({layer: [0, 1, 2, 3] for layer in adapter.moe_layers()}, 8))
    return teacher, student


def windows(n: int = 6, length: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (n, length), generator=g)  # [N, L]
    mask = torch.ones_like(ids)  # [N, L]
    mask[-1, length // 2 :] = 0  # a padded tail: must be ignored
    return ids, mask


def targets_of(teacher, ids, mask, **kw):
    return teacher_targets(teacher, get_adapter(teacher.config, model=teacher).decoder_layers(teacher), ids, mask,
                           **kw)


@torch.no_grad()
def kl(teacher, student, ids, mask) -> float:
    """Mean KL(teacher ‖ student) over real tokens, from both models' logits (not from the library)."""
    real = mask.bool()
    log_p = F.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits[real], -1)  # [n, V]
    log_q = F.log_softmax(student(input_ids=ids, attention_mask=mask).logits[real], -1)  # [n, V]
    return float(F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean())


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------- loss
def test_token_kl_matches_kl_div_and_topk_bounds():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 96, generator=g), torch.randn(2, 5, 96, generator=g) * 3  # [B, L, V]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    real = mask.bool()
    ref = F.kl_div(F.log_softmax(s[real] / 2, -1), F.log_softmax(t[real] / 2, -1), log_target=True,
                   reduction="none").sum(-1)  # [7]
    got = token_kl(s, TeacherBatch(logits=t), mask, temperature=2.0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    logz = torch.logsumexp(t / 2, -1)  # [B, L]
    v, i = t.topk(96, -1)  # every entry: the same as the full KL
    torch.testing.assert_close(token_kl(s, TeacherBatch(values=v, indices=i, logz=logz), mask, 2.0), ref, rtol=1e-5,
                               atol=1e-5)
    for k in (1, 8, 40):  # K ∪ {rest}: a true KL, never above the full one
        v, i = t.topk(k, -1)
        got = token_kl(s, TeacherBatch(values=v, indices=i, logz=logz), mask, 2.0)
        assert (got >= -1e-6).all() and (got <= ref + 1e-5).all(), k
    assert (got > 0.5 * ref).all()  # 40 of 96 entries hold most of the teacher's mass here


def test_budget_schedule_and_data_order():
    assert DistillConfig().total_steps(256) == 200
    assert DistillConfig(tokens=10_000, batch_size=4).total_steps(256) == 10  # ⌈10000 / 1024⌉
    factors = [lr_factor(s, 10, 2, "linear") for s in range(10)]
    assert factors[:3] == [1 / 3, 2 / 3, 1.0] and factors[-1] == 1 - 7 / 8
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5) and lr_factor(9, 10, 2, "constant") == 1.0
    stream = [i for step in range(6) for i in batch_indices(7, step, 5, 3)]  # 18 positions: 3 epochs of 5, +3
    for e in range(3):
        assert sorted(stream[5 * e : 5 * e + 5]) == list(range(5))  # every window once per epoch
    assert stream[:5] != stream[5:10] and batch_indices(7, 4, 5, 3) == stream[12:15]  # reshuffled; stateless


# ----------------------------------------------------------------------------------------------- the loop
@pytest.mark.parametrize("train,topk,hidden", [("experts+routers", 0, 0.0), ("lora+routers", 16, 1.0)])
def test_distillation_lowers_kl(train, topk, hidden):
    teacher, student = pair()
    ids, mask = windows()
    before = kl(teacher, student, ids, mask)
    targets = targets_of(teacher, ids, mask, topk=topk, hidden=hidden > 0)  # T = 1
    config = DistillConfig(steps=25, lr=3e-3, batch_size=3, train=train.split("+"), hidden_weight=hidden,
                           teacher_topk=topk)
    summary = distill_model(student, targets, config)
    after = kl(teacher, student, ids, mask)
    assert before > 1e-4  # the cut changed the function
    assert after < 0.7 * before, (before, after)
    assert summary["steps"] == 25 and summary["tokens"] == sum(int(mask[i].sum()) for s in range(25)
                                                                for i in batch_indices(0, s, 6, 3))
    assert len(summary["curve"]) == 3  # log_every 10: steps 10, 20, 25


@pytest.mark.parametrize("train", ["experts+routers", "lora"])
def test_resume_gives_the_uninterrupted_result(tmp_path, train):
    teacher, fresh = pair()
    ids, mask = windows()
    targets = targets_of(teacher, ids, mask)
    config = dict(steps=7, lr=3e-3, batch_size=4, seed=5, train=train.split("+"), schedule="linear",
                  warmup_steps=2)

    whole = copy.deepcopy(fresh)
    distill_model(whole, targets, DistillConfig(**config))

    class Killed(Exception):
        pass

    def kill_after_3(step, info):
        if step == 3:
            raise Killed

    folder = tmp_path / "ckpt"
    with pytest.raises(Killed):  # checkpoints at step 2 and 4: killed between them, after step 3
        distill_model(copy.deepcopy(fresh), targets, DistillConfig(**config, checkpoint_dir=str(folder),
                                                                   checkpoint_every=2), callback=kill_after_3)
    assert [p.name for p in folder.iterdir()] == ["distill_state.pt"]  # no temporary file left
    resumed = copy.deepcopy(fresh)
    summary = distill_model(resumed, targets, DistillConfig(**config, checkpoint_dir=str(folder), checkpoint_every=2))
    assert summary["resumed_at"] == 2
    a, b = state(whole), state(resumed)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-6, diff
    assert any(not torch.equal(a[k], state(fresh)[k]) for k in a)  # it did train

    with pytest.raises(Exception, match="another distillation .*lr"):  # another run's state is never resumed
        distill_model(copy.deepcopy(fresh), targets, DistillConfig(**{**config, "lr": 1e-3},
                                                                   checkpoint_dir=str(folder)))


def test_lora_on_modulelist_experts_is_the_dense_update():
    """Module-list experts (nn.Linear per expert): peft's Linear LoRA, merged: W + (α/r)·B·A per expert Linear."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from test_modulelist_generic import legacy_model

    teacher = legacy_model()
    student = copy.deepcopy(teacher)
    adapter = get_adapter(student.config, model=student)
    apply_plan(student, adapter, PrunePlan({layer: [0, 2, 3, 5, 6, 7] for layer in adapter.moe_layers()}, 8))
    ids, mask = windows()
    before = kl(teacher, student, ids, mask)
    seen = {}

    def record(step, info):
        if step == 6:  # the last step: the factors as merged
            for name, m in info["model"].named_modules():
                if isinstance(m, LoraLinear):
                    seen[name] = (m.base_layer.weight.detach().clone(), m.lora_A["default"].weight.detach().clone(),
                                  m.lora_B["default"].weight.detach().clone(), m.scaling["default"])

    distill_model(student, targets_of(teacher, ids, mask),
                  DistillConfig(steps=6, lr=1e-2, train="lora", lora_rank=2, lora_alpha=2), callback=record)
    assert kl(teacher, student, ids, mask) < before
    assert len(seen) == 2 * 6 * 3  # MoE layers x experts x (gate, up, down)
    for name, (W, A, B, scaling) in seen.items():
        assert scaling == 1.0 and B.abs().max() > 0
        torch.testing.assert_close(student.get_submodule(name).weight, W + scaling * B @ A, rtol=0, atol=1e-6)


def test_routers_only_changes_only_routers():
    teacher, student = pair()
    ids, mask = windows()
    before = state(student)
    distill_model(student, targets_of(teacher, ids, mask), DistillConfig(steps=5, lr=1e-2, train="routers"))
    after = state(student)
    adapter = get_adapter(student.config, model=student)
    names = {id(p): n for n, p in student.named_parameters()}
    routers = {names[id(p)] for ps in router_parameters(student, adapter).values() for p in ps.values()}
    assert routers == {f"model.layers.{i}.mlp.gate.weight" for i in adapter.moe_layers()}
    for k in before:
        assert torch.equal(before[k], after[k]) == (k not in routers), k
    experts, router = trained_values(student, adapter, ["routers"])
    assert experts == {} and sorted(router) == adapter.moe_layers()


# ----------------------------------------------------------------------------------------------- recipes
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    g = torch.Generator().manual_seed(0)
    (root / "web.txt").write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, 10, (2500,), generator=g)))
    save_tiny("qwen3_moe", root / "qwen3_moe", seed=3, with_tokenizer=True)
    return root


def calib(root, **kw) -> CalibrateOptions:
    return CalibrateOptions((f"web={root / 'web.txt'}",), samples=6, seq_len=32, **kw)


def test_recipe_expert_removal_then_distill(root):
    src, out = root / "qwen3_moe", root / "out-e2e"
    recipe = [{"method": "tcess_top1", "ratio": 0.5}, {"method": "distill", "steps": 20, "lr": 3e-3, "batch_size": 3}]
    applied, result = api.prune(src, out, recipe=recipe, calib=calib(root))
    assert result.passed, result.line()
    assert result.masked_original_max_abs_diff > 10 * max(result.max_abs_diff, 1e-6)  # the weights did change
    report = json.loads((out / "moeprune_report.json").read_text())
    stage = report["stages"][1]
    assert stage["stage"] == "distill" and stage["settings"]["steps"] == 20 and stage["settings"]["lr"] == 3e-3
    assert stage["settings"]["train"] == ["experts", "routers"] and stage["settings"]["teacher_topk"] == 0
    assert stage["summary"]["kl_end"] < stage["summary"]["kl_start"]
    assert report["verify"]["passed"]
    stock = AutoModelForCausalLM.from_pretrained(out)  # stock class, no moeprune code
    assert stock.config.num_experts == 4
    assert main(["verify", str(src), str(out)]) == 0
    replay = api.apply_plan(src, out, root / "out-e2e-replay").out  # the plans alone, no calibration data
    exported, replayed = load_file(out / "model.safetensors"), load_file(replay / "model.safetensors")
    assert exported.keys() == replayed.keys() and all(torch.equal(exported[k], replayed[k]) for k in exported)


def test_bf16_checkpoint_verifies_in_float32(root):
    """Training runs in float32; the plan holds the values as the checkpoint stores them (bf16), so the float32
    reference built from it is the export exactly."""
    src = save_tiny("qwen3_moe", root / "qwen3_moe_bf16", seed=3, dtype=torch.bfloat16, with_tokenizer=True)
    recipe = [{"method": "tcess_top1", "ratio": 0.5}, {"method": "distill", "steps": 3, "lr": 1e-2}]
    applied, result = api.prune(src, root / "out-bf16", recipe=recipe, calib=calib(root), verify_dtype="float32")
    # float32 GEMMs of other widths (the export vs the reference) round differently on some CPUs (7e-7 seen);
    # values left unrounded to bf16 (2^-9 relative per weight) would differ by ~1e-3 of the logits
    assert result.passed and result.max_abs_diff <= 1e-5 * result.max_abs_logit, result.line()
    tensors = load_file(root / "out-bf16" / "model.safetensors")
    assert tensors["model.layers.1.mlp.experts.0.down_proj.weight"].dtype == torch.bfloat16


def test_lora_export_is_the_dense_update(root, monkeypatch):
    """The export's experts = W + (α/r)·B_e A_e, from peft's factors (lora_A [r·E, in] holds expert e's A_e in rows
    e·r..(e+1)·r; lora_B [out, r·E] viewed [out, r, E] holds B_e at [:, :, e]) and the weights W they adapt."""
    from peft.tuners.lora.layer import ParamWrapper

    seen = {}
    real_merge = distill_run.merge_lora

    def recording_merge(peft_model):
        for name, m in peft_model.base_model.model.named_modules():
            if isinstance(m, ParamWrapper):
                layer = int(name.split(".layers.")[1].split(".")[0])
                W = getattr(m.get_base_layer(), m.parameter_name).detach().clone()  # [E, out, in]
                A = m.lora_A["default"].weight.detach().clone()  # [r·E, in]
                B = m.lora_B["default"].weight.detach().clone()  # [out, r·E]
                seen[(layer, m.parameter_name)] = (W, A, B, m.scaling["default"])
        return real_merge(peft_model)

    monkeypatch.setattr(distill_run, "merge_lora", recording_merge)
    src, out = root / "qwen3_moe", root / "out-lora"
    recipe = [{"method": "frequency", "ratio": 0.25},
              {"method": "distill", "steps": 6, "lr": 1e-2, "train": "lora", "lora_rank": 2, "lora_alpha": 4}]
    applied, result = api.prune(src, out, recipe=recipe, calib=calib(root))
    assert result.passed, result.line()
    assert sorted(seen) == [(layer, p) for layer in (1, 2) for p in ("down_proj", "gate_up_proj")]
    tensors = load_file(out / "model.safetensors")
    I, r = 16, 2
    for (layer, param), (W, A, B, scaling) in seen.items():
        assert scaling == 2.0
        E = W.shape[0]
        A, B = A.view(E, r, -1), B.view(B.shape[0], r, E)  # [E, r, in], [out, r, E]
        assert B.abs().max() > 0  # trained away from its zero init
        for e in range(E):
            dense = W[e] + scaling * B[:, :, e] @ A[e]  # [out, in]
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            if param == "down_proj":
                got = tensors[f"{prefix}.down_proj.weight"]
            else:
                got = torch.cat([tensors[f"{prefix}.gate_proj.weight"], tensors[f"{prefix}.up_proj.weight"]])
            assert got.shape == dense.shape == ((32, I) if param == "down_proj" else (2 * I, 32))
            torch.testing.assert_close(got, dense, rtol=0, atol=1e-6)
    stage = json.loads((out / "moeprune_report.json").read_text())["stages"][1]
    assert stage["settings"]["lora_rank"] == 2 and stage["settings"]["train"] == ["lora"]


def test_staged_slimming_recipe_runs(root):
    """SlimMoE: prune, distill, prune more, distill — the example recipe file, on a tiny model."""
    specs = parse_recipe(EXAMPLE)
    assert [s.options.method for s in specs] == ["tcess_top1", "distill", "tcess_top1", "distill"]
    recipe = [{**s.options.given(), "steps": 4} if s.stage.kind == "distill" else s.options.given() for s in specs]
    recipe[2]["ratio"] = 0.34  # of the 6 experts the first stage leaves: 4 remain
    applied, result = api.prune(root / "qwen3_moe", root / "out-slim", recipe=recipe, calib=calib(root))
    assert result.passed, result.line()
    assert AutoConfig.from_pretrained(root / "out-slim").num_experts == 4
    assert [s["stage"] for s in applied.report["stages"]] == ["experts", "distill", "experts", "distill"]


def test_cli_distill_steps_appends_a_stage(root):
    out = root / "out-cli"
    assert main(["prune", str(root / "qwen3_moe"), "--method", "frequency", "--ratio", "0.25", "--distill-steps", "3",
                 "--distill-train", "routers", "--calib", f"web={root / 'web.txt'}", "--samples", "4", "--seq-len",
                 "24", "--out", str(out)]) == 0
    recipe = json.loads((out / "moeprune_recipe.json").read_text())["stages"]
    assert [(s["method"], s.get("steps"), s.get("train")) for s in recipe] == [
        ("frequency", None, None), ("distill", 3, ["routers"])]


# ----------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("stages,match", [
    ([{"method": "distill", "steps": 5}], "first stage: nothing before it changes the model"),
    ([{"method": "reap", "ratio": 0.25}, {"method": "distill", "ratio": 0.5}], "ratio does not apply"),
    ([{"method": "reap", "ratio": 0.25}, {"method": "distill", "lora_rank": 4}], "lora_rank apply with train lora"),
    ([{"method": "reap", "ratio": 0.25}, {"method": "distill", "train": ["experts", "lora"]}], "choose one"),
    ([{"method": "reap", "ratio": 0.25}, {"method": "distill", "train": "attention"}], "one or more of routers"),
    ([{"method": "reap", "ratio": 0.25}, {"method": "distill", "steps": 5, "tokens": 100}], "not both"),
    ([{"method": "reap", "ratio": 0.25}, {"method": "distill", "checkpoint_every": 5}], "with checkpoint_dir"),
    ([{"method": "reap", "ratio": 0.25}, {"method": "distill", "schedule": "step"}], "constant, cosine, linear"),
    ([{"method": "reap", "ratio": 0.25}, {"method": "distill", "lr": 0}], "lr 0: a number > 0"),
    ([{"method": "reap", "ratio": 0.25}, {"method": "distill", "steps": 5, "warmup_steps": 5}], "leaves no training"),
])
def test_refusals_before_any_work(root, no_work, stages, match):
    out = root / "refused"
    assert_refused(lambda: api.prune(root / "qwen3_moe", out, recipe=stages, calib=calib(root)), match,
                   inputs=[root / "qwen3_moe"], out=out)


def test_lazy_run_refuses_distill_before_any_work(root, no_work):
    out = root / "refused-lazy"
    stages = [{"method": "reap", "ratio": 0.25}, {"method": "distill", "steps": 5}]
    assert_refused(lambda: api.prune(root / "qwen3_moe", out, recipe=stages, calib=calib(root, lazy=True)),
                   r"stage 2 \(distill\): this run goes layer by layer", inputs=[root / "qwen3_moe"], out=out)


def test_cli_distill_flags_need_steps(root, no_work):
    assert main(["prune", str(root / "qwen3_moe"), "--method", "reap", "--ratio", "0.25", "--distill-lr", "1e-3",
                 "--calib", f"web={root / 'web.txt'}", "--out", str(root / "refused-cli")]) == 2
