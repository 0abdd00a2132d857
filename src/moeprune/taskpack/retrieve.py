"""Retrieval: a text's key from the first MoE layers only, and the nearest task of a pack.

    key(x) = [ mean_t p_l1(t) ; ... ; mean_t p_lK(t) ]      ([K·E]; p = the router's distribution over all E experts)
    sim(x, task) = cos(key(x), key(task)),   task* = argmax sim,   margin = sim(task*) − max_{task ≠ task*} sim

Why router distributions (not hidden states): they live in the space the plans are made in (which experts a
text uses), are K·E numbers per task (compact), and are comparable across prompts of any length; hidden states are
H-dimensional and dominated by directions every text shares, so their cosines crowd near 1.

`KeyEmbedder` materialises only what the key needs: the embeddings (and what else is not a decoder layer, except
the head), decoder layers 0 .. lK − 1 in full, and layer lK WITHOUT its routed experts (the forward stops in its
router: the experts never run). Reads go through `io.lazy` and are counted (`CountedTensor`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.lazy import load_keys, load_lazy
from moeprune.models import get_adapter
from moeprune.stats.routed import router_probs
from moeprune.taskpack.counted import ByteCounter, counted_view


@dataclass
class Match:
    task: str
    margin: float  # best − second-best cosine (inf with one task)
    similarities: dict[str, float]


def nearest(keys: dict[str, torch.Tensor], query: torch.Tensor) -> Match:
    """The task whose key has the largest cosine with `query` ([D]), and the margin over the runner-up."""
    if not keys:
        raise MoePruneError("no task keys to match against.")
    sims = {name: float(torch.nn.functional.cosine_similarity(k.double(), query.double(), dim=0))
            for name, k in keys.items()}
    ranked = sorted(sims, key=sims.__getitem__, reverse=True)
    margin = sims[ranked[0]] - sims[ranked[1]] if len(ranked) > 1 else float("inf")
    return Match(ranked[0], margin, sims)


class _Stop(Exception):
    """Raised in the last key layer's router: nothing after it is computed."""


class KeyEmbedder:
    """The first MoE layers of a checkpoint, enough to compute keys; `bytes_read` counts what was read."""

    def __init__(self, ckpt: Checkpoint, key_layers: list[int], routing_kind: str, dtype: str = "auto"):
        self.counter = ByteCounter()
        self.kind = routing_kind
        lazy = load_lazy(ckpt.path, dtype, tensors=counted_view(ckpt.entries, self.counter))
        adapter = get_adapter(lazy.model.config, model=lazy.model)
        self.adapter, self.model, self.layers = adapter, lazy.model, list(key_layers)
        if not set(self.layers) <= set(adapter.moe_layers()):
            raise MoePruneError(f"key layers {self.layers} are not all MoE layers of this model "
                                f"({adapter.moe_layers()}); rebuild the task pack.")
        last = self.layers[-1]
        for i in range(last):
            load_keys(lazy, lazy.keys.get(i, []), f"{lazy.layer_prefix}.{i}")
        experts = adapter.experts(adapter.block(lazy.model, last))
        experts_path = next(n for n, m in lazy.model.named_modules() if m is experts)
        keep = [k for k in lazy.keys.get(last, []) if adapter.classify_key(k).kind not in ("expert", "fused")]
        load_keys(lazy, keep, f"{lazy.layer_prefix}.{last}", skip=(experts_path,))
        self.routers = [adapter.router(adapter.block(lazy.model, i)) for i in self.layers]

    @property
    def bytes_read(self) -> int:
        return self.counter.total

    @torch.no_grad()
    def keys(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S] token ids (mask: 1 on real tokens) -> [B, K·E] keys, each row the mean over its real tokens."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]  # [1, S]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        B, S = input_ids.shape
        E, at = self.adapter.num_experts, self.adapter.router_logits_at
        logits: list[torch.Tensor] = []

        def hook(module, args, output):
            out = output[at] if isinstance(output, tuple) else output
            logits.append(out.detach().reshape(B, S, -1)[..., :E])  # [B, S, E]
            if len(logits) == len(self.layers):
                raise _Stop

        handles = [r.register_forward_hook(hook) for r in self.routers]
        try:
            self.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        m = mask.to(torch.float64)[..., None]  # [B, S, 1]
        blocks = [(router_probs(x.reshape(B * S, E), self.kind).reshape(B, S, E) * m).sum(1) / m.sum(1)
                  for x in logits]  # K × [B, E]
        return torch.cat(blocks, dim=1)  # [B, K·E]
