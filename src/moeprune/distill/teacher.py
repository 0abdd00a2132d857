"""The teacher's targets, computed once so the teacher can be freed before training starts.

    teacher_targets(teacher, layers, ids, mask, topk=k, hidden=...)
        logits   [N, L, V] float32 (k = 0)   or   top-k values [N, L, k] float32 + indices [N, L, k] int32
                 + log Z [N, L] = logsumexp(logits / T) at the run's temperature T (loss.py)
        hidden   [N, n_layers, L, H] float32 decoder-layer outputs (hidden-state matching only)
held on the CPU (moved to the device one batch at a time). Memory: N·L·V·4 bytes for full logits (the testbed:
256 windows · 256 tokens · 2048 · 4 B = 0.5 GB), N·L·(8k + 4) bytes for top-k (docs/distillation.md: a 235B model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.distill.loss import TeacherBatch, layer_outputs
from moeprune.log import logger


@dataclass
class TeacherTargets:
    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L]
    topk: int  # 0: full logits
    temperature: float = 1.0  # of `logz`
    logits: torch.Tensor | None = None  # [N, L, V]
    values: torch.Tensor | None = None  # [N, L, k]
    indices: torch.Tensor | None = None  # [N, L, k]
    logz: torch.Tensor | None = None  # [N, L]
    hidden: torch.Tensor | None = None  # [N, n_layers, L, H]

    @property
    def windows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def nbytes(self) -> int:
        kept = (self.logits, self.values, self.indices, self.logz, self.hidden)
        return sum(t.numel() * t.element_size() for t in kept if t is not None)

    def batch(self, idx: Sequence[int], device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor, TeacherBatch]:
        """(input_ids, attention_mask, teacher targets) of windows `idx`, on `device`."""
        rows = torch.as_tensor(list(idx), dtype=torch.long)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, rows).to(device)

        return (take(self.input_ids), take(self.attention_mask),
                TeacherBatch(take(self.logits), take(self.values), take(self.indices), take(self.logz),
                             take(self.hidden)))


@torch.no_grad()
def teacher_targets(teacher: nn.Module, layers: Sequence[nn.Module], ids: torch.Tensor, mask: torch.Tensor, *,
                    topk: int = 0, temperature: float = 1.0, hidden: bool = False, batch_size: int = 8,
                    device: str | torch.device = "cpu") -> TeacherTargets:
    """Run `teacher` over windows `ids`/`mask` [N, L] and keep its logits (all, or the top `topk` and the log
    partition function at `temperature`) and, with `hidden`, the outputs of its decoder `layers`."""
    out = TeacherTargets(ids, mask, topk, float(temperature))
    logits, values, indices, logz, states = [], [], [], [], []
    starts = range(0, ids.shape[0], batch_size)
    with layer_outputs(layers, enabled=hidden) as captured:
        for n, start in enumerate(bar := tqdm(starts, leave=False)):
            bar.set_description(f"teacher logits (batch {n + 1}/{len(starts)})")
            captured.clear()
            b_ids = ids[start : start + batch_size].to(device)  # [B, L]
            b_mask = mask[start : start + batch_size].to(device)  # [B, L]
            z = teacher(input_ids=b_ids, attention_mask=b_mask, use_cache=False).logits.float()  # [B, L, V]
            if topk:
                v, i = z.topk(topk, dim=-1)  # [B, L, k]
                values.append(v.cpu())
                indices.append(i.to(torch.int32).cpu())
                logz.append(torch.logsumexp(z / temperature, dim=-1).cpu())  # [B, L]
            else:
                logits.append(z.cpu())
            if hidden:
                states.append(torch.stack([h.float() for h in captured], dim=1).cpu())  # [B, n_layers, L, H]
    if topk:
        out.values, out.indices, out.logz = torch.cat(values), torch.cat(indices), torch.cat(logz)
    else:
        out.logits = torch.cat(logits)
    if hidden:
        out.hidden = torch.cat(states)
    logger.info("teacher targets: %d windows of %d tokens, %s logits%s, %.1f MB", out.windows, out.seq_len,
                f"top-{topk}" if topk else "full", " + decoder-layer outputs" if hidden else "", out.nbytes() / 1e6)
    return out
