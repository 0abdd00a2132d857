"""Router look-ahead guesses for prefetching (pre-gating, as in ExpertFlow / Pre-gated MoE): layer ℓ's own routing
applied to the hidden state that enters layer ℓ−1's MoE block,

    guess_ℓ(t) = top-k of layer ℓ's router on x_{ℓ−1}(t)        (x: the MoE block input, [H])

— available while layer ℓ−1 runs, needs no training, and is exact when the residual stream changes little between
the two blocks. Captured in the calibration session's own pass (`calibration.session.collect`, a `decide` hook that
returns no drops): at MoE layer ℓ−1 it keeps the block inputs of every batch (`BlockIO`), at MoE layer ℓ it runs
layer ℓ's block on them with a `RoutedCollector` recording the routing the block's own router chooses, so every
family's routing rule (softmax / sigmoid, correction bias, groups) applies unchanged. Cost: one extra MoE-block
forward per layer over the pass's tokens; memory: one layer's block inputs on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moeprune.calibration.session import BlockIO, Decide
from moeprune.models.base import MoEAdapter
from moeprune.stats.routed import RoutedCollector, RoutedStats


@dataclass
class Lookahead:
    """A `decide` hook; `traces[set][ℓ]` = one LongTensor [T_i, k] of guesses per sequence, in the traces' order."""

    device: str = "cpu"
    traces: dict[str, dict[int, list[torch.Tensor]]] = field(default_factory=dict)
    _prev: tuple[list[torch.Tensor], list[torch.Tensor], list[str]] | None = None  # inputs, masks, tags of ℓ−1

    def __call__(self, model: nn.Module, adapter: MoEAdapter, layer: int, stats: dict[str, RoutedStats],
                 io: BlockIO) -> list[int]:
        now = (list(io.inputs), list(io.valid), list(io.tags))  # io is cleared after this layer
        if self._prev is not None:
            self._guess(model, adapter, layer, *self._prev)
        self._prev = now
        return []

    @torch.no_grad()
    def _guess(self, model: nn.Module, adapter: MoEAdapter, layer: int, inputs: list[torch.Tensor],
               valid: list[torch.Tensor], tags: list[str]) -> None:
        block = adapter.block(model, layer)
        home = next(block.parameters()).device
        block.to(self.device)
        hidden = int(adapter.expert_roles(block)["down"].shape[1])
        col = RoutedCollector(adapter.experts(block), RoutedStats(adapter.num_experts, hidden=hidden).to(self.device),
                              adapter.router(block), adapter.routing().kind, block=block, top_k=adapter.top_k,
                              logits_at=adapter.router_logits_at, extra_classes=adapter.extra_classes)
        try:
            with col:
                for x, mask, tag in zip(inputs, valid, tags, strict=True):
                    col.trace = self.traces.setdefault(tag, {}).setdefault(layer, [])
                    col.rows, col.valid = mask, mask.reshape(-1).to(self.device)  # [B, S], [B·S]
                    block(x.to(self.device))  # [B, S, H]: the experts' call records the routing
        finally:
            block.to(home)


def both(first: Decide, second: Decide) -> Callable[..., list[int]]:
    """One `decide` hook running two measuring hooks (each must return no drops)."""

    def decide(*args) -> list[int]:
        drops = first(*args) + second(*args)
        assert not drops, "measuring hooks drop no experts"
        return drops

    return decide
