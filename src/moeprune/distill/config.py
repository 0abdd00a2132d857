"""`DistillConfig`: every option of a distillation run, validated before any work (no model needed).

    steps | tokens        budget: optimizer steps (default 200), or tokens → ⌈tokens / (batch_size · L)⌉ steps
    lr, schedule          AdamW learning rate (default 1e-4, chosen for training routed experts; see
                          docs/distillation.md) and its schedule: constant | cosine | linear (to 0), after
                          `warmup_steps` of linear warm-up
    batch_size            calibration windows per step (the order is a function of seed and step: data.py)
    train                 what is trained: routers, experts (routed gate/up/down and biases), lora (LoRA on the
                          routed experts' weights, merged back); a string or a list; everything else is frozen
    temperature           T of the KL (the loss is scaled by T²)
    hidden_weight         weight of the decoder-layer output MSE (0: logits only)
    teacher_topk          None: full logits when the vocabulary has at most FULL_VOCAB entries, else AUTO_TOPK;
                          0: full logits; k: the teacher's top-k logits only (loss.py says how)
    lora_rank, lora_alpha LoRA rank r and α (scaling α / r); only with train lora (defaults 8 and 16)
    max_grad_norm         gradient clipping (0: none); weight_decay of AdamW (default 0: the weights are kept)
    checkpoint_dir        where the resumable state is written (atomically) every `checkpoint_every` steps
                          (default 50) and at the end; a run finds it there and resumes
    log_every             steps between points of the loss curve in the summary
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from moeprune.errors import MoePruneError

TRAINABLES = ("routers", "experts", "lora")
SCHEDULES = ("constant", "cosine", "linear")
DEFAULT_STEPS = 200
DEFAULT_CHECKPOINT_EVERY = 50
FULL_VOCAB = 4096  # teacher_topk None: full teacher logits up to this vocabulary size ...
AUTO_TOPK = 64  # ... else the top 64 logits per token
LORA_RANK, LORA_ALPHA = 8, 16.0
RUN_ONLY = ("checkpoint_dir", "checkpoint_every", "log_every")  # options that do not change the result


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    steps: int | None = None
    tokens: int | None = None
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    batch_size: int = 4
    seed: int = 0
    train: tuple[str, ...] = ("experts", "routers")
    temperature: float = 1.0
    hidden_weight: float = 0.0
    teacher_topk: int | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.train, (str, list)):
            object.__setattr__(self, "train", tuple([self.train] if isinstance(self.train, str) else self.train))

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Every refusal that needs no model; messages name the option and what to give instead."""
        for name in ("steps", "tokens", "batch_size", "log_every", "checkpoint_every", "lora_rank"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MoePruneError(f"{name} {value!r}: a whole number >= 1.")
        for name, low in (("lr", 0.0), ("temperature", 0.0), ("lora_alpha", 0.0)):
            value = getattr(self, name)
            if value is not None and (not _number(value) or value <= low):
                raise MoePruneError(f"{name} {value!r}: a number > 0.")
        for name in ("hidden_weight", "max_grad_norm", "weight_decay"):
            if not _number(getattr(self, name)) or getattr(self, name) < 0:
                raise MoePruneError(f"{name} {getattr(self, name)!r}: a number >= 0.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise MoePruneError(f"seed {self.seed!r}: a whole number.")
        if self.steps is not None and self.tokens is not None:
            raise MoePruneError("give a budget of steps or of tokens, not both.")
        if self.schedule not in SCHEDULES:
            raise MoePruneError(f"schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}.")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise MoePruneError(f"warmup_steps {self.warmup_steps!r}: a whole number >= 0.")
        if self.steps is not None and self.warmup_steps >= self.steps:
            raise MoePruneError(f"warmup_steps {self.warmup_steps} leaves no training after it in {self.steps} steps.")
        if self.teacher_topk is not None and (isinstance(self.teacher_topk, bool)
                                              or not isinstance(self.teacher_topk, int) or self.teacher_topk < 0):
            raise MoePruneError(f"teacher_topk {self.teacher_topk!r}: 0 (full logits) or a whole number k >= 1.")
        self._validate_train()
        if self.checkpoint_every is not None and self.checkpoint_dir is None:
            raise MoePruneError("checkpoint_every applies with checkpoint_dir (a folder for the resumable state).")

    def _validate_train(self) -> None:
        unknown = [t for t in self.train if t not in TRAINABLES]
        if unknown or not self.train:
            raise MoePruneError(f"train {list(self.train)!r}: one or more of {', '.join(TRAINABLES)}.")
        if len(set(self.train)) != len(self.train):
            raise MoePruneError(f"train {list(self.train)!r} names a part twice.")
        if "lora" in self.train and "experts" in self.train:
            raise MoePruneError("train lora adapts the routed experts, train experts trains them whole: choose one.")
        if "lora" not in self.train:
            given = [n for n in ("lora_rank", "lora_alpha") if getattr(self, n) is not None]
            if given:
                raise MoePruneError(f"{' and '.join(given)} apply with train lora (train is {list(self.train)}); "
                                    "add lora to train or drop them.")

    # ------------------------------------------------------------------ resolved values
    def total_steps(self, seq_len: int) -> int:
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / (self.batch_size * seq_len)))
        return self.steps if self.steps is not None else DEFAULT_STEPS

    def topk(self, vocab_size: int) -> int:
        """k of the teacher's stored logits; 0 = the full vocabulary."""
        if self.teacher_topk is None:
            return 0 if vocab_size <= FULL_VOCAB else AUTO_TOPK
        return 0 if self.teacher_topk >= vocab_size else self.teacher_topk

    @property
    def rank(self) -> int:
        return self.lora_rank if self.lora_rank is not None else LORA_RANK

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else LORA_ALPHA

    @property
    def every(self) -> int:
        return self.checkpoint_every if self.checkpoint_every is not None else DEFAULT_CHECKPOINT_EVERY

    def settings(self) -> dict[str, Any]:
        """Every option (tuples as lists), for the report."""
        out = {}
        for f in fields(DistillConfig):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
