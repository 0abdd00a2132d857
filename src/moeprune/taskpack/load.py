"""`moeprune.load_for_task(PACK, prompt=..., ratio=...)`: the task's pruned model, read partially from the shards.

Order (every refusal before any weight is read): the pack parses, the ratio is one of its ratios, a named task is
in it, a prompt is given when the task is chosen automatically, the referenced checkpoint's config.json and shard
headers are unchanged (sha256). Then, with `task` None or "auto": the prompt's key (`retrieve.KeyEmbedder`: the
embeddings and the first MoE layers only) is matched to the nearest task by cosine; when the margin (best −
second-best cosine) is below the threshold (default: the pack's `margin`), the match is not trusted and the FULL
model is loaded instead (a warning says so; `.task` is None). The union of the two candidates' patterns would
often be smaller, but it keeps different counts per layer, which a stock config cannot hold, and a wrong guess
there still loses quality; the full model is the safe choice.
The model is built from the plan's kept experts only (`partial.load_pruned`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.log import logger
from moeprune.taskpack.pack import TaskPack
from moeprune.taskpack.partial import full_plan, load_pruned, param_bytes
from moeprune.taskpack.retrieve import KeyEmbedder, Match, nearest

AUTO = "auto"


@dataclass
class TaskModel:
    model: nn.Module
    task: str | None  # the task whose experts were loaded; None = the full model (fallback)
    margin: float | None  # best − second-best cosine of the retrieval (None: the task was named)
    ratio: float
    kept: dict[int, list[int]]  # MoE layer -> original indices of the loaded experts
    bytes_read: int  # bytes of the shards read to build the model
    retrieval_bytes: int = 0  # bytes read to compute the prompt's key (embeddings + first layers)
    similarities: dict[str, float] = field(default_factory=dict)
    fallback: bool = False

    @property
    def param_bytes(self) -> int:
        return param_bytes(self.model)

    def describe(self) -> dict:
        return {"task": self.task, "margin": self.margin, "ratio": self.ratio, "fallback": self.fallback,
                "similarities": self.similarities, "bytes_read": self.bytes_read,
                "retrieval_bytes": self.retrieval_bytes, "param_bytes": self.param_bytes}


def check_request(pack: str | Path | TaskPack, ratio: float | None, task: str | None, has_prompt: bool
                  ) -> tuple[TaskPack, Checkpoint]:
    """The pack and its checkpoint, the request checked against them (no weight read; the checkpoint's
    fingerprint is checked)."""
    p = pack if isinstance(pack, TaskPack) else TaskPack.load(pack)
    if ratio is not None:
        p.check_ratio(ratio)
    if task not in (None, AUTO):
        p.task(task)
    elif not has_prompt:
        raise MoePruneError("choosing the task automatically needs a prompt (prompt=... / the evaluated text); or "
                            f"name the task ({', '.join(sorted(p.tasks))}).")
    return p, p.open_checkpoint()


def load_for_task(pack: str | Path | TaskPack, prompt: str | torch.Tensor | None = None, ratio: float | None = None,
                  task: str | None = None, margin: float | None = None, dtype: str = "auto",
                  tokenizer: str | None = None) -> TaskModel:
    """The model for `prompt`'s task (or the named `task`) at `ratio` (share of experts removed; default: the
    task's recommended ratio when the pack has one, else the pack's first). `prompt`: text (tokenised with the
    checkpoint's tokenizer, or `tokenizer`) or token ids."""
    p = pack if isinstance(pack, TaskPack) else TaskPack.load(pack)
    if margin is not None and margin < 0:
        raise MoePruneError(f"margin must be >= 0 (a cosine difference), got {margin}.")
    p, ckpt = check_request(p, ratio, task, prompt is not None)
    match: Match | None = None
    retrieval_bytes = 0
    if task in (None, AUTO):
        match, retrieval_bytes = retrieve(p, ckpt, prompt, dtype, tokenizer)
        threshold = p.margin if margin is None else margin
        if match.margin < threshold:
            logger.warning("task pack: the prompt is nearest to %r but its margin %.4f is below %.4f (similarities "
                           "%s): loading the FULL model, not a task's experts", match.task, match.margin, threshold,
                           _fmt(match.similarities))
            task = None
        else:
            task = match.task
            logger.info("task pack: the prompt matches task %r (margin %.4f over the next; similarities %s)", task,
                        match.margin, _fmt(match.similarities))
    ratio = p.ratio_for(task, ratio)
    plan = full_plan(ckpt) if task is None else p.task(task).plan(ratio)
    model, nbytes = load_pruned(ckpt, plan, dtype)
    logger.info("task pack: %s model loaded from %s, %.1f MB read (%d of %d experts per MoE layer)",
                task or "full", ckpt.path, nbytes / 2**20, plan.kept_count, plan.num_experts)
    return TaskModel(model, task, None if match is None else match.margin, ratio if task else 0.0,
                     dict(plan.kept_experts), nbytes, retrieval_bytes, {} if match is None else match.similarities,
                     fallback=match is not None and task is None)


def retrieve(pack: TaskPack, ckpt: Checkpoint, prompt, dtype: str = "auto", tokenizer: str | None = None
             ) -> tuple[Match, int]:
    """(nearest task of `prompt`, bytes read to embed it)."""
    ids = prompt_ids(ckpt.path, prompt, tokenizer)
    embedder = KeyEmbedder(ckpt, pack.key_layers, pack.routing_kind, dtype)
    query = embedder.keys(ids)[0]  # [K·E]
    return nearest(task_keys(pack), query), embedder.bytes_read


def task_keys(pack: TaskPack) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(t.key, dtype=torch.float64) for name, t in pack.tasks.items()}


def prompt_ids(model_path: Path, prompt, tokenizer: str | None = None) -> torch.Tensor:
    """[1, S] token ids of a text (the checkpoint's tokenizer) or of given ids."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt.reshape(1, -1).long()
    else:
        from moeprune.calibration.run import load_tokenizer

        ids = torch.tensor([load_tokenizer(model_path, tokenizer)(str(prompt))["input_ids"]], dtype=torch.long)
    if ids.numel() == 0:
        raise MoePruneError("the prompt is empty: retrieval needs at least one token.")
    return ids


def _fmt(sims: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in sorted(sims.items(), key=lambda kv: -kv[1]))
