"""score -> select -> `PrunePlan`, from a checkpoint folder (data-free criteria) or a statistics file (calibrated).

    protected(ℓ) = user --protect experts ∪ (with --protect-super) REAP super experts from max |f| statistics
    kept = POLICIES[policy](scores, ratio, routing, higher_keeps, protected, floor)

A non-uniform selection (policy `global`) cannot be written as a stock config (one expert count for all layers),
so the plan keeps the selected experts and pads every layer to the largest count with its best-scoring dropped
experts (`nonuniform.pad_to_uniform`); `plan.padded` lists them and `plan.note` says so, and both go into the
report. Everything is validated before weights or statistics are scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moeprune.criteria import CRITERIA
from moeprune.criteria.base import Criterion
from moeprune.criteria.weights import WeightSummary, summarize_checkpoint
from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.models.base import MoEAdapter
from moeprune.select.nonuniform import describe_nonuniform, pad_to_uniform
from moeprune.select.plan import PrunePlan
from moeprune.select.policies import POLICIES, select
from moeprune.select.protect import parse_protected, super_experts
from moeprune.select.uniform import drop_count
from moeprune.stats.store import ExpertStats, StatsView

NEEDS_MODEL = {"reconstruction": "NAEE reconstruction search runs the model's MoE blocks on cached calibration "
                                 "activations: use `moeprune prune MODEL --calib NAME=PATH --policy reconstruction`."}


def build_plan(source: str | Path | ExpertStats | InMemoryWeights, method: str, ratio: float, seed: int = 0, *,
               calib_set: list[str] | None = None, policy: str = "uniform", floor: int | None = None,
               protect: list[str] | tuple[str, ...] = (), protect_super: bool = False) -> PrunePlan:
    crit = CRITERIA.get(method)
    if policy in NEEDS_MODEL:
        raise MoePruneError(NEEDS_MODEL[policy])
    POLICIES.get(policy)
    protected = parse_protected(list(protect))
    view = model_view(source)
    routing = view.routing()
    if policy != "global":
        drop_count(ratio, view.num_experts, routing)  # validate before any work
    if protect_super:
        if not isinstance(view, StatsView):
            raise MoePruneError("--protect-super finds super experts from calibration statistics (max |f|); plan "
                                "from a statistics file or use `prune --calib`.")
        combined = view.stats.combined(calib_set)
        for layer, experts in super_experts({k: v.sums["max_abs"] for k, v in combined.items()}).items():
            protected.setdefault(layer, set()).update(experts)
            logger.info("layer %d: super experts %s are protected", layer, sorted(experts))
    scores = layer_scores(crit, view, source, seed, calib_set)
    kept = select(policy, scores, ratio, routing, higher_keeps=crit.higher_keeps, protected=protected, floor=floor)
    score_lists = {layer: s.tolist() for layer, s in scores.items()}
    plan = PrunePlan(kept, view.num_experts, method=method, ratio=ratio, model_type=view.model_type,
                     scores=score_lists, policy=policy,
                     protected={k: sorted(v) for k, v in protected.items() if v} or None)
    if len({len(v) for v in kept.values()}) > 1:
        plan.note = describe_nonuniform(kept)
        plan.kept_experts, plan.padded = pad_to_uniform(kept, score_lists, view.num_experts, crit.higher_keeps,
                                                        routing)
        logger.warning("%s", plan.note)
    plan.validate(view)
    return plan


@dataclass
class InMemoryWeights:
    """Expert weight summaries of a model in memory (e.g. as earlier stages of a recipe left it)."""

    adapter: MoEAdapter
    summaries: dict[int, WeightSummary]


def model_view(source: str | Path | ExpertStats | InMemoryWeights) -> MoEAdapter | StatsView:
    """The checkpoint's adapter, or (for statistics) what they say about the model."""
    if isinstance(source, InMemoryWeights):
        return source.adapter
    if isinstance(source, ExpertStats):
        return StatsView(source)
    path = Path(source)
    if path.is_file() and path.suffix == ".safetensors":
        return StatsView(ExpertStats.load(path))
    ckpt = Checkpoint.open(path)
    return get_adapter(ckpt.config, weight_keys=ckpt.names())


def layer_scores(crit: Criterion, view, source, seed: int, calib_set: list[str] | None) -> dict[int, torch.Tensor]:
    """Scores [E] per MoE layer from the statistics, the checkpoint's weights or the seed, as `crit` needs."""
    layers = view.moe_layers()
    if crit.needs == "calibration":
        if not isinstance(view, StatsView):
            raise MoePruneError(f"method {crit.name!r} needs calibration statistics: run `moeprune calibrate MODEL "
                                "--calib NAME=PATH --out stats.safetensors` and plan from that file, or use "
                                "`moeprune prune --calib ...`.")
        combined = view.stats.combined(calib_set)
        return {layer: crit.fn(combined[layer]) for layer in layers}
    if calib_set:
        raise MoePruneError(f"--calib-set only applies to calibrated methods; {crit.name!r} is {crit.needs}-based.")
    if crit.needs == "weights":
        if isinstance(view, StatsView):
            raise MoePruneError(f"method {crit.name!r} reads expert weights; pass the checkpoint folder, not a "
                                "statistics file.")
        if isinstance(source, InMemoryWeights):
            summaries = source.summaries
        else:
            ckpt = Checkpoint.open(source)
            summaries = summarize_checkpoint(ckpt, get_adapter(ckpt.config, weight_keys=ckpt.names()))
        return {layer: crit.fn(summaries[layer]) for layer in layers}
    return {layer: crit.fn(view.num_experts, seed, layer) for layer in layers}
