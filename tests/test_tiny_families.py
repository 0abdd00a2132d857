"""Every MoE family of the installed transformers builds a tiny random model from its own config class
(`moeprune.tiny_families`): it runs, has >= 2 MoE layers of 8 experts, keeps a dense / hybrid layer where the
family has them, and its selection biases are non-zero."""

from __future__ import annotations

import time

import pytest
import torch

from moeprune.compat import CONFIG_MAPPING_NAMES
from moeprune.io.stock import runnable
from moeprune.tiny import FAMILY_CONFIGS
from moeprune.tiny_families import MIXED_LAYERS, NOT_BUILDABLE, moe_blocks, moe_model_types, tiny_family_model

FAMILIES = [t for t in moe_model_types() if t not in NOT_BUILDABLE]


def _decoder_layer(model: torch.nn.Module, block: str) -> tuple[str, int]:
    """(layer list, index) of the decoder layer holding MoE block `block` (the block may be the layer itself)."""
    parts = block.split(".")
    for i in range(len(parts), 0, -1):
        parent = ".".join(parts[: i - 1])
        if parts[i - 1].isdigit() and isinstance(model.get_submodule(parent), torch.nn.ModuleList):
            return parent, int(parts[i - 1])
    raise AssertionError(f"{block} is not inside a layer list")


def test_enumeration_covers_the_supported_families():
    found = moe_model_types()
    assert set(FAMILY_CONFIGS) <= set(found), sorted(set(FAMILY_CONFIGS) - set(found))
    assert len(found) >= 45, len(found)
    assert found == sorted(found) and moe_model_types() == found  # cached, stable
    installed = MIXED_LAYERS & set(CONFIG_MAPPING_NAMES)  # entries for a newer transformers (Ergo: 5.25) may wait
    assert set(NOT_BUILDABLE) <= set(found) and installed <= set(found), sorted(installed - set(found))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_tiny_family_builds_and_runs(model_type):
    start = time.perf_counter()
    model = tiny_family_model(model_type, seed=0)
    blocks = moe_blocks(model)
    assert all(n == 8 for *_, n in blocks), [(name, n) for name, _, _, n in blocks]

    layers = {_decoder_layer(model, name) for name, *_ in blocks}
    stacks = {lst: len(model.get_submodule(lst)) for lst, _ in layers}  # diffusion_gemma has two decoders
    moe = {lst: sum(1 for s, _ in layers if s == lst) for lst in stacks}
    assert all(n >= 2 for n in moe.values()), f"{model_type}: MoE layers {sorted(layers)}"
    assert all(depth <= 6 for depth in stacks.values()), stacks
    has_dense = any(stacks[lst] > moe[lst] for lst in stacks)
    assert has_dense == (model_type in MIXED_LAYERS), f"{model_type}: {moe} MoE layers of {stacks}"

    for name, _, experts, n in blocks:  # correction / selection biases are non-zero
        inside = {id(t) for t in [*experts.parameters(), *experts.buffers()]}
        block = model.get_submodule(name)
        for t in [*block.parameters(), *block.buffers()]:
            if id(t) not in inside and t.is_floating_point() and t.shape[-1:] == (n,) and t.dim() <= 2 \
                    and t.numel() == n:
                assert t.abs().sum() > 0, f"{name}: a zero [E] tensor"

    model = runnable(model)  # a wrapper without a forward (Qwen3-Omni-MoE) runs through its thinker
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, min(vocab, 96), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[0] == 2 and logits.shape[-1] >= min(vocab, 96)  # diffusion_gemma: a canvas, not 16
    assert torch.isfinite(logits).all() and logits.std() > 0
    assert time.perf_counter() - start < 30  # generous: the budget is < 3 s a family, reported by --durations
