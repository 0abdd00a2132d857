"""`method: stun` in a recipe's expert stage: STUN's clusters and representatives as a `PrunePlan`
(`select/stun.py` for the rule). Statistics: the one calibration pass of the context; weights: the model as the
recipe's earlier stages left it, whole in memory, or one decoder layer at a time with --lazy."""

from __future__ import annotations

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
    if ctx.lazy:
        lazy, layer_context = ctx.lazy_model()
        model = lazy.model
    else:
        model, layer_context = ctx.model(), None
    model_adapter = get_adapter(model.config, model=model)
    for n, layer in enumerate(bar := tqdm(layers, leave=False)):
        bar.set_description(f"STUN clusters (layer {n + 1}/{len(layers)})")
        if layer_context is not None:
            with layer_context(layer):
                kept[layer], clusters[layer] = _layer(model, model_adapter, combined[layer], layer, o.ratio, routing,
                                                      E, mix, keep)
        else:
            kept[layer], clusters[layer] = _layer(model, model_adapter, combined[layer], layer, o.ratio, routing, E,
                                                  mix, keep)
    del model
    merged = sum(1 for cs in clusters.values() for c in cs if len(c) > 1)
    logger.info("stun: %d clusters of more than one expert over %d layers (mix %.2f)", merged, len(layers), mix)
    plan = PrunePlan(kept, E, method=STUN, ratio=o.ratio, model_type=adapter.model_type, clusters=clusters,
                     note=f"STUN: complete-linkage clusters on co-selection and router distance (mix {mix:g}), "
                          f"each cluster's {KEPT[keep]} kept (clusters: kept expert first)")
    plan.validate(adapter)
    return plan


def _layer(model, adapter, stats, layer, ratio, routing, E, mix, keep):
    block = adapter.block(model, layer)
    return stun_layer(stats, lambda j: adapter.expert_views(block, j), ratio, routing, E, mix, keep)
