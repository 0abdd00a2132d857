"""Routing policies as a stage: `{method: topk, k: 3}`, `{method: top_p, p: 0.7}` or `{method: top_p,
target_active: 3.0, k_min: 1, k_max: 8}`, `{method: naee_skip}` (β per layer from calibration) or
`{method: naee_skip, target_active: 3.0, scope: global}` (default scope: per_layer), `{method: otp, target_active:
1.5, steps: 200}` (MC# OTP: a learned selector per layer, `routing/otp.py`).

Nothing is removed: the stage changes how the model routes at run time (`routing/`, `models/dynamic.py`).
- `topk` is a stock config change (the family's top-k key, and the modules' `top_k` attributes in memory):
  its export loads in stock transformers (and vLLM / SGLang) and routes top-k'.
- `top_p`, `naee_skip` and `otp` are per-token: the export's config.json holds the plan under `moeprune_routing`
  (otp's selector weights in the side file it names, `moeprune_otp.safetensors`); `moeprune.load_model` applies it.
  A plain `from_pretrained` routes with the model's own top-k, and says so: the export's marker tensor
  (`routing/marker.py`) is listed as UNEXPECTED in transformers' load report, naming the block (docs/routing.md).
The verification reference is the policy installed on the original (`reference`): for `topk` that proves the
stock top-k' export equals the policy applied in memory. A routing stage is always the last of a recipe.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter
from moeprune.routing.plan import BLOCK_KEY, METHODS, ROUTING_FORMAT, SCOPES, RoutingPlan
from moeprune.stages.base import Need, Stage, StageOptions, config_copy, register_stage


@dataclass(frozen=True)
class RoutingOptions(StageOptions):
    ratio: float = 0.0  # routing removes nothing; a given ratio is refused (`Stage.parse`)
    k: int | None = None  # topk
    p: float | None = None  # top_p
    target_active: float | None = None  # top_p, naee_skip: calibrate the threshold to this average
    k_min: int | None = None  # top_p (default 1)
    k_max: int | None = None  # top_p (default: the model's k)
    scope: str | None = None  # with target_active: per_layer (default) or global
    max_tokens: int | None = None  # calibration tokens captured per layer (default fit.DEFAULT_MAX_TOKENS)
    steps: int | None = None  # otp: optimiser steps (default otp.OTPConfig.steps)
    lr: float | None = None  # otp: AdamW learning rate of the selectors (default otp.OTPConfig.lr)

    def given(self) -> dict[str, Any]:
        out = super().given()
        out.pop("ratio", None)
        return out


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class RoutingStage(Stage):
    kind = "routing"
    plan_format = ROUTING_FORMAT
    options_type = RoutingOptions
    takes_ratio = False

    def lazy_plan_problem(self, o: RoutingOptions) -> str | None:
        """otp trains its selectors through whole-model forwards and backwards (like distillation); the other
        policies fit on router weights captured one decoder layer at a time, or need no data."""
        if o.method == "otp":
            return ("otp trains its selectors on the whole model in memory (a forward and a backward through every "
                    "layer per step); drop --lazy, or choose top_p / naee_skip with target_active")
        return None

    @classmethod
    def methods(cls) -> list[str]:
        return list(METHODS)

    # ------------------------------------------------------------------ options
    def parse(self, raw, where: str) -> RoutingOptions:
        if "ratio" in raw:
            raise MoePruneError(f"{where}: routing policies remove no weights, so ratio does not apply; say how many "
                                "experts each token uses with k (topk), p or target_active (top_p, naee_skip).")
        return super().parse(raw, where)

    def validate_options(self, o: RoutingOptions) -> None:
        allowed = {"topk": {"k"}, "top_p": {"p", "target_active", "k_min", "k_max", "scope", "max_tokens"},
                   "naee_skip": {"target_active", "scope", "max_tokens"},
                   "otp": {"target_active", "steps", "lr", "max_tokens"}}[o.method]
        given = [f for f in ("k", "p", "target_active", "k_min", "k_max", "scope", "max_tokens", "steps", "lr")
                 if getattr(o, f) is not None]
        wrong = [f for f in given if f not in allowed]
        if wrong:
            raise MoePruneError(f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to method "
                                f"{o.method!r}, which takes {', '.join(sorted(allowed))}; drop "
                                f"{'it' if len(wrong) == 1 else 'them'}.")
        if o.method == "topk" and not (_int(o.k) and o.k >= 1):
            raise MoePruneError(f"topk needs k, an integer >= 1 (experts per token), got {o.k!r}.")
        if o.method == "top_p":
            if (o.p is None) == (o.target_active is None):
                raise MoePruneError("top_p takes either p (the probability mass to keep, e.g. 0.7) or "
                                    "target_active (p is then calibrated), not both and not neither.")
            if o.p is not None and (isinstance(o.p, bool) or not isinstance(o.p, (int, float)) or not 0 < o.p <= 1):
                raise MoePruneError(f"p must be a number in (0, 1], got {o.p!r}.")
            for name in ("k_min", "k_max"):
                v = getattr(o, name)
                if v is not None and not (_int(v) and v >= 1):
                    raise MoePruneError(f"{name} must be an integer >= 1, got {v!r}.")
            if o.k_min is not None and o.k_max is not None and o.k_min > o.k_max:
                raise MoePruneError(f"k_min {o.k_min} is larger than k_max {o.k_max}.")
        if o.method == "otp":
            if o.target_active is None:
                raise MoePruneError("otp needs target_active, the average experts per token its selectors are "
                                    "trained to keep (e.g. 1.5 of a top-2 model).")
            if o.steps is not None and not (_int(o.steps) and o.steps >= 1):
                raise MoePruneError(f"steps must be an integer >= 1 (optimiser steps of the selectors), got "
                                    f"{o.steps!r}.")
            if o.lr is not None and (isinstance(o.lr, bool) or not isinstance(o.lr, (int, float)) or not o.lr > 0):
                raise MoePruneError(f"lr must be a number > 0, got {o.lr!r}.")
        if o.target_active is not None and (isinstance(o.target_active, bool)
                                            or not isinstance(o.target_active, (int, float)) or o.target_active < 1):
            raise MoePruneError(f"target_active is an average number of experts per token (>= 1), got "
                                f"{o.target_active!r}.")
        if o.scope is not None and (o.target_active is None or o.scope not in SCOPES):
            raise MoePruneError(f"scope ({' or '.join(SCOPES)}) says how target_active is met; got {o.scope!r}"
                                + ("" if o.target_active is not None else " without target_active") + ".")
        if o.max_tokens is not None and not (_int(o.max_tokens) and o.max_tokens >= 1):
            raise MoePruneError(f"max_tokens must be an integer >= 1, got {o.max_tokens!r}.")

    def needs(self, o: RoutingOptions) -> set[Need]:
        if o.method in ("naee_skip", "otp") or o.target_active is not None:
            return {Need.ROUTED}
        return {Need.WEIGHTS}  # nothing to observe: k or p is given

    def plans_from_text(self, o: RoutingOptions) -> bool:
        """Fitted policies (target_active, naee_skip) capture router weights, otp trains: both on calibration text."""
        return Need.ROUTED in self.needs(o)

    def check_previous(self, o: RoutingOptions, previous: list) -> None:
        if any(spec.stage.kind == "quantize" for spec in previous):
            raise MoePruneError("routing policies are applied to a full-precision model; put the routing stage "
                                "before quantize, or apply the policy at evaluation (--routing).")

    def final_only(self, o: RoutingOptions) -> str | None:
        return ("routing policy changes how the model routes at run time; later stages would calibrate and cut a "
                "model whose router is hooked: put the routing stage last")

    def check(self, o: RoutingOptions, adapter: MoEAdapter) -> Any:
        why = routing_problem(adapter)
        if why:
            from moeprune.errors import UnsupportedLayout

            raise UnsupportedLayout(f"{adapter.family} ({adapter.model_type}) cannot run routing policies: {why}.")
        k = adapter.top_k
        for name, v in (("k", o.k), ("k_max", o.k_max), ("k_min", o.k_min)):
            if v is not None and v > k:
                raise MoePruneError(f"{name}={v}: the model routes top-{k}; a policy keeps at most the experts the "
                                    "router selects (more would need a larger top-k the experts were not trained "
                                    "with).")
        if o.target_active is not None and o.target_active > k:
            raise MoePruneError(f"target_active {o.target_active:g} is more than the model's top-{k}.")
        return self._next(adapter, o.k if o.method == "topk" else None, None)

    def _next(self, adapter: MoEAdapter, k: int | None, plan: RoutingPlan | None) -> Any:
        from moeprune.models.keys import set_key

        cfg = config_copy(adapter)
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if k is not None:
            set_key(text, adapter.top_k_key, k)
        if plan is not None and plan.dynamic:
            setattr(cfg, BLOCK_KEY, plan.to_dict())
        return cfg

    # ------------------------------------------------------------------ plans
    def plan(self, o: RoutingOptions, ctx) -> RoutingPlan:
        adapter = ctx.adapter
        layers = adapter.moe_layers()
        base = dict(top_k=adapter.top_k, layers=layers, model_type=adapter.model_type)
        if o.method == "topk":
            return RoutingPlan("topk", k=o.k, **base)
        k_min, k_max = o.k_min or 1, o.k_max or adapter.top_k
        if o.method == "top_p" and o.p is not None:
            return RoutingPlan("top_p", thresholds=dict.fromkeys(layers, float(o.p)), k_min=k_min, k_max=k_max,
                               **base)
        if o.method == "otp":
            return self._plan_otp(o, ctx, base)
        weights = self._capture(o, ctx)
        from moeprune.routing.fit import fit_naee, fit_top_p
        from moeprune.routing.plan import mean_active

        scope = o.scope or "per_layer"  # measured better than global on the testbed (routing/fit.py)
        if o.method == "top_p":
            plan = RoutingPlan("top_p", thresholds=fit_top_p(weights, o.target_active, scope, k_min, k_max),
                               k_min=k_min, k_max=k_max, target_active=o.target_active, scope=scope, **base)
        else:
            thresholds, beta, lam = fit_naee(weights, o.target_active, scope)
            plan = RoutingPlan("naee_skip", thresholds=thresholds, beta=beta, scale=lam,
                               target_active=o.target_active, scope=scope if o.target_active is not None else None,
                               **base)
        plan.calibrated_active = mean_active(plan, weights)
        return plan

    def _plan_otp(self, o: RoutingOptions, ctx, base: dict) -> RoutingPlan:
        from moeprune.models import get_adapter
        from moeprune.routing.otp import SELECTOR_FILE, OTPConfig, selectors_sha256, train_otp

        if ctx.ckpt is None or ctx.calib is None or ctx.sets is None:
            raise MoePruneError("otp trains its selectors on calibration text: use `moeprune prune MODEL --calib "
                                "NAME=PATH` with the recipe.")
        model = ctx.model(dtype=ctx.calib.dtype)
        adapter = get_adapter(model.config, model=model)
        cfg = OTPConfig(float(o.target_active), **{k: v for k, v in (("steps", o.steps), ("lr", o.lr),
                                                                      ("calib_tokens", o.max_tokens)) if v is not None},
                        batch_size=ctx.calib.batch_size)
        result = train_otp(model, adapter, ctx.sets, cfg, ctx.calib.device)
        plan = RoutingPlan("otp", thresholds=dict.fromkeys(base["layers"], 0.0), target_active=o.target_active,
                           otp={"selector_file": SELECTOR_FILE, "selector_sha256": selectors_sha256(result.selectors),
                                "shift": result.shift, "cost": result.cost}, **base)
        plan.selectors = result.selectors
        plan.calibrated_active = result.calibrated_active
        return plan

    def _capture(self, o: RoutingOptions, ctx):
        from moeprune.models import get_adapter
        from moeprune.routing.fit import DEFAULT_MAX_TOKENS, capture_weights

        if ctx.ckpt is None or ctx.calib is None or ctx.sets is None:
            raise MoePruneError(f"{o.method}" + (" with target_active" if o.method == "top_p" else "") + " fits its "
                                "thresholds on calibration text: use `moeprune prune MODEL --calib NAME=PATH` with "
                                "the recipe.")
        view = ctx.layer_view(dtype=ctx.calib.dtype)  # with --lazy: one decoder layer in memory at a time
        adapter = get_adapter(view.model.config, model=view.model)
        return capture_weights(view.model, adapter, ctx.sets, ctx.calib.batch_size,
                               o.max_tokens or DEFAULT_MAX_TOKENS, ctx.calib.device,
                               layer_context=view.layer if view.lazy is not None else None)

    def load_plan(self, raw: dict, source: str) -> RoutingPlan:
        from pathlib import Path

        plan = RoutingPlan.from_dict(raw, source)
        if plan.method == "otp":  # selectors read; an export of this plan names its own side file
            from moeprune.routing.otp import SELECTOR_FILE

            plan.attach_selectors(Path(source).parent)
            plan.otp = {**plan.otp, "selector_file": SELECTOR_FILE}
        return plan

    def finish_export(self, folder, model_type: str, plan: RoutingPlan) -> None:
        if not plan.dynamic:
            return
        from moeprune.routing.marker import write_marker

        if plan.method == "otp":  # the selectors the config block names
            from moeprune.routing.otp import save_selectors

            save_selectors(plan.selectors, folder / plan.otp["selector_file"])
        write_marker(folder, plan)  # a plain from_pretrained then warns, naming the block

    def next_config(self, plan: RoutingPlan, adapter: MoEAdapter) -> Any:
        return self._next(adapter, plan.k if plan.method == "topk" else None, plan)

    # ------------------------------------------------------------------ surgery
    def apply_layer(self, model, adapter: MoEAdapter, plan: RoutingPlan, layer: int) -> None:
        if plan.method == "topk" and layer in plan.layers:
            block = adapter.block(model, layer)
            for module in (block, adapter.router(block)):
                for attr in ("top_k", "num_experts_per_tok"):
                    if getattr(module, attr, None) == plan.top_k:
                        setattr(module, attr, plan.k)

    def apply(self, model, adapter: MoEAdapter, plan: RoutingPlan) -> None:
        super().apply(model, adapter, plan)
        if plan.dynamic:  # the in-memory model routes as the export will once `load_model` reads the block
            from moeprune.routing.apply import apply_routing

            apply_routing(model, plan, adapter)

    def update_config(self, config: Any, adapter: MoEAdapter, plan: RoutingPlan) -> None:
        super().update_config(config, adapter, plan)
        if plan.dynamic:
            setattr(config, BLOCK_KEY, copy.deepcopy(plan.to_dict()))

    def reference(self, ref, plan: RoutingPlan) -> None:
        """The policy installed on the original's routers (a static topk too: the stock top-k' export must equal
        the per-token mask applied in memory)."""
        from moeprune.routing.apply import apply_routing

        apply_routing(ref.model, plan, ref.adapter)

    # ------------------------------------------------------------------ reports
    def provenance(self, plan: RoutingPlan) -> dict:
        return {"method": plan.method, "routing_sha256": plan.sha256(), "top_k_before": plan.top_k,
                **({"top_k_after": plan.k} if plan.method == "topk" else {})}

    def report(self, plan: RoutingPlan, before: MoEAdapter, after: MoEAdapter) -> dict:
        cal = plan.calibrated_active
        return {"stage": self.kind, "method": plan.method, "routing": plan.describe(),
                "top_k_before": plan.top_k, "top_k_after": plan.k if plan.method == "topk" else plan.top_k,
                "dynamic": plan.dynamic, "thresholds": {str(k): v for k, v in sorted(plan.thresholds.items())},
                "target_active": plan.target_active, "scope": plan.scope,
                "calibrated_active_per_layer": {str(k): v for k, v in sorted(cal.items())},
                "calibrated_active": sum(cal.values()) / len(cal) if cal else None,
                "loadable_by_stock_config": not plan.dynamic,
                "note": ("" if not plan.dynamic else f"per-token policy stored in config.json {BLOCK_KEY}: "
                         "moeprune.load_model applies it; stock from_pretrained routes the model's own top-k")}

    def describe(self, plan: RoutingPlan) -> str:
        return f"routing ({plan.describe()})"


def routing_problem(adapter: MoEAdapter) -> str | None:
    """Why the policy hook cannot read this family's routing off its router module (checked on the meta model;
    the hook itself refuses any other router output at the first call). Measured on every tiny family: these
    two are the families the hook cannot serve."""
    from moeprune.models.capabilities import meta_experts
    from moeprune.models.layouts import FlatLayout, layout_of
    from moeprune.stats.prescaled import is_prescaled

    experts = meta_experts(adapter)
    if experts is None:
        return None
    if is_prescaled(experts):
        return "its router returns dense scores and the block pre-scales the experts' input (Llama-4), not gate " \
               "weights and expert indices"
    if layout_of(experts) is FlatLayout:
        return "its top-k happens in the experts module (DBRX), not in the router"
    return None


ROUTING = register_stage(RoutingStage())
