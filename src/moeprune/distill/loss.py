"""The distillation loss, on real tokens only (attention_mask = 1):

    p = softmax(t / T), q = softmax(s / T)       teacher / student logits t, s [n, V] at the real tokens
    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)      per token; loss_kl = T² · mean over tokens (Hinton's T² keeps the
                                                 gradient scale independent of T)
  top-k teacher (its k largest logits t_K and log Z = logsumexp(t / T) stored, not the whole row):
    the KL between the two distributions over K ∪ {rest}: p_v = exp(t_v / T − log Z) (exact), p_rest = 1 − Σ_K p_v,
    q_rest = 1 − Σ_K q_v:   KL_K = Σ_{v∈K} p_v (log p_v − log q_v) + p_rest (log p_rest − log q_rest)
    — a true KL (≥ 0), equal to the full one when the teacher's mass lies in K and never above it (coarse-graining
    loses information); renormalising p over K instead would push the student to put all its mass on K
    hidden = (1/|ℓ|) Σ_ℓ mean_{tokens, h} (y_ℓ^student − y_ℓ^teacher)²    decoder-layer outputs y_ℓ [n, H]
    loss = loss_kl + hidden_weight · hidden
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TINY = 1e-12  # floor of the student's mass outside the teacher's top-k (its log stays finite)

@dataclass
class TeacherBatch:
    """The teacher's targets for a batch of windows [B, L]: full logits, or top-k values and indices."""

    logits: torch.Tensor | None = None  # [B, L, V]
    values: torch.Tensor | None = None  # [B, L, k]
    indices: torch.Tensor | None = None  # [B, L, k]
    logz: torch.Tensor | None = None  # [B, L] logsumexp(t / T) of the full row, at the targets' temperature
    hidden: torch.Tensor | None = None  # [B, n_layers, L, H] decoder-layer outputs


def token_kl(student_logits: torch.Tensor, teacher: TeacherBatch, mask: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher ‖ q_student) at temperature T for every real token: [n] (unscaled; see the module docstring).
    Top-k targets hold log Z at one temperature: `temperature` must be that one."""
    real = mask.bool()  # [B, L]
    log_q = F.log_softmax(student_logits[real].float() / temperature, dim=-1)  # [n, V]
    if teacher.logits is not None:
        log_p = F.log_softmax(teacher.logits[real].float() / temperature, dim=-1)  # [n, V]
        return (log_p.exp() * (log_p - log_q)).sum(-1)  # [n]
    log_p = teacher.values[real].float() / temperature - teacher.logz[real].float()[:, None]  # [n, k] exact
    log_qk = log_q.gather(-1, teacher.indices[real].long())  # [n, k]
    p_rest = (1 - log_p.exp().sum(-1)).clamp_min(0)  # [n]
    q_rest = (1 - log_qk.exp().sum(-1)).clamp_min(TINY)  # [n]
    return (log_p.exp() * (log_p - log_qk)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * q_rest.log()  # [n]


def hidden_mse(student: Sequence[torch.Tensor], teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over decoder layers of the mean squared difference of their outputs on real tokens (scalar)."""
    real = mask.bool()  # [B, L]
    losses = [(s[real].float() - teacher[:, j][real].float()).pow(2).mean() for j, s in enumerate(student)]
    return torch.stack(losses).mean()


def distill_loss(student_logits: torch.Tensor, hidden: Sequence[torch.Tensor] | None, teacher: TeacherBatch,
                 mask: torch.Tensor, temperature: float, hidden_weight: float) -> tuple[torch.Tensor, float]:
    """(loss, mean KL at T) of one batch: T² · mean KL [+ hidden_weight · hidden MSE]."""
    kl = token_kl(student_logits, teacher, mask, temperature).mean()
    loss = kl * temperature**2
    if hidden_weight > 0:
        loss = loss + hidden_weight * hidden_mse(hidden, teacher.hidden, mask)
    return loss, float(kl.detach())


@contextmanager
def layer_outputs(layers: Sequence[nn.Module], enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """Inside: the list holds each layer's output hidden states [B, L, H] of the last forward, in layer order (the
    caller clears it between forwards). A layer returning a tuple contributes its first element."""
    out: list[torch.Tensor] = []
    if not enabled:
        yield out
        return

    def hook(module, args, output) -> None:
        out.append(output[0] if isinstance(output, (tuple, list)) else output)

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
