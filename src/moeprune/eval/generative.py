"""Native runner of the generative tasks: greedy completions of task items, scored by `eval/scorers.py`.

Per task (its `until` strings and token budget from `gen_tasks.TASKS`), items are sorted by prompt length and run
in left-padded batches of `batch_size` through `model.generate(do_sample=False)`; a row stops at the model's EOS,
when its text holds an `until` string, or when the task says it is complete (python: the function ended). The
completion is decoded without special tokens and cut before the first `until` string — what lm-eval's
`generate_until` does with the same YAML settings (`eval/lm_eval_tasks.py`), so both paths score the same text.

    score(task, metric) = mean over the task's items of scorer(prompt, completion)[metric]      (each 0 or 1)

Left padding changes the shapes a row is computed with, so a near-tie of two logits can flip between batch sizes;
`batch_size=1` is padding-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from moeprune.eval import scorers
from moeprune.eval.gen_tasks import cut, get_task


@dataclass
class GenScore:
    task: str
    metrics: dict[str, float]  # metric -> mean over items
    items: int
    primary: str
    completions: list[str] = field(default_factory=list, repr=False)  # in item order

    @property
    def value(self) -> float:
        return self.metrics[self.primary]

    def to_dict(self) -> dict:
        return {"primary": self.primary, "items": self.items, **self.metrics}

    def short(self) -> str:
        """`strict 0.625 json 0.953` (primary metric first)."""
        names = [self.primary] + [m for m in self.metrics if m != self.primary]
        return " ".join(f"{m} {self.metrics[m]:.3f}" for m in names)


class _RowsDone(StoppingCriteria):
    """Per-row stop: the decoded new text of a row satisfies `done(prompt, text)`."""

    def __init__(self, tokenizer, prompts: list[str], start: int, done: Callable[[str, str], bool]) -> None:
        self.tokenizer, self.prompts, self.start, self.done = tokenizer, prompts, start, done

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)  # [B] strings
        return torch.tensor([self.done(p, t) for p, t in zip(self.prompts, texts, strict=True)],
                            dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def complete(model: nn.Module, tokenizer, task: str, prompts: list[str], batch_size: int = 8) -> list[str]:
    """Greedy completions of `prompts` (in their order) under `task`'s budget, cut at its `until` strings."""
    spec = get_task(task)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(enc[i]), prompts[i]))  # as lm-eval sorts
    out: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=f"generating {task}", leave=False):
        rows = order[start : start + batch_size]
        width = max(len(enc[i]) for i in rows)
        ids = torch.tensor([[pad] * (width - len(enc[i])) + enc[i] for i in rows], device=device)  # [b, P] left pad
        mask = torch.tensor([[0] * (width - len(enc[i])) + [1] * len(enc[i]) for i in rows], device=device)  # [b, P]
        stop = _RowsDone(tokenizer, [prompts[i] for i in rows], width, spec.done)
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=spec.max_new_tokens, do_sample=False,
                             pad_token_id=pad, stopping_criteria=StoppingCriteriaList([stop]))  # [b, P + G]
        for row, i in enumerate(rows):
            out[i] = cut(tokenizer.decode(gen[row, width:].tolist(), skip_special_tokens=True), spec.until)
    return out


def score_completions(task: str, prompts: list[str], completions: list[str]) -> GenScore:
    """Mean of each scorer metric over the items."""
    per_item = [scorers.score(task, p, c) for p, c in zip(prompts, completions, strict=True)]
    metrics = {m: sum(s[m] for s in per_item) / len(per_item) for m in per_item[0]}
    return GenScore(task, metrics, len(per_item), scorers.PRIMARY[task], list(completions))


def evaluate_generative(model: nn.Module, tokenizer, items: list[dict], batch_size: int = 8) -> dict[str, GenScore]:
    """{task: GenScore} over `items` (`{"domain", "prompt", ...}`), tasks in order of first appearance."""
    by_task: dict[str, list[str]] = {}
    for item in items:
        by_task.setdefault(item["domain"], []).append(item["prompt"])
    return {task: score_completions(task, prompts, complete(model, tokenizer, task, prompts, batch_size))
            for task, prompts in by_task.items()}
