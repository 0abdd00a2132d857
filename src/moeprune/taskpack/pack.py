"""The task pack (PreMoe's TAER store): per task, the kept experts of each pruning ratio and a retrieval key.

A pack is a folder holding one JSON file, `taskpack.json`, format `moeprune.taskpack/1`:

    checkpoint   the original checkpoint's absolute path (a reference: no weight is ever copied into a pack), and
                 checkpoint_relative, the same folder relative to the pack's: a pack moved or copied together
                 with its checkpoint (same relative place) finds it there first, a pack moved alone at the
                 absolute path
    fingerprint  sha256 of its config.json and of each weight shard's header (8-byte length + JSON), so a pack
                 whose checkpoint changed (re-saved, other weights, other layout) is refused before any weight read
    criterion    the expert criterion the plans were made with (default tcess), ratios (share of experts REMOVED)
    key          how retrieval keys are made: MoE layers (the first `key_layers`), distance (cosine), margin
    tasks        per task: its calibration tokens, its key, the keys' spread, per ratio a plan
                 (`moeprune.plan/1` without scores: kept experts per MoE layer), and its recommended ratio
                 (from `moeprune sweep`'s ratios.json; None otherwise)

Retrieval key of a text = the mean over its tokens of the router distributions p(t) (softmax over all E experts,
`stats.routed.router_probs`) of the first `key_layers` MoE layers, concatenated:

    key = [ mean_t p_l1(t) ; ... ; mean_t p_lK(t) ]        ([K·E]; each block sums to 1)

A task's key is the same mean over its calibration tokens, read off the calibration statistics
(prob_sum / tokens), so building a pack costs one calibration run. Spread (per task, from its calibration windows
embedded one by one): the cosine of each window's key to its own task key (mean, min) and the margin by which
it is nearer to its own task than to the nearest other (min, 5th percentile), to judge a margin threshold.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.select.plan import PrunePlan

PACK_FORMAT = "moeprune.taskpack/1"
PACK_FILE = "taskpack.json"
DISTANCES = ("cosine",)


class TaskPackError(MoePruneError):
    """A task pack cannot be used as asked."""


class StalePackError(TaskPackError):
    """The pack's checkpoint is not the one it was built from."""


class UnknownTaskError(TaskPackError):
    """The task is not in the pack."""


class RatioNotInPackError(TaskPackError):
    """The pack holds no plan for this ratio."""


def fingerprint(ckpt: Checkpoint) -> dict[str, str]:
    """sha256 of config.json and of each shard's header (its first 8 + N bytes), by file name."""
    out = {"config.json": hashlib.sha256((ckpt.path / "config.json").read_bytes()).hexdigest()}
    for f in ckpt.files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            out[f.name] = hashlib.sha256(n.to_bytes(8, "little") + fh.read(n)).hexdigest()
    return out


@dataclass
class TaskEntry:
    tokens: int  # calibration tokens of the task
    key: list[float]  # [K·E]
    spread: dict[str, float]  # self_cos_mean, self_cos_min, margin_min, margin_p05, windows
    plans: dict[str, dict]  # ratio (as written by `ratio_key`) -> PrunePlan dict without scores
    recommended: float | None = None  # the task's own ratio (`moeprune sweep`), used when none is asked

    def plan(self, ratio: float) -> PrunePlan:
        return PrunePlan.from_dict(self.plans[ratio_key(ratio)])


