"""Evaluation through a task pack: `moeprune eval|compare MODEL ... --pack PACK --task auto|NAME --task-ratio R`.

MODEL must be the pack's checkpoint (same folder, unchanged: `TaskPack.open_checkpoint`). With a task name, every
data set is scored by that task's model (its kept experts only, `partial.load_pruned`). With `auto`, each data set
is scored by the model its FIRST window retrieves (`load.retrieve`: nearest key, the full model below the margin),
as a request carrying that text would be served; one model per retrieved task is built and reused. The choice per
set (task, margin, bytes read) is reported next to the scores.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeprune.calibration.data import CalibSet
from moeprune.errors import MoePruneError
from moeprune.eval.perplexity import DomainScore, evaluate_sets
from moeprune.io.checkpoint import Checkpoint
from moeprune.log import logger
from moeprune.taskpack.load import AUTO, check_request, retrieve
from moeprune.taskpack.pack import TaskPack
from moeprune.taskpack.partial import full_plan, load_pruned


@dataclass(frozen=True)
class PackRequest:
    pack: str
    task: str = AUTO
    ratio: float | None = None  # None: each task's recommended ratio, else the pack's first

    def check(self, ckpt: Checkpoint) -> TaskPack:
        """The pack, refused unless the request fits it and MODEL is the pack's checkpoint."""
        p = TaskPack.load(self.pack)
        _, own = check_request(p, self.ratio, self.task, has_prompt=True)  # the prompt is the data
        if own.path != ckpt.path:
            raise MoePruneError(f"--pack {self.pack} was built from {own.path}, not {ckpt.path}: pass that checkpoint "
                                "as MODEL (the pack loads its experts from it).")
        return p


def score_with_pack(req: PackRequest, ckpt: Checkpoint, sets: list[CalibSet], dtype: str, batch_size: int,
                    device: str = "cpu") -> tuple[dict[str, DomainScore], dict[str, dict], object | None]:
    """({set: score}, {set: choice}, the model when one task served every set else None)."""
    p = req.check(ckpt)
    models: dict[str | None, tuple[object, int]] = {}
    scores, choices = {}, {}
    for s in sets:
        task, info = req.task, {}
        if task == AUTO:
            first = s.input_ids[0][s.attention_mask[0].bool()]  # [S] the set's first window, real tokens
            match, nbytes = retrieve(p, ckpt, first, dtype)
            task = match.task if match.margin >= p.margin else None
            info = {"margin": match.margin, "similarities": match.similarities, "retrieval_bytes": nbytes}
            if task is None:
                logger.warning("--task auto: %s's first window is nearest to %r by a margin %.4f below %.4f: scored "
                               "with the FULL model", s.name, match.task, match.margin, p.margin)
        ratio = p.ratio_for(task, req.ratio)
        if task not in models:
            plan = full_plan(ckpt) if task is None else p.task(task).plan(ratio)
            model, nbytes = load_pruned(ckpt, plan, dtype)
            models[task] = (model.to(device), nbytes)
        model, nbytes = models[task]
        scores |= evaluate_sets(model, [s], batch_size)
        choices[s.name] = {"task": task, "ratio": ratio if task else 0.0, "bytes_read": nbytes, **info}
        logger.info("%s scored with task %s (ratio %s)", s.name, task or "full", ratio if task else 0)
    only = next(iter(models.values()))[0] if len(models) == 1 else None
    return scores, choices, only


def format_choices(choices: dict[str, dict]) -> str:
    rows = ["\ntask pack:"]
    for name, c in choices.items():
        margin = f", margin {c['margin']:.4f}" if "margin" in c else ""
        rows.append(f"  {name}: task {c['task'] or 'FULL (below margin)'} at ratio {c['ratio']}{margin}, "
                    f"{c['bytes_read'] / 2**20:.1f} MB read")
    return "\n".join(rows)
