"""`MergePlan`: which experts each MoE layer merges into one — plain data, saved as JSON.

    {"format": "moeprune.merge/1", "model_type": "qwen3_moe", "num_experts": 16, "method": "msmoe",
     "ratio": 0.25, "merge": "average", "router": "dominant",
     "groups": {"1": [[0, 5], [1], [2, 9, 11], ...]}, "weights": {"1": [[0.31, 0.02], [0.1], ...]}}

Each group lists original expert indices, its *dominant* first (the member whose router row survives with the
`dominant` strategy, and the alignment anchor); groups are ordered by their dominant, ascending, and merged
expert g is group g. `weights` are the members' usage frequencies (merge and router weights). `merge`
is average | svd (`rank`) | dern (`threshold`; for dern the non-first members are the dropped experts, recorded
with the survivor most similar by router logits, and their neurons may go to any survivor). Every expert of
the layer appears in exactly one group. `as_prune_plan()` (the dominants) carries the structural checks of
expert removal: one count for all layers, ≥ top-k, equal counts per router group; merging across router groups
(DeepSeek-V3 `n_group`) is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter
from moeprune.registry import Registry
from moeprune.select.plan import PrunePlan, read_plan_json, write_plan_json

MERGE_FORMAT = "moeprune.merge/1"
ROUTER_STRATEGIES: Registry[str] = Registry("router strategy", "dominant: the dominant's row; weighted: "
                                            "usage-weighted mean of the members' rows.")
for _s in ("dominant", "weighted"):
    ROUTER_STRATEGIES.register(_s, _s)


@dataclass
class MergePlan:
    groups: dict[int, list[list[int]]]
    num_experts: int
    weights: dict[int, list[list[float]]] = field(default_factory=dict)
    method: str = "manual"
    ratio: float | None = None
    model_type: str | None = None
    merge: str = "average"
    router: str = "dominant"
    rank: int | None = None  # svd merge only
    threshold: float = 0.4  # dern merge only: least cosine for a neuron segment to be recombined
    note: str | None = None  # e.g. adaptive per-layer counts padded to one count

    def __post_init__(self) -> None:
        if not self.weights:
            self.weights = {layer: [[1.0] * len(g) for g in gs] for layer, gs in self.groups.items()}
        ROUTER_STRATEGIES.get(self.router)

    @property
    def layers(self) -> list[int]:
        return sorted(self.groups)

    def dominants(self, layer: int) -> list[int]:
        return [g[0] for g in self.groups[layer]]

    def as_prune_plan(self) -> PrunePlan:
        return PrunePlan({layer: self.dominants(layer) for layer in self.layers}, self.num_experts,
                         method=self.method, ratio=self.ratio, model_type=self.model_type)

    def sha256(self) -> str:
        payload = json.dumps({"groups": {str(k): v for k, v in sorted(self.groups.items())},
                              "weights": {str(k): v for k, v in sorted(self.weights.items())},
                              "merge": self.merge, "router": self.router, "rank": self.rank,
                              "threshold": self.threshold}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def validate(self, adapter: MoEAdapter) -> None:
        E = adapter.num_experts
        for layer, groups in sorted(self.groups.items()):
            members = [j for g in groups for j in g]
            if sorted(members) != list(range(E)):
                missing = sorted(set(range(E)) - set(members))
                twice = sorted({j for j in members if members.count(j) > 1})
                raise MoePruneError(f"layer {layer}: every expert 0..{E - 1} must be in exactly one merge group "
                                    f"(missing {missing}, repeated {twice}).")
            if any(not g for g in groups):
                raise MoePruneError(f"layer {layer}: a merge group is empty.")
            dom = [g[0] for g in groups]
            if dom != sorted(dom):
                raise MoePruneError(f"layer {layer}: order the groups by their dominant (first) member, ascending; "
                                    f"got dominants {dom}.")
            w = self.weights.get(layer)
            if w is None or [len(x) for x in w] != [len(g) for g in groups]:
                raise MoePruneError(f"layer {layer}: weights must give one usage number per group member.")
            if any(v < 0 for x in w for v in x) or any(sum(x) <= 0 for x in w):
                raise MoePruneError(f"layer {layer}: merge weights must be >= 0 with a positive sum per group.")
            routing = adapter.routing()
            if routing.group_limited:
                size = E // routing.n_group
                mixed = [g for g in groups if len({j // size for j in g}) > 1]
                if mixed:
                    raise MoePruneError(f"layer {layer}: groups {mixed} merge experts of different router groups "
                                        f"({routing.n_group} groups of {size}); merge inside a router group.")
        self.as_prune_plan().validate(adapter)
        if self.merge == "svd" and self.rank is not None and self.rank < 1:
            raise MoePruneError(f"--rank {self.rank} must be >= 1.")
        if self.merge == "dern" and not -1.0 <= self.threshold <= 1.0:
            raise MoePruneError(f"--threshold {self.threshold} is a cosine: give a number in [-1, 1].")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {"format": MERGE_FORMAT, "model_type": self.model_type, "num_experts": self.num_experts,
                "method": self.method, "ratio": self.ratio, "merge": self.merge, "router": self.router,
                "rank": self.rank, "threshold": self.threshold, "note": self.note,
                "groups": {str(k): v for k, v in sorted(self.groups.items())},
                "weights": {str(k): v for k, v in sorted(self.weights.items())}}

    def save(self, path: str | Path) -> Path:
        return write_plan_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> MergePlan:
        return cls.from_dict(read_plan_json(path, "merge plan"), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "merge plan") -> MergePlan:
        if raw.get("format") != MERGE_FORMAT or not isinstance(raw.get("groups"), dict):
            raise MoePruneError(f"{source}: not a {MERGE_FORMAT} plan (needs 'format' and 'groups').")
        try:
            groups = {int(k): [[int(j) for j in g] for g in v] for k, v in raw["groups"].items()}
            weights = {int(k): [[float(x) for x in g] for g in v] for k, v in (raw.get("weights") or {}).items()}
        except (TypeError, ValueError) as e:
            raise MoePruneError(f"{source}: groups/weights must map layer -> list of lists of numbers ({e}).") from e
        return cls(groups, int(raw["num_experts"]), weights, raw.get("method", "manual"), raw.get("ratio"),
                   raw.get("model_type"), raw.get("merge", "average"), raw.get("router", "dominant"),
                   raw.get("rank"), float(raw.get("threshold", 0.4)), raw.get("note"))
