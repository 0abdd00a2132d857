"""Every temporary forward patch leaves a forward someone else set on the instance in place.

accelerate's hooks (a model dispatched with offloading) set `module.forward` on the instance. The statistics
collectors, the router masks and shifts and the silenced experts replace the experts' or the router's forward
for a while (`models/forward_patch.forward_replaced`); afterwards the instance forward must be the same object,
called again by the model, and the logits those of before. Before, each of these sites deleted the attribute,
so the class's forward showed and the wrapper was lost. The references are the wrapper object itself and the
logits computed before any patch.
"""

from __future__ import annotations

import pytest
import torch

from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts, masked_rows, steered_experts
from moeprune.models.silenced import experts_silenced
from moeprune.stats.neurons import NeuronCollector
from moeprune.stats.routed import RoutedCollector, RoutedStats
from moeprune.tiny import tiny_model


def _counting(module) -> tuple[object, list]:
    """Set a counting wrapper of `module`'s forward on the instance (as accelerate does); returns it and its
    call list."""
    own, calls = module.forward, []

    def hooked(*args, **kwargs):
        calls.append(1)
        return own(*args, **kwargs)

    module.forward = hooked
    return hooked, calls


def _routed(model, adapter, layer):
    block = adapter.block(model, layer)
    return RoutedCollector(adapter.experts(block), RoutedStats(adapter.num_experts), adapter.router(block),
                           adapter.routing().kind, block=block, top_k=adapter.top_k,
                           logits_at=adapter.router_logits_at, extra_classes=adapter.extra_classes)


# (name, which module gets the wrapper, the patch as a context, whether the patch calls the forward before it)
PATCHES = [
    ("routed statistics", "experts", lambda m, a, layer: _routed(m, a, layer), False),
    ("neuron statistics", "experts", lambda m, a, layer: NeuronCollector(m, a, layers=[layer]), False),
    ("silenced experts", "experts", lambda m, a, layer: experts_silenced(a.experts(a.block(m, layer))), False),
    ("masked experts", "router", lambda m, a, layer: masked_experts(m, a, {layer: [1]}), True),
    ("masked rows", "router", lambda m, a, layer: masked_rows(m, a, layer, [(1,)]), True),
    ("steered routers", "router", lambda m, a, layer: steered_experts(m, a, {layer: ([1], {2: 1.0})}), True),
]


@pytest.mark.parametrize("name,where,patch,calls_before", PATCHES, ids=[p[0] for p in PATCHES])
def test_an_instance_forward_survives_the_patch(name, where, patch, calls_before):
    model = tiny_model("qwen3_moe", seed=2).eval()
    adapter = get_adapter(model.config, model=model)
    layer = adapter.moe_layers()[0]
    block = adapter.block(model, layer)
    module = adapter.experts(block) if where == "experts" else adapter.router(block)
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    hooked, calls = _counting(module)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        assert len(calls) == 1
        with patch(model, adapter, layer):
            assert module.forward is not hooked  # patched meanwhile
            model(input_ids=ids, use_cache=False)
        assert len(calls) == (2 if calls_before else 1)  # a mask or shift wraps the forward it found
        assert module.__dict__.get("forward") is hooked, name
        got = model(input_ids=ids, use_cache=False).logits
    assert len(calls) == (3 if calls_before else 2) and torch.equal(got, want)


def test_patches_on_two_layers_restore_their_own_forwards():
    """masked_experts over two layers, one router with an instance forward and one without: afterwards the first
    has its wrapper and the second its class's forward again (no instance attribute)."""
    model = tiny_model("qwen3_moe", seed=2).eval()
    adapter = get_adapter(model.config, model=model)
    first, second = adapter.moe_layers()[:2]
    routers = [adapter.router(adapter.block(model, n)) for n in (first, second)]
    hooked, _ = _counting(routers[0])
    with torch.no_grad(), masked_experts(model, adapter, {first: [0], second: [1]}):
        model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False)
    assert routers[0].__dict__.get("forward") is hooked and "forward" not in routers[1].__dict__
