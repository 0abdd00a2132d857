"""`MergePlan`: which experts each MoE layer merges into one — plain data, saved as JSON.

    {"format": "moeprune.merge/1", "model_type": "qwen3_moe", "num_experts": 16, "method": "msmoe",
     "ratio": 0.25, "merge": "average", "router": "dominant",
     "groups": {"1": [[0, 5], [1], [2, 9, 11], ...]}, "weights": {"1": [[0.31, 0.02], [0.1], ...]}}

Each group lists original expert indices, its *dominant* first (the member whose router row survives with the
`dominant` strategy, and the alignment anchor); groups are ordered by their dominant, ascending, and merged
expert g is group g. `weights` are the members' usage frequencies (merge and router weights). `merge`
is average | svd (`rank`) | dern (`threshold`; for dern the non-first members are the dropped experts, recorded
with the survivor most similar by router logits, and their neurons may go to any survivor). A dern `threshold` is
one cosine, or one per layer ({"1": 0.31, "2": 0.27}: chosen from the data, `merge/dern_threshold.py`, with the
recombined fraction `recombine`), or null: no segment is recombined (`recombine` 0, the default, which needs no
similarity scan); `recombined` ({"1": [n, of]}) records how many of the dropped neuron segments met it
(informational: the merge reads only `threshold`). Every expert of
the layer appears in exactly one group. `as_prune_plan()` (the dominants) carries the structural checks of
expert removal: one count for all layers, ≥ top-k, equal counts per router group; merging across router groups
(DeepSeek-V3 `n_group`) is refused.

`from_dict`/`load` refuse a malformed plan (wrong types, shapes, names, indices) with a MoePruneError naming the
file and the offending key, layer and value; `check()` holds the model-independent checks and `validate(adapter)`
adds the model's: expert count, MoE layers, router groups, top-k.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.merge.plan_json import (
    check_partition,
    is_int,
    is_number,
    parse_groups,
    parse_recombined,
    parse_threshold,
    parse_weights,
    shorten,
    type_name,
)
from moeprune.models.base import MoEAdapter
from moeprune.registry import Registry
from moeprune.select.plan import PrunePlan, read_plan_json, write_plan_json

MERGE_FORMAT = "moeprune.merge/1"
ROUTER_STRATEGIES: Registry[str] = Registry("router strategy", "dominant: the dominant's row; weighted: "
                                            "usage-weighted mean of the members' rows.")
for _s in ("dominant", "weighted"):
    ROUTER_STRATEGIES.register(_s, _s)

PLAN_KEYS = ("format", "model_type", "num_experts", "method", "ratio", "merge", "router", "rank", "threshold",
             "recombine", "recombined", "note", "groups", "weights")


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
    # dern only: least cosine to recombine a segment (one, or per layer); None: recombine no segment
    threshold: float | dict[int, float] | None = 0.4
    recombine: float | None = None  # dern with a data-chosen threshold: the recombined fraction it was chosen for
    recombined: dict[int, list[int]] | None = None  # dern: [segments recombined, dropped segments] per layer
    note: str | None = None  # e.g. adaptive per-layer counts padded to one count
    source: str | None = field(default=None, repr=False, compare=False)  # where it was read from, for messages

    def __post_init__(self) -> None:
        if not self.weights:
            self.weights = {layer: [[1.0] * len(g) for g in gs] for layer, gs in self.groups.items()}
        ROUTER_STRATEGIES.get(self.router)

    @property
    def layers(self) -> list[int]:
        return sorted(self.groups)

    def threshold_of(self, layer: int | None) -> float | None:
        """The dern threshold of decoder layer `layer` (one cosine for all layers, or the layer's own; None: no
        segment is recombined)."""
        if not isinstance(self.threshold, dict):
            return self.threshold
        if layer not in self.threshold:
            raise MoePruneError(f"{self._where}the dern threshold has no cosine for layer {layer}; give one per "
                                f"merged layer {self.layers}.")
        return self.threshold[layer]

    def _threshold_json(self) -> float | dict[str, float] | None:
        t = self.threshold
        return {str(k): v for k, v in sorted(t.items())} if isinstance(t, dict) else t

    def dominants(self, layer: int) -> list[int]:
        return [g[0] for g in self.groups[layer]]

    def as_prune_plan(self) -> PrunePlan:
        return PrunePlan({layer: self.dominants(layer) for layer in self.layers}, self.num_experts,
                         method=self.method, ratio=self.ratio, model_type=self.model_type)

    def sha256(self) -> str:
        payload = json.dumps({"groups": {str(k): v for k, v in sorted(self.groups.items())},
                              "weights": {str(k): v for k, v in sorted(self.weights.items())},
                              "merge": self.merge, "router": self.router, "rank": self.rank,
                              "threshold": self._threshold_json()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    # ------------------------------------------------------------------ validation
    @property
    def _where(self) -> str:
        return f"{self.source if self.source else 'merge plan'}: "

    def check(self) -> None:
        """Model-independent checks: every layer's groups partition 0..num_experts-1 (bad indices named first),
        dominants ascending, one finite usage weight >= 0 per member with a positive sum per group, known merge
        and router names, rank >= 1 or None, threshold a cosine for dern."""
        from moeprune.merge.methods import MERGES  # lazy: methods imports this module

        w, E = self._where, self.num_experts
        for layer, groups in sorted(self.groups.items()):
            at = f"{w}layer {layer}"
            check_partition(groups, E, at)
            wl = self.weights.get(layer)
            if wl is None or [len(x) for x in wl] != [len(g) for g in groups]:
                raise MoePruneError(f"{at}: weights must give one usage number per group member (group sizes "
                                    f"{[len(g) for g in groups]}, weights {wl}).")
            if any(not is_number(v) for x in wl for v in x):
                raise MoePruneError(f"{at}: merge weights {wl} must be finite numbers.")
            if any(v < 0 for x in wl for v in x) or any(sum(x) <= 0 for x in wl):
                raise MoePruneError(f"{at}: merge weights must be >= 0 with a positive sum per group; got {wl}.")
        extra = sorted(set(self.weights) - set(self.groups))
        if extra:
            raise MoePruneError(f"{w}weights name layers {extra} that have no merge groups; remove them.")
        try:
            MERGES.get(self.merge)
            ROUTER_STRATEGIES.get(self.router)
        except MoePruneError as e:
            raise MoePruneError(f"{w}{e}") from None
        if self.merge == "svd" and self.rank is not None and (not is_int(self.rank) or self.rank < 1):
            raise MoePruneError(f"{w}--rank {self.rank} must be >= 1.")
        if self.merge == "dern":
            check_dern(self, w)
        elif self.threshold is None:
            raise MoePruneError(f"{w}'threshold' null (recombine no neuron segment) is a dern setting; this plan "
                                f"merges with {self.merge!r}: remove 'threshold' or give a number.")

    def validate(self, adapter: MoEAdapter) -> None:
        """Raise MoePruneError unless this plan can be applied to the model (checked before any surgery)."""
        w, E = self._where, adapter.num_experts
        if self.num_experts != E:
            raise MoePruneError(f"{w}made for {self.num_experts} experts per layer but the model has {E}; make the "
                                "plan for this model.")
        if self.model_type and adapter.model_type and self.model_type != adapter.model_type:
            raise MoePruneError(f"{w}made for model_type {self.model_type!r}, not {adapter.model_type!r}.")
        expected = sorted(adapter.moe_layers())
        missing, extra = sorted(set(expected) - set(self.groups)), sorted(set(self.groups) - set(expected))
        if missing:
            raise MoePruneError(f"{w}has no merge groups for MoE layers {missing}; give groups for every MoE layer "
                                f"{expected}.")
        if extra:
            raise MoePruneError(f"{w}has merge groups for layers {extra}, which are not MoE layers of this model "
                                f"(MoE layers: {expected}); remove them.")
        self.check()
        routing = adapter.routing()
        for layer, groups in sorted(self.groups.items()):
            if len(groups) < routing.top_k:
                raise MoePruneError(f"{w}layer {layer}: merges into {len(groups)} experts but the router selects "
                                    f"top-{routing.top_k}; keep at least {routing.top_k} groups.")
            if routing.group_limited:
                size = E // routing.n_group
                mixed = [g for g in groups if len({j // size for j in g}) > 1]
                if mixed:
                    raise MoePruneError(f"{w}layer {layer}: groups {mixed} merge experts of different router groups "
                                        f"({routing.n_group} groups of {size}); merge inside a router group.")
        counts = {layer: len(gs) for layer, gs in sorted(self.groups.items())}
        if len(set(counts.values())) > 1:
            raise MoePruneError(f"{w}merges into different expert counts per layer {counts}; stock configs hold one "
                                "count for all layers. Give every layer the same number of groups.")
        try:
            self.as_prune_plan().validate(adapter)  # the structural checks of expert removal (router groups)
        except MoePruneError as e:
            raise MoePruneError(f"{w}{e} (the groups' dominants are the experts kept)") from None

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        out = {"format": MERGE_FORMAT, "model_type": self.model_type, "num_experts": self.num_experts,
                "method": self.method, "ratio": self.ratio, "merge": self.merge, "router": self.router,
                "rank": self.rank, "threshold": self._threshold_json(), "note": self.note,
                "groups": {str(k): v for k, v in sorted(self.groups.items())},
                "weights": {str(k): v for k, v in sorted(self.weights.items())}}
        if self.recombine is not None:
            out["recombine"] = self.recombine
        if self.recombined is not None:
            out["recombined"] = {str(k): v for k, v in sorted(self.recombined.items())}
        return out

    def save(self, path: str | Path) -> Path:
        return write_plan_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> MergePlan:
        source = f"merge plan {path}"
        try:
            raw = read_plan_json(path, "merge plan")
        except MoePruneError as e:
            raise (e if str(path) in str(e) else MoePruneError(f"{source}: {e}")) from None
        except UnicodeDecodeError as e:
            raise MoePruneError(f"{source} is not UTF-8 JSON text ({e}); give the .json file a merge plan was "
                                "saved to.") from None
        except RecursionError:
            raise MoePruneError(f"{source} nests its JSON too deeply to be a merge plan.") from None
        except OSError as e:
            raise MoePruneError(f"cannot read {source}: {e.strerror or e}.") from None
        return cls.from_dict(raw, source=source)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "merge plan") -> MergePlan:
        """A plan from its JSON object; every malformed field is refused with a MoePruneError that names `source`,
        the key (and layer / group) and the value, and says what to write instead."""
        from moeprune.merge.methods import MERGES  # lazy: methods imports this module

        if not isinstance(raw, dict):
            raise MoePruneError(f"{source}: a merge plan is a JSON object ({{\"format\": \"{MERGE_FORMAT}\", "
                                f"\"num_experts\": ..., \"groups\": ...}}), not {type_name(raw)}.")
        if raw.get("format") != MERGE_FORMAT:
            hint = (" It is an expert-removal plan (moeprune.plan/1): apply it without merging."
                    if "kept_experts" in raw else f" Set \"format\": \"{MERGE_FORMAT}\" or re-make the plan.")
            raise MoePruneError(f"{source}: not a {MERGE_FORMAT} plan ('format' is {raw.get('format')!r}).{hint}")
        unknown = [k for k in raw if k not in PLAN_KEYS]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), PLAN_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MoePruneError(f"{source}: unknown key {unknown[0]!r}{hint}; a merge plan holds "
                                f"{', '.join(PLAN_KEYS)} (free text goes in 'note').")
        if "num_experts" not in raw:
            raise MoePruneError(f"{source}: missing 'num_experts' (the model's original routed-expert count).")
        E = raw["num_experts"]
        if not is_int(E) or E < 1:
            raise MoePruneError(f"{source}: 'num_experts' must be the model's original routed-expert count, a "
                                f"positive whole number; got {shorten(E)}.")
        groups = parse_groups(raw.get("groups"), E, source)
        weights = parse_weights(raw.get("weights"), groups, source)
        merge, router = raw.get("merge", "average"), raw.get("router", "dominant")
        for key, value, registry in (("merge", merge, MERGES), ("router", router, ROUTER_STRATEGIES)):
            if not isinstance(value, str):
                raise MoePruneError(f"{source}: '{key}' must be a name ({', '.join(registry)}); got {shorten(value)}.")
            try:
                registry.get(value)
            except MoePruneError as e:
                raise MoePruneError(f"{source}: '{key}': {e}") from None
        rank = raw.get("rank")
        if rank is not None and (not is_int(rank) or rank < 1):
            raise MoePruneError(f"{source}: 'rank' must be a positive whole number (shared directions per role of the "
                                f"svd merge) or null for full rank; got {shorten(rank)}.")
        threshold = parse_threshold(raw.get("threshold", 0.4), source)
        recombine = raw.get("recombine")
        if recombine is not None and not is_number(recombine):
            raise MoePruneError(f"{source}: 'recombine' must be a number (the fraction of dropped neuron segments the "
                                f"dern threshold was chosen to recombine) or null; got {shorten(recombine)}.")
        recombined = parse_recombined(raw.get("recombined"), source)
        ratio = raw.get("ratio")
        if ratio is not None and not is_number(ratio):
            raise MoePruneError(f"{source}: 'ratio' must be a number or null; got {shorten(ratio)}.")
        for key in ("method", "model_type", "note"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise MoePruneError(f"{source}: '{key}' must be a string or null; got {shorten(raw[key])}.")
        plan = cls(groups, E, weights, raw.get("method") or "manual", ratio, raw.get("model_type"), merge, router, rank,
                   threshold, None if recombine is None else float(recombine), recombined, raw.get("note"),
                   source=source)
        plan.check()
        return plan


def check_dern(plan: MergePlan, w: str) -> None:
    """A dern plan's threshold: one cosine in [-1, 1], one per merged layer, or None (no segment recombined, which a
    `recombine` fraction above 0 contradicts); `recombined` [n <= of] per layer."""
    t = plan.threshold
    if plan.recombine is not None and not (is_number(plan.recombine) and 0.0 <= plan.recombine <= 1.0):
        raise MoePruneError(f"{w}'recombine' {plan.recombine} is a fraction of segments: give a number in [0, 1].")
    if t is None and plan.recombine:
        raise MoePruneError(f"{w}threshold null recombines no neuron segment, but 'recombine' asks for "
                            f"{plan.recombine:g} of them; give the cosine(s) chosen for it, or recombine 0.")
    per_layer = {} if t is None else t if isinstance(t, dict) else {None: t}
    bad = {k: v for k, v in per_layer.items() if not (is_number(v) and -1.0 <= v <= 1.0)}
    if bad:
        k, v = next(iter(bad.items()))
        at = "" if k is None else f" (layer {k})"
        raise MoePruneError(f"{w}--threshold {v}{at} is a cosine: give a number in [-1, 1].")
    if isinstance(t, dict) and sorted(t) != plan.layers:
        raise MoePruneError(f"{w}the dern threshold gives cosines for layers {sorted(t)}; give one for every merged "
                            f"layer {plan.layers} (or one number for all).")
    for layer, nm in (plan.recombined or {}).items():
        if layer not in plan.groups or len(nm) != 2 or not all(is_int(x) for x in nm) or not 0 <= nm[0] <= nm[1]:
            raise MoePruneError(f"{w}recombined[{layer}] = {nm}: give [recombined, dropped segments] (whole numbers, "
                                "recombined <= dropped) for a merged layer.")
    moved = sorted(layer for layer, nm in (plan.recombined or {}).items() if nm[0])
    if t is None and moved:
        raise MoePruneError(f"{w}threshold null recombines no neuron segment, but 'recombined' counts some in layers "
                            f"{moved}; remove 'recombined' or give the cosine(s) that recombined them.")
