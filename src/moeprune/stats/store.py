"""`ExpertStats`: routed statistics of one model, per calibration set and MoE layer, saved as `.safetensors`.

File layout: one float64 tensor per (set, layer, field) named `"<set>/<layer>/<field>"`, and the safetensors
metadata key `"moeprune"` holding JSON: format, model_type, num_experts, top_k, routing kind, MoE layers,
router fingerprint (sha256 over every router's weights, so stats of another model cannot be merged or used by
mistake), source model, moeprune version, and per set the calibration data description (source, content sha256,
sequences, tokens). Two files of the same model merge by addition (maxima by max): sets of the same name add up,
sets of different names sit side by side. The grouping fields (router-logit Gram, probe outputs; see
`stats.routed`) are absent from files written before merging existed: such files load with zero probes, and
merge grouping that needs them asks for a new `calibrate` run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.models.routing import RoutingSpec
from moeprune.stats.routed import FIELDS, GROUPING_FIELDS, RoutedStats, field_shape

STATS_FORMAT = "moeprune.stats/1"
IDENTITY = ("model_type", "num_experts", "top_k", "layers", "router_sha256")


@dataclass
class ExpertStats:
    model_type: str
    num_experts: int
    top_k: int
    layers: list[int]
    router_sha256: str
    sets: dict[str, dict[int, RoutedStats]]
    meta: dict[str, Any] = field(default_factory=dict)  # routing, model, version, calibration per set

    # ------------------------------------------------------------------ views
    def combined(self, names: list[str] | None = None) -> dict[int, RoutedStats]:
        """Per-layer stats of the union of `names` (default: every set)."""
        names = list(self.sets) if names is None else names
        missing = [n for n in names if n not in self.sets]
        if missing:
            raise MoePruneError(f"calibration set(s) {missing} are not in these statistics; they hold "
                                f"{sorted(self.sets)}. Choose with --calib-set.")
        out = {layer: RoutedStats(self.num_experts) for layer in self.layers}
        for name in names:
            out = {layer: out[layer].merge(self.sets[name][layer]) for layer in self.layers}
        return out

    def tokens(self, name: str) -> int:
        return int(self.sets[name][self.layers[0]].sums["tokens"].item()) if self.layers else 0

    # ------------------------------------------------------------------ merge
    def merge(self, other: ExpertStats) -> ExpertStats:
        """Statistics of both data sets together (same model required)."""
        for key in IDENTITY:
            if getattr(self, key) != getattr(other, key):
                raise MoePruneError(f"cannot merge statistics of different models: {key} is "
                                    f"{getattr(self, key)!r} in one file and {getattr(other, key)!r} in the other.")
        sets = {name: dict(layers) for name, layers in self.sets.items()}
        calib = {name: list(v) for name, v in self.meta.get("calibration", {}).items()}
        for name, layers in other.sets.items():
            if name in sets:
                seen = {d.get("sha256") for d in calib.get(name, [])}
                if any(d.get("sha256") in seen for d in other.meta.get("calibration", {}).get(name, [])):
                    logger.warning("set %r: the same calibration data is in both files; its tokens count twice", name)
                sets[name] = {layer: sets[name][layer].merge(layers[layer]) for layer in self.layers}
            else:
                sets[name] = dict(layers)
            calib.setdefault(name, []).extend(other.meta.get("calibration", {}).get(name, []))
        return ExpertStats(self.model_type, self.num_experts, self.top_k, list(self.layers), self.router_sha256,
                           sets, {**self.meta, "calibration": calib})

    # ------------------------------------------------------------------ files
    def header(self) -> dict[str, Any]:
        return {"format": STATS_FORMAT, **{k: getattr(self, k) for k in IDENTITY}, **self.meta,
                "sets": list(self.sets)}

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        tensors = {f"{name}/{layer}/{f}": t.contiguous() for name, layers in self.sets.items()
                   for layer, st in layers.items() for f, t in st.sums.items()}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata={"moeprune": json.dumps(self.header())})
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExpertStats:
        path = Path(path)
        if not path.is_file():
            raise MoePruneError(f"statistics file {path} does not exist; make one with `moeprune calibrate`.")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("moeprune", "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, RuntimeError) as e:
            raise MoePruneError(f"{path} is not a readable safetensors statistics file ({e}).") from e
        if not isinstance(header, dict) or header.get("format") != STATS_FORMAT:
            raise MoePruneError(f"{path} is not a moeprune statistics file ({STATS_FORMAT}); make one with "
                                "`moeprune calibrate`.")
        E, layers = header["num_experts"], header["layers"]
        sets: dict[str, dict[int, RoutedStats]] = {}
        for name in header["sets"]:
            sets[name] = {}
            for layer in layers:
                sums = {}
                for f in FIELDS:
                    t = tensors.get(f"{name}/{layer}/{f}")
                    if t is None and f in GROUPING_FIELDS:  # file written before merging existed: no probes
                        continue
                    hidden = t.shape[-1] if f == "out_sum" and t is not None and t.dim() == 2 else 0
                    if t is None or tuple(t.shape) != field_shape(f, E, hidden):
                        raise MoePruneError(f"{path}: tensor {name}/{layer}/{f} is missing or has the wrong shape; "
                                            "the file is damaged or from another version. Re-run calibrate.")
                    sums[f] = t.double()
                sets[name][layer] = RoutedStats(E, sums)
        meta = {k: v for k, v in header.items() if k not in (*IDENTITY, "format", "sets")}
        return cls(header["model_type"], E, header["top_k"], list(layers), header["router_sha256"], sets, meta)


def check_stats_output(path: str | Path, overwrite: bool) -> Path:
    """Refuse a bad --out for statistics before any work."""
    from moeprune.io.atomic import check_output_file

    return check_output_file(path, ".safetensors", overwrite)


class StatsView:
    """What a statistics file knows about its model, shaped like the adapter calls planning makes
    (num_experts, top_k, model_type, moe_layers(), routing()), so a plan can be made without the checkpoint."""

    def __init__(self, stats: ExpertStats):
        self.stats = stats
        self.num_experts, self.top_k, self.model_type = stats.num_experts, stats.top_k, stats.model_type
        try:
            self._routing = RoutingSpec(**stats.meta["routing"])
        except (KeyError, TypeError, ValueError) as e:
            raise MoePruneError(f"statistics file lacks a valid routing description ({e}); re-run calibrate.") from e

    def moe_layers(self) -> list[int]:
        return list(self.stats.layers)

    def routing(self) -> RoutingSpec:
        return self._routing
