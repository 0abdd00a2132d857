"""Install a `RoutingPlan` on a loaded model, read one from a file or an export, and report what it saved.

    apply_routing(model, plan)      hooks every MoE router (`models/dynamic.py`); replaces an earlier policy
    remove_routing(model)           back to the model's own routing
    read_routing(source)            a plan JSON, an export folder / its config.json (`moeprune_routing` block,
                                    or its moeprune_plans/N-routing.json)
    apply_config_routing(model)     what `moeprune.load_model` does with an export's `moeprune_routing` block
    routing_report(model)           active experts per token (average and per layer) and routed-expert FLOPs

FLOPs in routed experts, per token: Σ_ℓ active_ℓ · 2·m·H·I, with m = 3 matrices for GLU experts (gate, up, down)
and 2 for up-only experts, H the hidden size and I the expert width (biases and the router not counted).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.models.dynamic import Installed, install_policy
from moeprune.routing.plan import BLOCK_KEY, ROUTING_FORMAT, RoutingPlan

_ATTR = "_moeprune_routing"


def _adapter(model: nn.Module):
    from moeprune.models import get_adapter

    return get_adapter(model.config, model=model)


def apply_routing(model: nn.Module, plan: RoutingPlan, adapter=None) -> Installed:
    adapter = adapter or _adapter(model)
    plan.validate(adapter)
    remove_routing(model)
    inst = install_policy(model, adapter, plan.decide(), layers=list(plan.layers))
    inst.plan = plan
    object.__setattr__(model, _ATTR, inst)  # a plain attribute (not a module / parameter)
    return inst


def remove_routing(model: nn.Module) -> None:
    inst = getattr(model, _ATTR, None)
    if inst is not None:
        inst.remove()
        object.__delattr__(model, _ATTR)


def installed(model: nn.Module) -> Installed | None:
    return getattr(model, _ATTR, None)


def config_block(config) -> dict | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in (config, text):
        block = getattr(cfg, BLOCK_KEY, None)
        if block:
            return block
    return None


def apply_config_routing(model: nn.Module) -> Installed | None:
    """Apply the `moeprune_routing` block of the model's config, if it has one (`moeprune.load_model`)."""
    block = config_block(model.config)
    if block is None:
        return None
    plan = RoutingPlan.from_dict(block, f"config.json {BLOCK_KEY}")
    if plan.method == "otp":  # its selectors: a side file in the folder the model was loaded from
        plan.attach_selectors(getattr(model, "name_or_path", "") or model.config._name_or_path)
    logger.info("applying the routing policy of config.json %s: %s", BLOCK_KEY, plan.describe())
    return apply_routing(model, plan)


def read_routing(source: str | Path) -> RoutingPlan:
    """A routing plan from a plan JSON file, an export folder or its config.json."""
    path = Path(source).expanduser()
    if path.is_dir():
        plans = sorted(path.glob("moeprune_plans/*-routing.json"))
        if (path / "config.json").is_file():
            block = json.loads((path / "config.json").read_text()).get(BLOCK_KEY)
            if block:
                return RoutingPlan.from_dict(block, f"{path / 'config.json'} {BLOCK_KEY}").attach_selectors(path)
        if plans:
            return read_routing(plans[-1])
        raise MoePruneError(f"--routing {source}: the folder holds no routing policy (no {BLOCK_KEY} block in its "
                            "config.json, no moeprune_plans/*-routing.json).")
    if not path.is_file():
        raise MoePruneError(f"--routing {source}: no such file or folder.")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise MoePruneError(f"--routing {source} is not valid JSON ({e}).") from None
    if isinstance(raw, dict) and raw.get("format") != ROUTING_FORMAT and isinstance(raw.get(BLOCK_KEY), dict):
        raw = raw[BLOCK_KEY]  # a config.json
    return RoutingPlan.from_dict(raw, f"--routing {source}").attach_selectors(path.parent)


def routing_report(model: nn.Module, adapter=None) -> dict:
    """What the installed policy did on every forward since it was installed (or `reset_counters`)."""
    inst = installed(model)
    if inst is None:
        raise MoePruneError("no routing policy is installed on this model.")
    adapter = adapter or _adapter(model)
    H, inter = int(adapter.config.hidden_size), adapter.expert_width
    per_expert = 2 * (3 if adapter.gated_experts else 2) * H * (inter or 0)
    layers = {}
    for layer, c in sorted(inst.counters.items()):
        if c.tokens:
            layers[str(layer)] = {"active": c.active / c.tokens, "selected": c.selected / c.tokens,
                                  "computed": (c.active + (c.selected - c.active - c.skipped)) / c.tokens}
    n = len(layers)
    active = sum(v["active"] for v in layers.values())
    selected = sum(v["selected"] for v in layers.values())
    return {"policy": inst.plan.describe(), "method": inst.plan.method,
            "active_per_token": active / n if n else None, "selected_per_token": selected / n if n else None,
            "routed_flops_per_token": active * per_expert, "routed_flops_per_token_before": selected * per_expert,
            "flops_ratio": active / selected if selected else None,
            # experts per token the experts module really ran (dropped slots it was not told to skip included)
            "computed_per_token": sum(v["computed"] for v in layers.values()) / n if n else None,
            "layers": layers}


def reset_counters(model: nn.Module) -> None:
    from moeprune.models.dynamic import LayerCounter

    inst = installed(model)
    if inst is not None:
        for layer in inst.counters:
            inst.counters[layer].__dict__.update(vars(LayerCounter()))
