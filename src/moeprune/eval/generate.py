"""Greedy generation samples: the same prompts before and after pruning show what changed in plain text."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def greedy_samples(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> dict[str, str]:
    """{prompt: greedy continuation (decoded, prompt excluded)}; deterministic (no sampling)."""
    device = next(model.parameters()).device
    out = {}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)  # [1, P]
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out[prompt] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)  # [N]
    return out


@torch.no_grad()
def greedy_continuations(model: nn.Module, prompts: torch.Tensor, max_new_tokens: int = 32,
                         batch_size: int = 8) -> torch.Tensor:
    """prompts: [N, P] token ids (no padding) -> [N, max_new_tokens] greedy continuations (no early stop)."""
    device = next(model.parameters()).device
    outs = []
    for start in range(0, prompts.shape[0], batch_size):
        ids = prompts[start : start + batch_size].to(device)  # [b, P]
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
        outs.append(gen[:, ids.shape[1]:].cpu())  # [b, max_new_tokens]
    return torch.cat(outs)


def agreement(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """Greedy continuations [N, G] of two models from the same prompts ->
    (mean fraction of positions with the same token, mean length of the common prefix / G)."""
    same = reference == candidate  # [N, G]
    prefix = same.long().cumprod(dim=1).sum(dim=1)  # [N] tokens before the first difference
    return float(same.double().mean()), float(prefix.double().mean() / reference.shape[1])


def distinct_ngrams(tokens: torch.Tensor, n: int = 3) -> float:
    """[N, G] -> distinct n-grams / all n-grams, pooled over rows (1.0: no repetition; loops drive it to 0)."""
    grams = [tuple(row[i : i + n].tolist()) for row in tokens for i in range(tokens.shape[1] - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")
