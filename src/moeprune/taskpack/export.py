"""`moeprune taskpack export PACK --task NAME --ratio R --out DIR`: one task's pruned checkpoint as a stock
folder, through the ordinary apply/export pipeline (`api.apply_plan`) and verified like any prune (`api.verify`:
the stock reload equals the original with the same experts masked)."""

from __future__ import annotations

from pathlib import Path

from moeprune.api import apply_plan, verify
from moeprune.io.atomic import check_output
from moeprune.pipeline.export import ApplyResult
from moeprune.pipeline.verify import VerifyResult
from moeprune.taskpack.pack import TaskPack


def export_task(pack: str | Path, task: str, ratio: float | None, out: str | Path, *, overwrite: bool = False,
                run_verify: bool = True) -> tuple[ApplyResult, VerifyResult | None]:
    """`ratio` None: the task's recommended ratio, else the pack's first."""
    p = TaskPack.load(pack)
    p.task(task)
    plan = p.task(task).plan(p.ratio_for(task, ratio))
    ckpt = p.open_checkpoint()
    check_output(out, [ckpt.path, Path(pack)], overwrite)
    result = apply_plan(ckpt.path, plan, out, overwrite=overwrite)
    return result, verify(ckpt.path, out) if run_verify else None
