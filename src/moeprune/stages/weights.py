"""Stages that change weight values, not shapes: repair (closed-form least squares) and distillation (training).

    plan  = WeightsPlan (stages/weights_plan.py): new tensors per MoE layer, expert (current numbering) and role,
            and router tensors
    apply = copy each tensor into the model's own parameters (`adapter.expert_views`, `router_tensors`), layer by
            layer; shapes and config are unchanged. A plan of keep masks (wanda: `plan.masks`, packed bits)
            multiplies each expert matrix by its mask instead: W ← W ⊙ keep
    reference = the same values written into the ORIGINAL model's slots at their neuron positions (masks: the
            current expert read there, times its mask)
            (`Reference.write_expert`, `write_router_rows`): the reference of a recipe with a weights stage is the
            recipe's own result expressed on the original; the masked original (every stage's reference except the
            weights stages) is no longer what the export must equal, and `verify` reports the distance to it too.

Subclasses (`stages/repair.py`, `stages/distill.py`) implement `methods`, `options_type`, `plan` and `describe`.
Weight stages take no ratio: they remove nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter
from moeprune.sparsity.keep_bits import apply_keep, packed_shape, unpack
from moeprune.stages.base import Need, Stage, StageOptions, config_copy
from moeprune.stages.weights_plan import WeightsPlan
from moeprune.stages.weights_store import expert_index


@dataclass(frozen=True)
class WeightOptions(StageOptions):
    ratio: float = 0.0  # weight stages remove nothing; a given ratio is refused (`Stage.parse`)

    def given(self) -> dict[str, Any]:
        out = super().given()
        out.pop("ratio", None)
        return out


class WeightStage(Stage):
    """Base of the stages whose plan is a `WeightsPlan`; each sets `plan_format = weights_format(kind)`."""

    options_type = WeightOptions
    takes_ratio = False
    changes_weights = True

    def needs(self, options: StageOptions) -> set[Need]:
        return {Need.TEACHER}

    def check(self, options: StageOptions, adapter: MoEAdapter) -> Any:
        return config_copy(adapter)

    # ------------------------------------------------------------------ plans
    def load_plan(self, raw: dict, source: str) -> WeightsPlan:
        return WeightsPlan.from_dict(raw, source)

    def next_config(self, plan: WeightsPlan, adapter: MoEAdapter) -> Any:
        return config_copy(adapter)

    # ------------------------------------------------------------------ surgery
    @torch.no_grad()
    def apply_layer(self, model, adapter: MoEAdapter, plan: WeightsPlan, layer: int) -> None:
        if layer not in plan.layers:
            return
        block = adapter.block(model, layer)
        for i, roles in plan.experts.get(layer, {}).items():
            views = adapter.expert_views(block, i)
            for role, value in roles.items():
                want = None if role not in views else _plan_shape(plan, views[role].shape)
                if want != tuple(value.shape):
                    have = None if role not in views else tuple(views[role].shape)
                    raise MoePruneError(f"weights plan ({plan.method}): layer {layer} expert {i} {role} is "
                                        f"{tuple(value.shape)}{' (packed keep bits)' if plan.masks else ''}, the "
                                        f"model's is {have}.")
                target = views[role]
                if plan.masks:  # W ← W ⊙ keep
                    apply_keep(target, value, f"layer {layer} expert {i} {role}")
                else:
                    target.copy_(value.to(target.dtype))
        router = adapter.router_tensors(block)
        for name, value in plan.router.get(layer, {}).items():
            if name not in router or router[name].shape != value.shape:
                have = None if name not in router else tuple(router[name].shape)
                raise MoePruneError(f"weights plan ({plan.method}): layer {layer} router tensor {name!r} is "
                                    f"{tuple(value.shape)}, the model's is {have}.")
            router[name].copy_(value.to(router[name].dtype))

    def update_config(self, config: Any, adapter: MoEAdapter, plan) -> None:
        """Nothing: values change, not shapes."""

    def reference(self, ref, plan: WeightsPlan) -> None:
        for layer in ref.scope(plan.layers):
            for i, roles in plan.experts.get(layer, {}).items():
                if plan.masks:  # the current expert (read at its slot and positions) with the plan's zeros
                    now = ref.read_expert(layer, i)
                    roles = {role: now[role] * unpack(bits, now[role].shape[1]).to(now[role].device)
                             for role, bits in roles.items()}
                ref.write_expert(layer, i, roles)
            for name, rows in plan.router.get(layer, {}).items():
                ref.write_router_rows(layer, name, rows)

    # ------------------------------------------------------------------ reports
    def provenance(self, plan: WeightsPlan) -> dict:
        return {"method": plan.method, "settings": plan.settings, "weights_plan_sha256": plan.sha256()}

    def report(self, plan: WeightsPlan, before: MoEAdapter, after: MoEAdapter) -> dict:
        changed = sum(len(expert_index(plan.experts, layer)) for layer in plan.experts)
        return {
            "stage": self.kind, "method": plan.method, "settings": plan.settings, "summary": plan.summary,
            "weights_plan_sha256": plan.sha256(), "num_experts_before": before.num_experts,
            "num_experts_after": after.num_experts, "changed_experts": changed,
            "changed_router_layers": sorted(plan.router), "loadable_by_stock_config": True,
            "note": "weights changed in place (same shapes and config); verify compares the export with the "
                    "recipe's own result written into the original model, and reports the distance to the masked "
                    "original as well",
        }


def _plan_shape(plan: WeightsPlan, shape: torch.Size) -> tuple[int, ...]:
    """The shape a plan holds for a model tensor of `shape`: the same, or its packed keep bits."""
    return packed_shape(tuple(shape)) if plan.masks and len(shape) == 2 else tuple(shape)


def as_stored(experts: dict, router: dict, ckpt, adapter: MoEAdapter) -> tuple[dict, dict]:
    """The trained values rounded to the dtypes the checkpoint stores them in (`StoredDtypes`), every layer."""
    cast = StoredDtypes(ckpt, adapter)
    return ({layer: cast.experts(layer, ex) for layer, ex in experts.items()},
            {layer: cast.router(layer, names) for layer, names in router.items()})


class StoredDtypes:
    """The dtypes the checkpoint stores expert and router tensors in (bf16 weights of a bf16 checkpoint): the
    export holds new values in those dtypes, so the plan — and the verify reference built from it — must too.
    Expert weights / biases take the dtype of the layer's expert weight / bias tensors on disk; router tensors the
    dtype of their own key (float32 training keeps the master values only until here). Read once from the headers;
    `experts(layer, ...)` casts one layer (plans made layer by layer)."""

    def __init__(self, ckpt, adapter: MoEAdapter) -> None:
        from collections import Counter

        self._stored: dict[tuple[int, bool], Counter] = {}  # (layer, is bias) -> dtypes of the expert tensors
        self._routers: dict[tuple[int, str], Any] = {}
        for key, dtype in ckpt.torch_dtypes().items():
            role = adapter.classify_key(key)
            if role.kind in ("expert", "fused") and dtype.is_floating_point and dtype.itemsize > 1:
                self._stored.setdefault((role.layer, key.endswith("bias")), Counter())[dtype] += 1
            elif role.kind == "router":
                self._routers[(role.layer, key)] = dtype

    def expert(self, layer: int, role: str, t):
        """One expert tensor of `layer` in the dtype its role (weight or bias) is stored in there."""
        found = self._stored.get((layer, role.endswith("bias")))
        return _cast(t, found.most_common(1)[0][0] if found else None)

    def experts(self, layer: int, experts: dict) -> dict:
        """{expert: {role: tensor}} of one layer, each in its stored dtype."""
        return {i: {r: self.expert(layer, r, t) for r, t in roles.items()} for i, roles in experts.items()}

    def router(self, layer: int, names: dict) -> dict:
        def dtype(name: str):
            return next((d for (lay, key), d in self._routers.items() if lay == layer and key.endswith("." + name)),
                        None)

        return {n: _cast(t, dtype(n)) for n, t in names.items()}


def _cast(t, dtype):
    return t if dtype is None else t.to(dtype)
