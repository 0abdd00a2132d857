"""Next-layer expert predictors for ExpertFlow-style prefetching (METHODS.md "ExpertFlow").

A predictor sees token t's routing at MoE layer ℓ−1 (its top-k set S = S_{ℓ−1}(t)) while layer ℓ−1 runs and
guesses the p experts layer ℓ will request, so they are loaded before layer ℓ runs.

`transition` (trained on calibration traces, one table per consecutive layer pair):

    N[S, e']    = tokens whose layer-(ℓ−1) set is S and whose layer-ℓ set holds e'       (the set-level table)
    n[S]        = tokens whose layer-(ℓ−1) set is S
    P1(e' | e)  = tokens with e ∈ S_{ℓ−1} and e' ∈ S_ℓ / tokens with e ∈ S_{ℓ−1}      (per-expert backoff)
    score(e'|S) = (N[S, e'] + α · mean_{e ∈ S} P1(e' | e)) / (n[S] + α),   α = 1

and the guess is the p highest scores (ties: lowest index). Sets never seen in training fall back to the per-expert
transitions. It reads routing only: no hidden state is captured, so the predictor costs one table lookup per token
and layer (a hidden-state probe would need the block inputs of every layer kept from the pass).

`oracle` is given the true S_ℓ(t) (perfect information, padded with −1 to p): the upper bound of any predictor.

Accuracy on a test stream, over tokens t and predicted layers ℓ (the first MoE layer has no predecessor):

    recall    = |P_t ∩ S_ℓ(t)| / k     (share of the true top-k that was prefetched)
    precision = |P_t ∩ S_ℓ(t)| / p     (share of the prefetched experts that were needed)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moeprune.errors import MoePruneError

ALPHA = 1.0


@dataclass
class TransitionPredictor:
    """Transition tables per predicted layer ℓ (keyed by ℓ; its source is the MoE layer before it)."""

    num_experts: int
    sets: dict[int, dict[tuple[int, ...], torch.Tensor]] = field(default_factory=dict)  # ℓ -> S -> N[S] [E]
    counts: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)  # ℓ -> S -> n[S]
    single: dict[int, torch.Tensor] = field(default_factory=dict)  # ℓ -> P1 [E, E]

    @classmethod
    def train(cls, traces: dict[int, Sequence[torch.Tensor]], layers: Sequence[int],
              num_experts: int) -> TransitionPredictor:
        """traces: MoE layer -> [T_i, k] per sequence (the same sequences in every layer)."""
        pred = cls(num_experts)
        for prev, layer in zip(layers, layers[1:], strict=False):
            src, dst = torch.cat(list(traces[prev])), torch.cat(list(traces[layer]))  # [T, k] each
            if src.shape[0] != dst.shape[0]:
                raise MoePruneError(f"traces of layers {prev} and {layer} hold {src.shape[0]} and {dst.shape[0]} "
                                    "tokens; pass the same sequences for every layer.")
            if src.shape[0] == 0:
                raise MoePruneError("no training tokens for the predictor; give calibration text.")
            hot_src, hot_dst = _onehot(src, num_experts), _onehot(dst, num_experts)  # [T, E]
            pair = hot_src.T @ hot_dst  # [E, E] co-occurrence across the two layers
            pred.single[layer] = pair / hot_src.sum(0).clamp(min=1)[:, None]  # P1(e'|e) [E, E]
            keys, inverse = torch.unique(src.sort(dim=1).values, dim=0, return_inverse=True)  # [U, k], [T]
            table = torch.zeros(keys.shape[0], num_experts).index_add_(0, inverse, hot_dst)  # [U, E]
            n = torch.bincount(inverse, minlength=keys.shape[0])  # [U]
            pred.sets[layer] = {tuple(key): table[u] for u, key in enumerate(keys.tolist())}
            pred.counts[layer] = {tuple(key): int(n[u]) for u, key in enumerate(keys.tolist())}
        return pred

    def scores(self, layer: int, src: torch.Tensor) -> torch.Tensor:
        """src [T, k] (layer ℓ−1's routing) -> score(e' | S) [T, E] for layer ℓ."""
        if layer not in self.single:
            raise MoePruneError(f"no predictor for layer {layer} (trained for {sorted(self.single)}).")
        keys, inverse = torch.unique(src.sort(dim=1).values, dim=0, return_inverse=True)  # [U, k], [T]
        back = self.single[layer][keys].mean(1)  # [U, E]
        rows = []
        for u, key in enumerate(keys.tolist()):
            n = self.counts[layer].get(tuple(key), 0)
            seen = self.sets[layer].get(tuple(key))
            rows.append(((seen if seen is not None else 0) + ALPHA * back[u]) / (n + ALPHA))
        return torch.stack(rows)[inverse]  # [T, E]

    def predict(self, layer: int, src: torch.Tensor, p: int) -> torch.Tensor:
        """[T, k] -> the p best guesses [T, p] (ties: lowest index)."""
        s = self.scores(layer, src).double()  # float64: the tie-break below stays above rounding
        idx = torch.arange(self.num_experts, dtype=s.dtype)  # tie-break towards the lowest index
        return (s - idx * 1e-9).topk(p, dim=1).indices


def oracle(dst: torch.Tensor, p: int) -> torch.Tensor:
    """The true next-layer sets [T, k] as guesses [T, p] (−1 pads when p > k; the first p when p < k)."""
    if p <= dst.shape[1]:
        return dst[:, :p].clone()
    return torch.cat([dst, dst.new_full((dst.shape[0], p - dst.shape[1]), -1)], dim=1)


def accuracy(guess: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """recall = |P ∩ S| / k and precision = |P ∩ S| / p, means over tokens; guess [T, p], true [T, k]."""
    hit = (guess[:, :, None] == true[:, None, :]).any(2).sum(1).double()  # [T] |P ∩ S|
    valid = (guess >= 0).sum(1).clamp(min=1).double()  # [T] p without pads
    return {"recall": float((hit / true.shape[1]).mean()), "precision": float((hit / valid).mean())}


def _onehot(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(idx.shape[0], num_experts).scatter_(1, idx.long(), 1.0)  # [T, E]
