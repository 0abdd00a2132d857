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
