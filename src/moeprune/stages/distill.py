"""Distillation as a stage: `{method: distill, steps: N, lr: ..., train: routers|experts|lora|[...], ...}`
(`prune --distill-steps N`). Options: `distill/config.py`; engine: `distill/`.

    teacher = the ORIGINAL model (the uncompressed checkpoint), run once over the calibration windows: its logits
              (full, or top-k) [and decoder-layer outputs] are kept and the teacher is freed before training
    student = the original with every earlier plan applied (`ctx.model`), in float32 (the optimizer's master
              weights), trained in place; LoRA adapters are merged back
    plan    = a WeightsPlan with the final value of every trained tensor: routed experts by canonical role, router
              tensors by name (a routers-only run holds no expert tensor)
SlimMoE-style staged slimming is a recipe: [{method: X, ratio: r1}, {method: distill, ...}, {method: X, ratio: r2},
{method: distill, ...}] (examples/slimmoe.yaml). The student and its optimizer state are held whole in memory
on one device: not layer by layer (`--lazy` is refused), no multi-GPU path (docs/distillation.md has the plan).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from moeprune.distill.config import DistillConfig
from moeprune.errors import MoePruneError
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.models.base import MoEAdapter
from moeprune.stages.base import StageOptions, config_copy, register_stage
from moeprune.stages.weights import WeightOptions, WeightStage, as_stored
from moeprune.stages.weights_plan import WeightsPlan, weights_format


@dataclass(frozen=True)
class DistillOptions(WeightOptions, DistillConfig):
    """The stage's method (no ratio) and every `DistillConfig` option (keyword-only)."""

    lists: ClassVar[tuple[str, ...]] = ("train",)

    def __post_init__(self) -> None:
        WeightOptions.__post_init__(self)
        DistillConfig.__post_init__(self)


class DistillStage(WeightStage):
    kind = "distill"
    plan_format = weights_format("distill")
    options_type = DistillOptions
    lazy_problem = ("distill trains the whole student in memory (with its optimizer state); it does not run layer by "
                    "layer. Drop --lazy, or distill on a machine with room for the model (docs/distillation.md: the "
                    "multi-GPU plan)")

    @classmethod
    def methods(cls) -> list[str]:
        return ["distill"]

    def validate_options(self, o: DistillOptions) -> None:
        o.validate()
        if "lora" in o.train:
            from moeprune.distill.lora import require_peft

            require_peft()

    def check_previous(self, o: StageOptions, previous: list) -> None:
        if not previous:
            raise MoePruneError("distill trains the compressed model toward the original, but it is the first stage: "
                                "nothing before it changes the model, so there is nothing to recover. Put it after "
                                "a stage that removes, merges or changes weights, e.g. [{method: tcess_top1, ratio: "
                                "0.25}, {method: distill, steps: 200}].")

    def check(self, o: DistillOptions, adapter: MoEAdapter) -> Any:
        config = config_copy(adapter)  # trains parameters in place: no layout restriction beyond LoRA's
        if "lora" in o.train:
            from moeprune.distill.lora import layout_problem
            from moeprune.models.capabilities import meta_experts

            experts = meta_experts(adapter)
            problem = None if experts is None else layout_problem(experts)
            if problem:
                raise MoePruneError(f"train lora: {problem}.")
        return config

    def plan(self, o: DistillOptions, ctx) -> WeightsPlan:
        from moeprune.distill.data import windows
        from moeprune.distill.run import distill_model
        from moeprune.distill.teacher import teacher_targets
        from moeprune.distill.trainable import trained_values

        if ctx.ckpt is None or ctx.calib is None or ctx.sets is None:
            raise MoePruneError("distill trains on calibration text: use `moeprune prune MODEL --calib NAME=PATH` "
                                "with the recipe.")
        calib = ctx.calib
        ids, mask = windows(ctx.sets)
        teacher = load_model(ctx.ckpt.path, dtype=calib.dtype, device=calib.device)
        t_adapter = get_adapter(teacher.config, model=teacher)
        vocab = teacher.config.get_text_config().vocab_size
        targets = teacher_targets(teacher, t_adapter.decoder_layers(teacher), ids, mask, topk=o.topk(vocab),
                                  temperature=o.temperature, hidden=o.hidden_weight > 0,
                                  batch_size=calib.batch_size, device=calib.device)
        del teacher  # freed before the student is loaded
        student = ctx.model(dtype="float32")
        s_adapter = get_adapter(student.config, model=student)
        fingerprint = {"model": str(ctx.ckpt.path),
                       "previous": json.dumps([s.provenance(p) for s, p in ctx.previous], sort_keys=True, default=str)}
        summary = distill_model(student, targets, o, device=calib.device, fingerprint=fingerprint,
                                eval_batch_size=calib.batch_size)
        experts, router = as_stored(*trained_values(student, s_adapter, o.train), ctx.ckpt, s_adapter)
        settings = o.settings() | {"steps": summary["steps"], "teacher_topk": targets.topk}
        if "lora" in o.train:
            settings |= {"lora_rank": o.rank, "lora_alpha": o.alpha}
        return WeightsPlan("distill", s_adapter.num_experts, s_adapter.expert_width, experts, router,
                           settings=settings, summary=summary, model_type=s_adapter.model_type)

    def describe(self, plan: WeightsPlan) -> str:
        s, train = plan.summary, "+".join(plan.settings.get("train", []))
        kl = f", calibration KL {s['kl_start']:.4g} → {s['kl_end']:.4g}" if "kl_end" in s else ""
        return f"distill ({train}, {plan.settings.get('steps')} steps){kl}"


DISTILL = register_stage(DistillStage())
