"""Expert removal as a stage: a criterion scores every routed expert, a policy keeps the best (`PrunePlan`).

    scores[ℓ] = criterion(statistics | weights | seed)        [E] per MoE layer (`criteria/`)
    kept[ℓ]   = policy(scores, ratio, routing, protected)      (`select/`)
NAEE (`method: naee`, or `--policy reconstruction`) and `as_you_go` choose each layer's experts inside the
calibration pass, on the outputs of the already-pruned layers before it (`select/progressive.py`). `method: auto`
builds every calibrated criterion's plan (and NAEE's where affordable) from one calibration run and keeps the one
judged best on held-apart calibration windows (`select/auto.py`; run on the model by `pipeline/auto.py`).
Surgery slices expert tensors and router rows (`surgery/in_memory.py`, or the shards: `surgery/streaming.py`);
the reference masks the dropped experts out of the original's own router (`models/masking.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from moeprune.criteria import CRITERIA
from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.select.auto import AUTO
from moeprune.select.build import build_plan
from moeprune.select.plan import PLAN_FORMAT, PrunePlan
from moeprune.select.policies import POLICIES
from moeprune.select.progressive import criterion_decider, reconstruction_decider
from moeprune.select.protect import parse_protected
from moeprune.select.stun import STUN, validate_stun
from moeprune.select.stun_plan import plan_stun
from moeprune.select.uniform import drop_count
from moeprune.stages.base import Need, Stage, StageOptions, config_copy, register_stage

NAEE = "naee"  # NAEE's reconstruction search (needs no criterion); plans record "naee_reconstruction"


@dataclass(frozen=True)
class ExpertOptions(StageOptions):
    seed: int | None = None  # random control only; 0 when not given (None, so a given --seed 0 is refused too)
    policy: str = "uniform"
    floor: int | None = None
    protect: tuple[str, ...] = ()
    protect_super: bool = False
    as_you_go: bool = False
    calib_set: tuple[str, ...] | None = None
    beam: int | None = None  # NAEE's beam width beyond the exhaustive limit (None: `reconstruction.DEFAULT_BEAM`)
    search_tokens: int | None = None  # NAEE: real tokens kept per layer (None: `naee_outputs.DEFAULT_SEARCH_TOKENS`,
    # 0: every token, up to the memory budget)
    auto_naee: bool | None = None  # auto: NAEE as a candidate (None: when affordable, `select/auto.py`)
    judge_folds: int | None = None  # auto: folds of the cross-fitted judge (None: `judge.JUDGE_FOLDS`)
    nll_candidates: int | None = None  # auto: candidates (lowest block error) whose masked NLL is measured (None: all)
    mix: float | None = None  # stun: weight of the router distance against co-selection (None: `stun.DEFAULT_MIX`)
    keep: str | None = None  # stun: which member represents a cluster (None: `stun.DEFAULT_KEEP`)

    lists: ClassVar[tuple[str, ...]] = ("protect", "calib_set")

    @property
    def progressive(self) -> bool:
        return self.as_you_go or self.method == NAEE


class ExpertStage(Stage):
    kind = "experts"
    plan_format = PLAN_FORMAT
    options_type = ExpertOptions
    applies_to_shards = True

    @classmethod
    def methods(cls) -> list[str]:
        return [*CRITERIA, NAEE, AUTO, STUN]

    # ------------------------------------------------------------------ options
    def validate_options(self, o: ExpertOptions) -> None:
        if o.method == AUTO or any(getattr(o, f) is not None for f in AUTO_ONLY):
            return self._validate_auto(o)
        if o.method == STUN or o.mix is not None or o.keep is not None:
            return validate_stun(o)
        if o.policy == "reconstruction" and o.method != NAEE:
            raise MoePruneError(f"--policy reconstruction is NAEE's search and replaces the criterion: drop "
                                f"--method {o.method} (or use method {NAEE!r}), or choose --policy uniform.")
        if o.method == NAEE and o.policy not in ("uniform", "reconstruction"):
            raise MoePruneError(f"method {NAEE!r} searches layer by layer with a uniform count; drop --policy "
                                f"{o.policy}.")
        if o.beam is not None and (o.method != NAEE or isinstance(o.beam, bool) or not isinstance(o.beam, int)
                                   or o.beam < 1):
            raise MoePruneError(f"beam is the width of NAEE's search (method {NAEE!r}): an integer >= 1, got "
                                f"{o.beam!r} with method {o.method!r}. Drop it or fix it.")
        if o.search_tokens is not None and (o.method != NAEE or isinstance(o.search_tokens, bool)
                                            or not isinstance(o.search_tokens, int) or o.search_tokens < 0):
            raise MoePruneError(f"search_tokens is the number of tokens NAEE's search keeps per layer (method "
                                f"{NAEE!r}): an integer >= 1, or 0 for every token; got {o.search_tokens!r} with "
                                f"method {o.method!r}. Drop it or fix it.")
        if o.method != NAEE:
            POLICIES.get(o.policy)
        crit = None if o.method == NAEE else CRITERIA.get(o.method)
        if o.seed is not None and (crit is None or crit.needs != "none"):
            raise MoePruneError(f"--seed only applies to the random control criterion; {o.method!r} is "
                                "deterministic. Drop --seed.")
        if o.floor is not None and o.policy != "global":
            raise MoePruneError("--floor applies to --policy global (fewest experts any layer keeps); drop it or "
                                "add --policy global.")
        if o.progressive and (o.policy not in ("uniform", "reconstruction") or o.protect_super):
            raise MoePruneError("prune-as-you-go selects layer by layer with the uniform policy (or NAEE "
                                "reconstruction); drop --policy global/per_group, --floor and --protect-super.")
        if o.as_you_go and (crit is None or crit.needs != "calibration"):
            what = "NAEE already searches layer by layer" if crit is None else f"{o.method!r} is {crit.needs}-based"
            raise MoePruneError(f"--as-you-go re-scores each layer from calibration statistics during calibration, "
                                f"but {what}; drop --as-you-go or choose a calibrated criterion (e.g. reap).")
        if crit is not None and crit.needs != "calibration":
            given = [f for f, on in (("--protect-super", o.protect_super), ("--calib-set", o.calib_set)) if on]
            if given:
                raise MoePruneError(f"{', '.join(given)} read calibration statistics; {o.method!r} is "
                                    f"{crit.needs}-based. Drop them or choose a calibrated criterion.")
        parse_protected(list(o.protect))

    def _validate_auto(self, o: ExpertOptions) -> None:
        given = [_flag(f) for f in AUTO_ONLY if getattr(o, f) is not None]
        if o.method != AUTO:
            raise MoePruneError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to method {AUTO!r} "
                                f"(how it judges its candidates); drop {'it' if len(given) == 1 else 'them'} or use "
                                f"--method {AUTO}.")
        other = [flag for flag, on in (("--seed", o.seed is not None), (f"--policy {o.policy}", o.policy != "uniform"),
                                       ("--floor", o.floor is not None), ("--as-you-go", o.as_you_go),
                                       ("--calib-set", bool(o.calib_set))) if on]
        if other:
            raise MoePruneError(f"{', '.join(other)} {'does' if len(other) == 1 else 'do'} not apply to method "
                                f"{AUTO!r}: it builds every candidate from all calibration sets with the uniform "
                                "policy and judges them by cross-fitting on every set. Drop "
                                f"{'it' if len(other) == 1 else 'them'}, or choose a method yourself.")
        if o.auto_naee not in (None, True, False):
            raise MoePruneError(f"auto_naee is true (always a candidate), false (never) or null (when affordable), "
                                f"got {o.auto_naee!r}.")
        for name, least in (("judge_folds", 2), ("nll_candidates", 1)):
            v = getattr(o, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
                raise MoePruneError(f"{name} must be an integer >= {least}, got {v!r}.")
        for name in ("beam", "search_tokens"):
            v = getattr(o, name)
            if v is not None and o.auto_naee is False:
                raise MoePruneError(f"{name} configures NAEE's candidate, but auto_naee is false; drop one of them.")
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "beam" else 0)):
                raise MoePruneError(f"{name} must be an integer >= {1 if name == 'beam' else 0}, got {v!r}.")
        parse_protected(list(o.protect))
        return None

    def needs(self, o: ExpertOptions) -> set[Need]:
        if o.method == AUTO:
            return {Need.ROUTED, Need.DECIDE}
        if o.method == NAEE:
            return {Need.ROUTED, Need.DECIDE}
        if o.method == STUN:
            return {Need.ROUTED}
        crit = CRITERIA.get(o.method)
        base = {"calibration": Need.ROUTED, "weights": Need.WEIGHTS}.get(crit.needs, Need.SEED)
        return {base} | ({Need.DECIDE} if o.as_you_go else set())

    def check(self, o: ExpertOptions, adapter: MoEAdapter) -> Any:
        if o.method == NAEE or (o.method == AUTO and o.auto_naee):
            from moeprune.models.capabilities import require

            require(adapter, "naee")
        E, routing = adapter.num_experts, adapter.routing()
        n_drop = drop_count(o.ratio, E, routing)  # a global policy drops as many on average
        protected = parse_protected(list(o.protect))
        moe = set(adapter.moe_layers())
        for layer, experts in protected.items():
            if layer not in moe or any(j >= E for j in experts):
                raise MoePruneError(f"--protect {layer}:{','.join(map(str, sorted(experts)))}: the model has MoE "
                                    f"layers {sorted(moe)} with experts 0..{E - 1}.")
        cfg = config_copy(adapter)
        adapter.set_config_experts(cfg, E - n_drop)
        return cfg

    # ------------------------------------------------------------------ plans
    def plan(self, o: ExpertOptions, ctx) -> PrunePlan:
        if o.method == AUTO:
            from moeprune.pipeline.auto import plan_auto  # runs on the context's model (docs/architecture.md)

            return plan_auto(o, ctx)
        if o.method == STUN:
            return plan_stun(o, ctx)
        adapter = ctx.adapter
        protected = parse_protected(list(o.protect))
        if o.progressive:
            E, routing = adapter.num_experts, adapter.routing()
            if o.method == NAEE:
                extra = {} if o.beam is None else {"beam": o.beam}
                if o.search_tokens is not None:
                    extra["max_tokens"] = o.search_tokens or None  # 0: every token (the byte budget still holds)
                decide, method = reconstruction_decider(o.ratio, routing, E, protected, **extra), "naee_reconstruction"
            else:
                decide, method = criterion_decider(CRITERIA.get(o.method), o.ratio, routing, E, protected), o.method
            stats = ctx.routed_stats(decide=decide)
            dropped = {int(k): v for k, v in stats.meta["dropped_as_you_go"].items()}
            kept = {layer: [j for j in range(E) if j not in set(dropped.get(layer, []))]
                    for layer in adapter.moe_layers()}
            plan = PrunePlan(kept, E, method=method, ratio=o.ratio, model_type=adapter.model_type,
                             policy="reconstruction" if o.method == NAEE else o.policy,
                             protected={k: sorted(v) for k, v in protected.items() if v} or None,
                             note="chosen layer by layer during calibration (prune-as-you-go): each layer was "
                                  "scored on the outputs of the already-pruned layers before it")
            plan.validate(adapter)
            return plan
        needs = self.needs(o)
        source = ctx.routed_stats() if Need.ROUTED in needs else ctx.weights_source()
        return build_plan(source, o.method, o.ratio, o.seed or 0, calib_set=list(o.calib_set) if o.calib_set else None,
                          policy=o.policy, floor=o.floor, protect=o.protect, protect_super=o.protect_super)

    def load_plan(self, raw: dict, source: str) -> PrunePlan:
        return PrunePlan.from_dict(raw, source=source)

    def next_config(self, plan: PrunePlan, adapter: MoEAdapter) -> Any:
        cfg = config_copy(adapter)
        adapter.set_config_experts(cfg, plan.kept_count)
        return cfg

    # ------------------------------------------------------------------ surgery
    def apply_layer(self, model, adapter: MoEAdapter, plan: PrunePlan, layer: int) -> None:
        from moeprune.surgery.in_memory import prune_layer

        prune_layer(model, adapter, plan, layer)

    def apply_shards(self, ckpt, adapter: MoEAdapter, plan: PrunePlan, out_dir: Path, max_shard_bytes: int) -> None:
        from moeprune.surgery.streaming import apply_plan_streaming

        plan.validate(adapter)
        apply_plan_streaming(ckpt, adapter, plan, out_dir, max_shard_bytes)

    def shards_problem(self, ckpt, adapter: MoEAdapter) -> str | None:
        from moeprune.surgery.streaming import quantized_router

        return quantized_router(ckpt, adapter)

    def shard_view(self, ckpt, adapter: MoEAdapter, plan: PrunePlan) -> list | None:
        """The kept experts' tensors renamed 0..K−1, the routers' kept rows, every other tensor whole
        (`surgery.streaming.plan_tensors`); None for a quantized source (read and dequantized whole) or a layout
        the streaming export does not recognise."""
        from moeprune.surgery.streaming import plan_tensors

        if ckpt.quantization is not None or plan.kept_count < 0:
            return None
        try:
            return plan_tensors(ckpt, adapter, plan)
        except MoePruneError as e:
            logger.debug("later stages read every expert: no view of the shards (%s)", e)
            return None

    def survivors(self, plan: PrunePlan) -> dict[int, list[int]]:
        return plan.kept_experts

    def reference(self, ref, plan: PrunePlan) -> None:
        """Nothing to write: the dropped experts' slots are masked at the end (`Reference.masked`)."""

    # ------------------------------------------------------------------ reports
    def provenance(self, plan: PrunePlan) -> dict:
        return {"method": plan.method, "ratio": plan.ratio, "plan_sha256": plan.sha256(),
                "num_experts_before": plan.num_experts, "num_experts_after": plan.kept_count} | (
                    {"chosen_by": AUTO} if plan.auto else {})

    def report(self, plan: PrunePlan, before: MoEAdapter, after: MoEAdapter) -> dict:
        return {
            "stage": self.kind, "method": plan.method, "ratio": plan.ratio, "plan_sha256": plan.sha256(),
            "num_experts": plan.num_experts, "num_experts_before": plan.num_experts,
            "num_experts_after": plan.kept_count,
            "kept_experts": {str(k): v for k, v in sorted(plan.kept_experts.items())},
            "dropped_experts": {str(k): plan.dropped(k) for k in plan.layers},
            "policy": plan.policy,
            "protected_experts": {str(k): v for k, v in sorted((plan.protected or {}).items())},
            "padded_experts": {str(k): v for k, v in sorted((plan.padded or {}).items())},
            "loadable_by_stock_config": True,  # a non-uniform selection is padded (see "note")
            "note": plan.note or "",
        } | ({"auto": plan.auto} if plan.auto else {})

    def describe(self, plan: PrunePlan) -> str:
        how = f"{plan.method}, chosen by {AUTO}" if plan.auto else plan.method
        return f"experts ({how}): {plan.num_experts} -> {plan.kept_count} per MoE layer"


AUTO_ONLY = ("auto_naee", "judge_folds", "nll_candidates")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


EXPERTS = register_stage(ExpertStage())
