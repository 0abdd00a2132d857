"""How a layer's groups become merged experts: a registry from `MergePlan.merge` to a layer-level function.

    LayerMerge(experts, groups, weights, layer=None) -> merged experts, one per group (group order)

experts: every expert of the layer in canonical roles (gate/up [I, H], down [H, I], biases), by original index;
layer: the decoder layer (the dern merge reads that layer's recorded threshold, `MergePlan.threshold_of`).
- average: `merge_average` per group (members aligned to the most used one by weight matching, then W = Σ f W / Σ f);
- svd: `merge_svd` per group (Sub-MoE joint SVD, `plan.rank` shared directions; full rank == average);
- dern: `merge_dern` over the whole layer (neuron segments of the dropped experts go to any survivor,
  `plan.threshold_of(layer)`).
A group of one is returned as is (a copy) by every per-group merge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch

from moeprune.merge.average import merge_average
from moeprune.merge.dern import merge_dern
from moeprune.merge.svd import merge_svd
from moeprune.registry import Registry

Expert = Mapping[str, torch.Tensor]
GroupMerge = Callable[[list[Expert], Sequence[float]], dict[str, torch.Tensor]]
# (experts, groups, weights, layer=None) -> one merged expert per group; a group whose merged expert is its survivor
# unchanged gets the survivor's own dict back (the same object, `unchanged`), so callers need not write it again
LayerMerge = Callable[..., list[dict[str, torch.Tensor]]]


def unchanged(merged: Expert, experts: Sequence[Expert], group: list[int]) -> bool:
    """Whether a layer merge handed back `group`'s survivor as it is (`LayerMerge`)."""
    return merged is experts[group[0]]


def per_group(fn: GroupMerge) -> LayerMerge:
    """Lift a one-group merge to a layer: group g -> fn(its members, their weights); a group of one is its member,
    unchanged (the same dict)."""

    def layer(experts: Sequence[Expert], groups: list[list[int]], weights: list[list[float]], layer: int | None = None):
        return [experts[g[0]] if len(g) == 1 else fn([experts[j] for j in g], w)
                for g, w in zip(groups, weights, strict=True)]

    return layer


# name -> (MergePlan -> layer merge); plan.py checks merge names against this registry
MERGES: Registry[Callable[..., LayerMerge]] = Registry("merge")
MERGES.register("average", lambda plan: per_group(merge_average))
MERGES.register("svd", lambda plan: per_group(partial(merge_svd, rank=plan.rank)))


def dern_layers(plan) -> LayerMerge:
    """The dern merge of `plan`: each layer with its recorded threshold."""

    def layer_merge(experts: Sequence[Expert], groups: list[list[int]], weights: list[list[float]],
                    layer: int | None = None):
        return merge_dern(experts, groups, weights, plan.threshold_of(layer), layer=layer)

    return layer_merge


MERGES.register("dern", dern_layers)
