"""g = ∂L/∂h_L, the gradient of the summed next-token NLL at the last decoder layer's output, a chunk of positions
at a time, through the model's own final norm, head and logit post-processing (`calibration.engine.head_logits`).

    L = Σ_{b, t: m_{b,t} = m_{b,t+1} = 1} −log softmax(logits_{b,t})[x_{b,t+1}]      (`stats.neurons.summed_nll`)

The model's own code matters: Cohere2-MoE multiplies the logits by `logit_scale`, Granite-MoE divides them by
`logits_scaling`, Gemma 4 soft-caps them; `lm_head(norm(h))` alone gives another loss and other gradients.

Chunks: L = Σ_c L_c over chunks c of predicting positions, L_c computed from the logits of c's positions only
(`logits_to_keep`), so ∂L/∂h = Σ_c ∂L_c/∂h, accumulated in h.grad. The chunk width comes from
`eval.token_scores.chunk_positions`: one chunk's logits, their float32 log-softmax and its gradient stay within
`SCORE_BYTES` whatever the vocabulary (whole, 8 × 512 tokens at V = 151 936 are 2.5 GB of float32 logits, and the
cross-entropy's temporaries and gradients several times that). A model class without `logits_to_keep` is one chunk.
No parameter receives a gradient (`frozen`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from moeprune.calibration.engine import head_logits, takes_logits_to_keep
from moeprune.eval.token_scores import SCORE_BYTES, chunk_positions, head_rows
from moeprune.models.base import MoEAdapter


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside (activations still do): no .grad is ever allocated for weights."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def nll_gradient(model: nn.Module, adapter: MoEAdapter, inputs: dict[str, torch.Tensor], hidden: torch.Tensor,
                 max_bytes: int = SCORE_BYTES) -> torch.Tensor:
    """∂L/∂h_L [B, S, H] (module docstring) for the last decoder layer's output `hidden` [B, S, H] on `inputs`
    (input_ids, attention_mask [B, S], on the model's device), in `hidden`'s dtype."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    B, S = ids.shape
    h = hidden.detach().requires_grad_(True)  # [B, S, H]
    by_chunk = takes_logits_to_keep(model)
    c = chunk_positions(B, head_rows(model), max_bytes) if by_chunk else S
    with frozen(model), torch.enable_grad():
        for start in range(0, S - 1, c):
            stop = min(start + c, S - 1)  # positions start..stop-1 predict ids[:, start+1 : stop+1]
            keep = torch.arange(start, stop, device=h.device) if by_chunk else None  # [c]
            logits = head_logits(model, adapter, inputs, h, logits_to_keep=keep)  # [B, c, V] (or [B, S, V])
            logits = logits if by_chunk else logits[:, start:stop]
            counted = (mask[:, start:stop] * mask[:, start + 1 : stop + 1]).bool()  # [B, c]
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, start + 1 : stop + 1], reduction="none")  # [B, c]
            nll[counted].sum().backward()
    return h.grad if h.grad is not None else torch.zeros_like(h)
