"""`PrunePlan`: which experts each MoE layer keeps — plain data, saved as JSON.

    {"format": "moeprune.plan/1", "model_type": "qwen3_moe", "num_experts": 16, "method": "aimer",
     "ratio": 0.25, "kept_experts": {"1": [0, 2, 3, ...], "2": [...]}}

`kept_experts` maps each MoE decoder-layer index to the *original* indices of the experts kept, ascending;
surviving experts are renumbered 0..E'-1 in that order. `validate` checks a plan against a model before any
surgery: every MoE layer present once, indices in range and unique, at least top-k kept (and, for group-limited
routers, the same count in every group and enough per group), and one count for all layers (stock configs hold a
single expert count). Plans made by `method: auto` also carry an optional "auto" object (the candidates, their
judged block errors and NLL, the choice and the runner-up margins; `select/auto.py`); plans without it still load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter

PLAN_FORMAT = "moeprune.plan/1"


@dataclass
class PrunePlan:
    kept_experts: dict[int, list[int]]
    num_experts: int
    method: str = "manual"
    ratio: float | None = None
    model_type: str | None = None
    scores: dict[int, list[float]] | None = field(default=None, repr=False)
    policy: str = "uniform"
    protected: dict[int, list[int]] | None = None  # experts the policy was not allowed to drop
    padded: dict[int, list[int]] | None = None  # kept only so stock configs load it (non-uniform selection)
    note: str | None = None  # one line on how a non-uniform selection was saved
    auto: dict | None = field(default=None, repr=False)  # method auto: candidates, judged errors, choice, margins
    clusters: dict[int, list[list[int]]] | None = field(default=None, repr=False)  # stun: clusters, kept first

    # ------------------------------------------------------------------ derived
    @property
    def layers(self) -> list[int]:
        return sorted(self.kept_experts)

    def dropped(self, layer: int) -> list[int]:
        kept = set(self.kept_experts[layer])
        return [j for j in range(self.num_experts) if j not in kept]

    @property
    def kept_count(self) -> int:
        counts = {len(v) for v in self.kept_experts.values()}
        return counts.pop() if len(counts) == 1 else -1

    def sha256(self) -> str:
        payload = json.dumps({str(k): v for k, v in sorted(self.kept_experts.items())}, sort_keys=True)
        return hashlib.sha256(f"{self.num_experts}:{payload}".encode()).hexdigest()

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = {
            "format": PLAN_FORMAT,
            "model_type": self.model_type,
            "num_experts": self.num_experts,
            "method": self.method,
            "ratio": self.ratio,
            "kept_experts": {str(k): list(v) for k, v in sorted(self.kept_experts.items())},
        }
        if self.policy != "uniform":
            d["policy"] = self.policy
        for key in ("protected", "padded"):
            value = getattr(self, key)
            if value:
                d[key] = {str(k): list(v) for k, v in sorted(value.items())}
        if self.note:
            d["note"] = self.note
        if self.auto:
            d["auto"] = self.auto
        if self.clusters:
            d["clusters"] = {str(k): [list(c) for c in v] for k, v in sorted(self.clusters.items())}
        if self.scores is not None:
            d["scores"] = {str(k): [float(s) for s in v] for k, v in sorted(self.scores.items())}
        return d

    def save(self, path: str | Path) -> Path:
        return write_plan_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        return cls.from_dict(read_plan_json(path, "plan"), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "plan") -> PrunePlan:
        if not isinstance(raw, dict) or not isinstance(raw.get("kept_experts"), dict):
            raise MoePruneError(f"{source}: missing the 'kept_experts' object ({{\"<layer>\": [kept indices]}}).")
        if raw.get("format", PLAN_FORMAT) != PLAN_FORMAT and "moeprune_version" not in raw:
            raise MoePruneError(f"{source}: format {raw.get('format')!r} is not {PLAN_FORMAT!r}; re-make the plan.")
        if not isinstance(raw.get("num_experts"), int):
            raise MoePruneError(f"{source}: missing 'num_experts' (the model's original routed-expert count).")
        kept: dict[int, list[int]] = {}
        for key, value in raw["kept_experts"].items():
            try:
                layer = int(key)
            except ValueError:
                raise MoePruneError(f"{source}: layer key {key!r} is not a decoder-layer index.") from None
            if layer in kept:
                raise MoePruneError(f"{source}: layer {layer} appears twice in kept_experts.")
            if not isinstance(value, list) or not all(isinstance(j, int) and not isinstance(j, bool) for j in value):
                raise MoePruneError(f"{source}: kept_experts[{key!r}] must be a list of integer expert indices.")
            kept[layer] = value
        scores = raw.get("scores")
        return cls(
            kept_experts=kept,
            num_experts=raw["num_experts"],
            method=raw.get("method", "manual"),
            ratio=raw.get("ratio"),
            model_type=raw.get("model_type"),
            scores={int(k): v for k, v in scores.items()} if isinstance(scores, dict) else None,
            policy=raw.get("policy", "uniform"),
            protected=_layer_lists(raw.get("protected"), "protected", source),
            padded=_layer_lists(raw.get("padded"), "padded", source),
            note=raw.get("note"),
            auto=raw.get("auto") if isinstance(raw.get("auto"), dict) else None,  # absent from older plans
            clusters=({int(k): [list(map(int, c)) for c in v] for k, v in raw["clusters"].items()}
                      if isinstance(raw.get("clusters"), dict) else None),
        )

    # ------------------------------------------------------------------ validation
    def validate(self, adapter: MoEAdapter) -> None:
        """Raise MoePruneError unless this plan can be applied to (and loaded by stock configs for) the model."""
        E = adapter.num_experts
        if self.num_experts != E:
            raise MoePruneError(f"plan was made for {self.num_experts} experts per layer but the model has {E}.")
        if self.model_type and adapter.model_type and self.model_type != adapter.model_type:
            raise MoePruneError(f"plan was made for model_type {self.model_type!r}, not {adapter.model_type!r}.")
        expected = set(adapter.moe_layers())
        missing, extra = sorted(expected - set(self.kept_experts)), sorted(set(self.kept_experts) - expected)
        if missing:
            raise MoePruneError(f"plan has no entry for MoE layers {missing}; list every MoE layer {sorted(expected)}.")
        if extra:
            raise MoePruneError(f"plan names layers {extra} that are not MoE layers (MoE layers: {sorted(expected)}).")
        routing = adapter.routing()
        for layer, kept in sorted(self.kept_experts.items()):
            _check_layer(layer, kept, E, routing)
        if self.kept_count < 0:
            counts = {layer: len(v) for layer, v in sorted(self.kept_experts.items())}
            raise MoePruneError(
                f"plan keeps different expert counts per layer {counts}; stock configs hold one count for all "
                "layers. Keep the same number in every layer (uniform policy)."
            )


def _check_layer(layer: int, kept: list[int], E: int, routing) -> None:
    where = f"layer {layer}"
    if len(set(kept)) != len(kept):
        dup = sorted({j for j in kept if kept.count(j) > 1})
        raise MoePruneError(f"{where}: experts {dup} are listed more than once in kept_experts.")
    bad = [j for j in kept if not 0 <= j < E]
    if bad:
        raise MoePruneError(f"{where}: expert indices {bad} are outside 0..{E - 1}.")
    if kept != sorted(kept):
        raise MoePruneError(f"{where}: kept_experts must be ascending (they are renumbered in that order); sort it.")
    if len(kept) < routing.top_k:
        raise MoePruneError(
            f"{where}: keeps {len(kept)} experts but the router selects top-{routing.top_k}; keep at least "
            f"{routing.top_k}."
        )
    if routing.group_limited:
        if E % routing.n_group:
            raise MoePruneError(f"{where}: {E} experts do not split into {routing.n_group} equal router groups.")
        size = E // routing.n_group
        per_group = [sum(1 for j in kept if j // size == g) for g in range(routing.n_group)]
        if len(set(per_group)) != 1:
            raise MoePruneError(
                f"{where}: the router is group-limited ({routing.n_group} groups of {size}) and the plan keeps "
                f"{per_group} experts per group; keep the same number in every group (per-group policy)."
            )
        need = routing.min_experts_per_group()
        if per_group[0] < need:
            raise MoePruneError(
                f"{where}: keeps {per_group[0]} experts per group but the group-limited router needs at least "
                f"{need} per group (top-2 group scores, top-{routing.top_k} from {routing.topk_group} groups)."
            )


def _layer_lists(value, key: str, source: str) -> dict[int, list[int]] | None:
    if value is None:
        return None
    try:
        return {int(k): [int(j) for j in v] for k, v in value.items()}
    except (AttributeError, TypeError, ValueError):
        raise MoePruneError(f"{source}: '{key}' must map layer indices to lists of expert indices.") from None


def check_plan_path(path: str | Path) -> None:
    """Refuse a plan path whose folder does not exist (checked before scoring, so no work is lost)."""
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise MoePruneError(f"cannot write the plan to {path}: folder {parent} does not exist; create it first.")


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if k in seen:
            raise MoePruneError(f"plan JSON has the key {k!r} twice (a layer listed twice?); keep one.")
        seen[k] = v
    return seen


def write_plan_json(path: str | Path, data: dict) -> Path:
    """Write a plan's JSON atomically (temporary sibling, then rename) after checking the path."""
    path = Path(path)
    check_plan_path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path


def read_plan_json(path: str | Path, what: str) -> dict:
    """A plan file's JSON object; clear errors for a missing file, invalid JSON or duplicate keys."""
    path = Path(path)
    if not path.is_file():
        raise MoePruneError(f"{what} file {path} does not exist. Make one with `moeprune plan MODEL ... --out`.")
    try:
        return json.loads(path.read_text(), object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise MoePruneError(f"{what} {path} is not valid JSON: {e}") from e
