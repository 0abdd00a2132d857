"""`method: stun` in a recipe's expert stage: STUN's clusters and representatives as a `PrunePlan`
(`select/stun.py` for the rule). Statistics: the one calibration pass of the context; weights (`keep: centroid`
only): the model as the recipe's earlier stages left it, whole in memory, or one decoder layer at a time with
--lazy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.select.plan import PrunePlan
from moeprune.select.stun import STUN, check_keep, check_mix, require_stats, stun_layer

KEPT = {"centroid": "member nearest its weight centroid", "usage": "most used member"}


def plan_stun(o, ctx) -> PrunePlan:
    stats = ctx.routed_stats()
    combined = stats.combined(list(o.calib_set) if o.calib_set else None)
    mix, keep = check_mix(o.mix), check_keep(o.keep)
    adapter = ctx.adapter
    E, routing = adapter.num_experts, adapter.routing()
    layers = adapter.moe_layers()
    for layer in layers:
        require_stats(combined[layer], layer)
    kept, clusters = {}, {}
    with _expert_weights(ctx, keep) as weights:  # only the centroid rule reads weights
        for n, layer in enumerate(bar := tqdm(layers, leave=False)):
            bar.set_description(f"STUN clusters (layer {n + 1}/{len(layers)})")
            with weights(layer) as tensors:
                kept[layer], clusters[layer] = stun_layer(combined[layer], tensors, o.ratio, routing, E, mix, keep)
    merged = sum(1 for cs in clusters.values() for c in cs if len(c) > 1)
    logger.info("stun: %d clusters of more than one expert over %d layers (mix %.2f)", merged, len(layers), mix)
    plan = PrunePlan(kept, E, method=STUN, ratio=o.ratio, model_type=adapter.model_type, clusters=clusters,
                     note=f"STUN: complete-linkage clusters on co-selection and router distance (mix {mix:g}), "
                          f"each cluster's {KEPT[keep]} kept (clusters: kept expert first)")
    plan.validate(adapter)
    return plan


@contextmanager
def _expert_weights(ctx, keep: str) -> Iterator:
    """`weights(layer)` -> a context giving j -> expert j's tensors by role: the model as the earlier stages left it,
    whole, or one decoder layer at a time with --lazy. `keep: usage` reads none."""
    if keep != "centroid":
        @contextmanager
        def none(layer):
            yield None

        yield none
        return
    view = ctx.layer_view()  # whole in memory, or one decoder layer at a time with --lazy
    adapter = get_adapter(view.model.config, model=view.model)

    @contextmanager
    def weights(layer):
        with view.layer(layer):
            block = adapter.block(view.model, layer)
            yield lambda j: adapter.expert_views(block, j)

    yield weights
