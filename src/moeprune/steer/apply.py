"""A steering plan inside a model's routers (no checkpoint is written): `steering(model, plan)` for a block of code,
`apply_steering(model, plan)` for the model's lifetime (what `moeprune.load_model(..., steer=...)` and `--steer` do).

The mechanism is `models.masking.shift_routers`: "off" experts get -inf on every op `masked_experts` masks (they
are never routed), "on" experts get +strength on the router logits (the sigmoid scores for sigmoid_grouped). An
empty plan touches no router.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.models.masking import RouterShifts, shift_routers
from moeprune.steer.plan import SteerPlan, as_plan


def apply_steering(model: nn.Module, plan: SteerPlan | str | Path | dict, adapter=None) -> RouterShifts:
    """Steer `model` until the returned handle's `.remove()`; refuses a plan made for another model."""
    plan = as_plan(plan)
    adapter = adapter or get_adapter(model.config, model=model)
    plan.check_model(adapter, router_fingerprint(model, adapter) if plan.router_sha256 else None)
    handle = shift_routers(model, adapter, plan.by_layer())
    if plan.steer:
        logger.info("steering: %s", plan.describe())
    return handle


def router_fingerprint(model: nn.Module, adapter) -> str:
    """sha256 over every MoE layer's router tensors, as `calibration.session.collect` computes it for statistics."""
    h = hashlib.sha256()
    for layer in sorted(adapter.moe_layers()):
        for t in adapter.router_tensors(adapter.block(model, layer)).values():
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


@contextmanager
def steering(model: nn.Module, plan: SteerPlan | str | Path | dict, adapter=None) -> Iterator[RouterShifts]:
    handle = apply_steering(model, plan, adapter)
    try:
        yield handle
    finally:
        handle.remove()
