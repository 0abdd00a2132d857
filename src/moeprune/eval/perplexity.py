"""Per-domain perplexity and next-token accuracy of a causal LM on held-out token windows.

For a window x_1..x_L with attention mask m (1 = real token), position t predicts x_{t+1} and counts when both
are real (m_t = m_{t+1} = 1):

    NLL = Σ_t −log softmax(logits_t)[x_{t+1}]      (float64 sum over counted positions of every window)
    perplexity = exp(NLL / N),   accuracy = #{argmax logits_t = x_{t+1}} / N,   N = counted positions.

Windows come from `calibration.data.build_set` without sampling (every window of the text in order, up to
`max_sequences`, the tail right-padded), batched, one forward per batch under no_grad; padding never counts. The
head's logits are taken a chunk of positions at a time (`eval/token_scores.py`), so a 150 k vocabulary's
[B, L, V] logits are never whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.calibration.data import CalibSet
from moeprune.eval import token_scores


@dataclass
class DomainScore:
    perplexity: float
    accuracy: float
    tokens: int  # counted (predicted) positions
    nll_sum: float

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "accuracy": self.accuracy, "tokens": self.tokens}


@torch.no_grad()
def score_batch(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                adapter=None) -> tuple[float, int, int]:
    """(NLL sum, correct predictions, counted positions) of one batch [B, L]; with the model's `adapter` the head
    runs a chunk of positions at a time (`eval/token_scores.py:score_model`), without it on the whole batch."""
    device = next(model.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    return token_scores.score_model(model, adapter, {"input_ids": ids, "attention_mask": mask}).totals()


def evaluate_sets(model: nn.Module, sets: list[CalibSet], batch_size: int = 8) -> dict[str, DomainScore]:
    """{set name: DomainScore} over every window of every set."""
    adapter = _adapter_or_none(model)
    out = {}
    for s in sets:
        starts = range(0, s.input_ids.shape[0], batch_size)
        out[s.name] = domain_score([score_batch(model, s.input_ids[start : start + batch_size],
                                                s.attention_mask[start : start + batch_size], adapter)
                                    for start in tqdm(starts, desc=f"evaluating {s.name}", leave=False)])
    return out


def _adapter_or_none(model: nn.Module):
    """The model's MoE adapter, or None for a model moeprune has none for (scored on its whole logits)."""
    from moeprune.errors import MoePruneError
    from moeprune.models import get_adapter

    try:
        return get_adapter(model.config, model=model)
    except MoePruneError:
        return None


def domain_score(batches: list[tuple[float, int, int]]) -> DomainScore:
    """Sum the (NLL, correct, counted) of a set's batches into its score."""
    nll, correct, n = (sum(b[k] for b in batches) for k in range(3))
    return DomainScore(math.exp(nll / n) if n else float("nan"), correct / n if n else float("nan"), n, nll)
