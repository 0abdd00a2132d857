"""The training engine for one device: plain torch AdamW and a LambdaLR schedule.

    factor(step) = (step + 1) / (warmup + 1)                       during the first `warmup_steps` steps
                 = 1 | 1 − p | ½ (1 + cos π p)                     constant | linear | cosine,
                   p = (step − warmup) / (total − warmup) ∈ [0, 1)   after
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moeprune.distill.config import DistillConfig


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    p = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return 1.0 - p
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0


def make_optimizer(params: list[nn.Parameter], config: DistillConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, config: DistillConfig):
    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict then holds only counters
        return lr_factor(step, total, config.warmup_steps, config.schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
