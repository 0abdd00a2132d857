"""`moeprune taskpack build`: one calibration run over every task, one plan per task and ratio, one key per task.

    stats = calibrate(MODEL, all --calib sets)                       (one pass; statistics per set)
    plan[task][r] = make_plan(stats, criterion, r, calib_set=[task])  (the `--calib-set` restriction)
    key[task] = [prob_sum_l / tokens_l for the first key_layers MoE layers l]   (pack.py; = mean router distribution)
    spread[task] = cosines and margins of the task's calibration windows' own keys (`retrieve.KeyEmbedder`)

Every option is checked before the model is read (ratios, criterion, key layers, output folder, data). The ratio
is the share of routed experts REMOVED per MoE layer, as everywhere in moeprune. `--ratios` is a list or range
(`sweep.knee.parse_ratios`), or the ratios.json of `moeprune sweep` ({task: recommended ratio}): then every task
gets plans for every ratio listed there, and each task records its own as `recommended` (the ratio `load_for_task`
uses when none is given).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moeprune.api import make_plan
from moeprune.calibration.data import CalibSet
from moeprune.calibration.run import CalibrateOptions, calibrate, prepare
from moeprune.criteria import CRITERIA
from moeprune.errors import MoePruneError
from moeprune.io.atomic import atomic_dir, check_output
from moeprune.io.checkpoint import Checkpoint
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.select.uniform import drop_count
from moeprune.stats.store import ExpertStats
from moeprune.sweep.knee import parse_ratios as sweep_ratios
from moeprune.taskpack.pack import TaskEntry, TaskPack, fingerprint, ratio_key
from moeprune.taskpack.retrieve import KeyEmbedder, nearest

DEFAULT_MARGIN = 0.01  # cosine difference below which load_for_task falls back to the full model


@dataclass(frozen=True)
class BuildOptions:
    ratios: tuple[float, ...]
    criterion: str = "tcess"
    recommended: tuple[tuple[str, float], ...] = ()  # (task, ratio) from `moeprune sweep`'s ratios.json
    key_layers: int = 2
    margin: float = DEFAULT_MARGIN
    spread_windows: int = 64  # calibration windows per task embedded for the spread

    def __post_init__(self) -> None:
        if not self.ratios:
            raise MoePruneError("--ratios: give at least one ratio, e.g. --ratios 0.5,0.75.")
        bad = [r for r in self.ratios if not 0.0 < r < 1.0]
        if bad:
            raise MoePruneError(f"--ratios {bad}: each ratio is the share of experts removed, strictly between 0 "
                                "and 1.")
        if len({ratio_key(r) for r in self.ratios}) != len(self.ratios):
            raise MoePruneError(f"--ratios {list(self.ratios)} lists a ratio twice.")
        if any(ratio_key(r) not in {ratio_key(x) for x in self.ratios} for _, r in self.recommended):
            raise MoePruneError("internal: a recommended ratio is not among the pack's ratios.")
        crit = CRITERIA.get(self.criterion)  # unknown: did-you-mean error
        if crit.needs != "calibration":
            raise MoePruneError(f"--criterion {self.criterion} is {crit.needs}-based: it gives every task the same "
                                "plan. Choose a calibrated criterion (e.g. tcess, frequency, reap).")
        if self.key_layers < 1 or self.spread_windows < 1 or self.margin < 0:
            raise MoePruneError("--key-layers and the spread windows must be >= 1, --margin >= 0.")


def parse_ratios(text: str) -> tuple[tuple[float, ...], tuple[tuple[str, float], ...]]:
    """(ratios, recommended): "0.5,0.75" or "0.5..0.75" (`sweep.knee.parse_ratios`) -> ((0.5, 0.75), ()); a
    `moeprune sweep` ratios.json {task: ratio} -> (its distinct ratios, its (task, ratio) pairs)."""
    path = Path(text).expanduser()
    if text.endswith(".json"):
        if not path.is_file():
            raise MoePruneError(f"--ratios {text}: no such file (a ratios.json from `moeprune sweep`).")
        try:
            raw = json.loads(path.read_text())
            pairs = tuple((str(k), float(v)) for k, v in raw.items())
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
            raise MoePruneError(f"--ratios {text}: not a {{task: ratio}} JSON object ({e}).") from None
        if not pairs:
            raise MoePruneError(f"--ratios {text} recommends no ratio for any task; give ratios like 0.5,0.75.")
        return tuple(sweep_ratios(",".join(str(r) for _, r in pairs))), pairs
    return tuple(sweep_ratios(text)), ()


def build_pack(model: str | Path, calib: CalibrateOptions, opts: BuildOptions, out: str | Path,
               overwrite: bool = False, stats: ExpertStats | None = None) -> TaskPack:
    """Write the pack to `out`. `stats`: the statistics of an earlier calibration run of these `calib` sets on this
    model (same set names), used instead of a new run."""
    out_path = check_output(out, [Path(model)], overwrite)
    ckpt = Checkpoint.open(model)
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    if ckpt.quantization is not None:
        raise MoePruneError(f"{ckpt.path} is quantized ({ckpt.quantization.method}); a task pack loads experts "
                            "byte-range by byte-range from unquantized shards only.")
    if len(calib.calib) < 2:
        raise MoePruneError("a task pack needs at least two tasks to choose between: give one --calib NAME=PATH "
                            "per task.")
    unknown = sorted({t for t, _ in opts.recommended} - {c.partition("=")[0].strip() for c in calib.calib})
    if unknown:
        raise MoePruneError(f"--ratios recommends ratios for {unknown}, which no --calib names; rebuild ratios.json "
                            "with the same tasks or add their --calib.")
    moe = adapter.moe_layers()
    if opts.key_layers > len(moe):
        raise MoePruneError(f"--key-layers {opts.key_layers}: the model has {len(moe)} MoE layers.")
    for r in opts.ratios:
        drop_count(r, adapter.num_experts, adapter.routing())
    key_layers = moe[: opts.key_layers]
    ckpt, adapter, sets = prepare(model, calib)  # every set read and tokenised
    if stats is None:
        stats = calibrate(ckpt.path, calib, sets=sets)  # the one calibration run
    elif sorted(stats.sets) != sorted(s.name for s in sets) or stats.num_experts != adapter.num_experts:
        raise MoePruneError(f"the given statistics hold sets {sorted(stats.sets)} of a {stats.num_experts}-expert "
                            f"model; the tasks are {[s.name for s in sets]} of {adapter.num_experts} experts.")
    keys = {s.name: stats_key(stats, s.name, key_layers) for s in sets}
    kind = adapter.routing().kind
    spread = key_spread(ckpt, sets, keys, key_layers, kind, opts.spread_windows)
    tasks = {}
    for s in sets:
        plans = {}
        for r in opts.ratios:
            d = make_plan(stats, opts.criterion, r, calib_set=[s.name]).to_dict()
            d.pop("scores", None)
            plans[ratio_key(r)] = d
        tasks[s.name] = TaskEntry(stats.tokens(s.name), keys[s.name].tolist(), spread[s.name], plans,
                                  dict(opts.recommended).get(s.name))
    pack = TaskPack(str(ckpt.path), fingerprint(ckpt), adapter.model_type, adapter.num_experts, opts.criterion,
                    [float(r) for r in opts.ratios], key_layers, kind, opts.margin, tasks,
                    checkpoint_relative=os.path.relpath(Path(ckpt.path).resolve(), Path(out_path).resolve()))
    with atomic_dir(out_path) as tmp:
        pack.save_into(tmp)
    logger.info("task pack written to %s: %d tasks × ratios %s (%s), keys from MoE layers %s", out_path,
                len(tasks), list(opts.ratios), opts.criterion, key_layers)
    return pack


def stats_key(stats: ExpertStats, name: str, key_layers: list[int]) -> torch.Tensor:
    """[K·E] mean router distribution of set `name` over its calibration tokens."""
    blocks = [stats.sets[name][layer].sums["prob_sum"] / stats.sets[name][layer].sums["tokens"]
              for layer in key_layers]  # K × [E]
    return torch.cat(blocks).double()


def key_spread(ckpt, sets: list[CalibSet], keys: dict[str, torch.Tensor], key_layers: list[int], kind: str,
               windows: int) -> dict[str, dict[str, float]]:
    """Per task: its first `windows` calibration windows embedded one by one; their cosine to the task's key
    (mean, min) and their retrieval margin over the nearest other task (min, 5th percentile; negative = a window
    nearer another task)."""
    embedder = KeyEmbedder(ckpt, key_layers, kind)
    out = {}
    for s in sets:
        q = embedder.keys(s.input_ids[:windows], s.attention_mask[:windows])  # [W, K·E]
        own, margins = [], []
        for row in q:
            m = nearest(keys, row)
            own.append(m.similarities[s.name])
            others = [v for k, v in m.similarities.items() if k != s.name]
            margins.append(m.similarities[s.name] - max(others))
        mg = torch.tensor(margins)
        out[s.name] = {"windows": len(own), "self_cos_mean": float(sum(own) / len(own)), "self_cos_min": min(own),
                       "margin_min": float(mg.min()), "margin_p05": float(mg.quantile(0.05))}
    return out