@dataclass
class TaskPack:
    checkpoint: str
    fingerprint: dict[str, str]
    model_type: str
    num_experts: int
    criterion: str
    ratios: list[float]
    key_layers: list[int]  # decoder-layer indices of the MoE layers whose router distributions make the key
    routing_kind: str  # how router logits become a distribution (`router_probs`)
    margin: float  # default margin threshold of `load_for_task`
    tasks: dict[str, TaskEntry]
    distance: str = "cosine"
    checkpoint_relative: str | None = None  # the checkpoint relative to the pack folder (None: older packs)
    format: str = field(default=PACK_FORMAT)
    folder: Path | None = field(default=None, repr=False, compare=False)  # where it was loaded from (not saved)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.format != PACK_FORMAT:
            raise TaskPackError(f"task pack format {self.format!r} is not {PACK_FORMAT!r}; rebuild it with "
                                "`moeprune taskpack build`.")
        if self.distance not in DISTANCES:
            raise TaskPackError(f"unknown distance {self.distance!r}; known: {', '.join(DISTANCES)}.")
        if not self.tasks or not self.ratios or not self.key_layers:
            raise TaskPackError("a task pack needs at least one task, one ratio and one key layer.")
        width = len(self.key_layers) * self.num_experts
        for name, t in self.tasks.items():
            if len(t.key) != width or not all(math.isfinite(x) for x in t.key):
                raise TaskPackError(f"task {name!r}: its key has {len(t.key)} entries (finite numbers), expected "
                                    f"{width} = {len(self.key_layers)} key layers × {self.num_experts} experts.")
            if t.recommended is not None and ratio_key(t.recommended) not in t.plans:
                raise TaskPackError(f"task {name!r}: its recommended ratio {t.recommended} has no plan.")
            if sorted(t.plans) != sorted(ratio_key(r) for r in self.ratios):
                raise TaskPackError(f"task {name!r} has plans for ratios {sorted(t.plans)}, the pack lists "
                                    f"{self.ratios}.")

    # ------------------------------------------------------------------ lookups
    def task(self, name: str) -> TaskEntry:
        if name not in self.tasks:
            raise UnknownTaskError(f"task {name!r} is not in this pack; it holds {', '.join(sorted(self.tasks))}. "
                                   "Use one of them, or --task auto.")
        return self.tasks[name]

    def ratio_for(self, task: str | None, ratio: float | None) -> float:
        """The asked ratio, else the task's recommended one, else the pack's first (checked against the pack)."""
        if ratio is None:
            rec = self.tasks[task].recommended if task in self.tasks else None
            ratio = self.ratios[0] if rec is None else rec
        return self.check_ratio(ratio)

    def check_ratio(self, ratio: float) -> float:
        if ratio_key(ratio) not in {ratio_key(r) for r in self.ratios}:
            raise RatioNotInPackError(f"ratio {ratio} is not in this pack (it holds {self.ratios}: the shares of "
                                      "experts removed); choose one of them or rebuild the pack with --ratios.")
        return ratio

    def checkpoint_path(self) -> Path:
        """Where the checkpoint is: relative to the pack folder when it is there (pack and checkpoint moved
        together), else the absolute path it was built from."""
        if self.folder is not None and self.checkpoint_relative is not None:
            near = (self.folder / self.checkpoint_relative).resolve()
            if (near / "config.json").is_file():
                return near
        return Path(self.checkpoint)

    def open_checkpoint(self) -> Checkpoint:
        """The referenced checkpoint, refused unless config.json and every shard header are as when built."""
        try:
            ckpt = Checkpoint.open(self.checkpoint_path())
        except MoePruneError as e:
            near = (f" nor at {self.folder / self.checkpoint_relative} (relative to the pack)"
                    if self.folder is not None and self.checkpoint_relative is not None else "")
            raise StalePackError(f"the task pack's checkpoint is not at {self.checkpoint}{near}: {e}") from e
        now = fingerprint(ckpt)
        changed = sorted(k for k in set(now) | set(self.fingerprint) if now.get(k) != self.fingerprint.get(k))
        if changed:
            raise StalePackError(f"the checkpoint {ckpt.path} changed since the task pack was built "
                                 f"({', '.join(changed)} differ): its plans may not fit it. Rebuild the pack with "
                                 "`moeprune taskpack build`.")
        return ckpt

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {"format": self.format, **{k: v for k, v in asdict(self).items() if k not in ("format", "folder")}}

    def save_into(self, folder: Path) -> Path:
        path = Path(folder) / PACK_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> TaskPack:
        """A pack folder (or its taskpack.json)."""
        path = Path(path).expanduser()
        file = path / PACK_FILE if path.is_dir() else path
        if not file.is_file():
            raise TaskPackError(f"{path} is not a task pack (no {PACK_FILE}); build one with `moeprune taskpack "
                                "build MODEL --calib NAME=PATH ... --out PACK`.")
        try:
            raw = json.loads(file.read_text())
            tasks = {n: TaskEntry(**t) for n, t in raw.pop("tasks").items()}
            return cls(**raw, tasks=tasks, folder=file.parent.resolve())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise TaskPackError(f"{file} is not a valid {PACK_FORMAT} file ({e}); rebuild the pack.") from e


def ratio_key(ratio: float) -> str:
    """A ratio as a JSON key: 0.5 -> "0.5" (rounded to 6 digits so 0.1 + 0.2 finds "0.3")."""
    return f"{round(float(ratio), 6):g}"
