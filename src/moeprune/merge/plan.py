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
recombined fraction `recombine`); `recombined` ({"1": [n, of]}) records how many of the dropped neuron segments
met it (informational: the merge reads only `threshold`). Every expert of
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
import math
from dataclasses import dataclass, field
from numbers import Integral, Real
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
    threshold: float | dict[int, float] = 0.4  # dern only: least cosine to recombine a segment (one, or per layer)
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

    def threshold_of(self, layer: int | None) -> float:
        """The dern threshold of decoder layer `layer` (one cosine for all layers, or the layer's own)."""
        if not isinstance(self.threshold, dict):
            return self.threshold
        if layer not in self.threshold:
            raise MoePruneError(f"{self._where}the dern threshold has no cosine for layer {layer}; give one per "
                                f"merged layer {self.layers}.")
        return self.threshold[layer]

    def _threshold_json(self) -> float | dict[str, float]:
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
            _check_partition(groups, E, at)
            wl = self.weights.get(layer)
            if wl is None or [len(x) for x in wl] != [len(g) for g in groups]:
                raise MoePruneError(f"{at}: weights must give one usage number per group member (group sizes "
                                    f"{[len(g) for g in groups]}, weights {wl}).")
            if any(not _is_number(v) for x in wl for v in x):
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
        if self.merge == "svd" and self.rank is not None and (not _is_int(self.rank) or self.rank < 1):
            raise MoePruneError(f"{w}--rank {self.rank} must be >= 1.")
        if self.merge == "dern":
            _check_dern(self, w)

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
                                f"\"num_experts\": ..., \"groups\": ...}}), not {_kind(raw)}.")
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
        if not _is_int(E) or E < 1:
            raise MoePruneError(f"{source}: 'num_experts' must be the model's original routed-expert count, a "
                                f"positive whole number; got {_short(E)}.")
        groups = _parse_groups(raw.get("groups"), E, source)
        weights = _parse_weights(raw.get("weights"), groups, source)
        merge, router = raw.get("merge", "average"), raw.get("router", "dominant")
        for key, value, registry in (("merge", merge, MERGES), ("router", router, ROUTER_STRATEGIES)):
            if not isinstance(value, str):
                raise MoePruneError(f"{source}: '{key}' must be a name ({', '.join(registry)}); got {_short(value)}.")
            try:
                registry.get(value)
            except MoePruneError as e:
                raise MoePruneError(f"{source}: '{key}': {e}") from None
        rank = raw.get("rank")
        if rank is not None and (not _is_int(rank) or rank < 1):
            raise MoePruneError(f"{source}: 'rank' must be a positive whole number (shared directions per role of the "
                                f"svd merge) or null for full rank; got {_short(rank)}.")
        threshold = _parse_threshold(raw.get("threshold", 0.4), source)
        recombine = raw.get("recombine")
        if recombine is not None and not _is_number(recombine):
            raise MoePruneError(f"{source}: 'recombine' must be a number (the fraction of dropped neuron segments the "
                                f"dern threshold was chosen to recombine) or null; got {_short(recombine)}.")
        recombined = _parse_recombined(raw.get("recombined"), source)
        ratio = raw.get("ratio")
        if ratio is not None and not _is_number(ratio):
            raise MoePruneError(f"{source}: 'ratio' must be a number or null; got {_short(ratio)}.")
        for key in ("method", "model_type", "note"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise MoePruneError(f"{source}: '{key}' must be a string or null; got {_short(raw[key])}.")
        plan = cls(groups, E, weights, raw.get("method") or "manual", ratio, raw.get("model_type"), merge, router, rank,
                   threshold, None if recombine is None else float(recombine), recombined, raw.get("note"),
                   source=source)
        plan.check()
        return plan


def _check_dern(plan: MergePlan, w: str) -> None:
    """A dern plan's threshold: one cosine in [-1, 1], or one per merged layer; `recombined` [n <= of] per layer."""
    t = plan.threshold
    per_layer = t if isinstance(t, dict) else {None: t}
    bad = {k: v for k, v in per_layer.items() if not (_is_number(v) and -1.0 <= v <= 1.0)}
    if bad:
        k, v = next(iter(bad.items()))
        at = "" if k is None else f" (layer {k})"
        raise MoePruneError(f"{w}--threshold {v}{at} is a cosine: give a number in [-1, 1].")
    if isinstance(t, dict) and sorted(t) != plan.layers:
        raise MoePruneError(f"{w}the dern threshold gives cosines for layers {sorted(t)}; give one for every merged "
                            f"layer {plan.layers} (or one number for all).")
    if plan.recombine is not None and not (_is_number(plan.recombine) and 0.0 <= plan.recombine <= 1.0):
        raise MoePruneError(f"{w}'recombine' {plan.recombine} is a fraction of segments: give a number in [0, 1].")
    for layer, nm in (plan.recombined or {}).items():
        if layer not in plan.groups or len(nm) != 2 or not all(_is_int(x) for x in nm) or not 0 <= nm[0] <= nm[1]:
            raise MoePruneError(f"{w}recombined[{layer}] = {nm}: give [recombined, dropped segments] (whole numbers, "
                                "recombined <= dropped) for a merged layer.")


def _parse_threshold(value, source: str) -> float | dict[int, float]:
    """'threshold': one number, or {"layer": number} (per-layer cosines chosen from the data)."""
    if isinstance(value, dict):
        seen: dict = {}
        out = {}
        for key, v in value.items():
            layer = _layer_of(key, "threshold", seen, source)
            if not _is_number(v):
                raise MoePruneError(f"{source}: threshold[{key!r}] must be a number (layer {layer}'s least cosine, "
                                    f"in [-1, 1]); got {_short(v)}.")
            out[layer] = float(v)
        return out
    if not _is_number(value):
        raise MoePruneError(f"{source}: 'threshold' must be a number (the dern merge's least cosine, in [-1, 1]) or "
                            f"one per layer ({{\"1\": 0.3}}); got {_short(value)}.")
    return float(value)


def _parse_recombined(value, source: str) -> dict[int, list[int]] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MoePruneError(f"{source}: 'recombined' must map each layer to [recombined, dropped segments]; got "
                            f"{_kind(value)}.")
    seen: dict = {}
    out = {}
    for key, nm in value.items():
        layer = _layer_of(key, "recombined", seen, source)
        if not isinstance(nm, list) or len(nm) != 2 or not all(_is_int(x) for x in nm):
            raise MoePruneError(f"{source}: recombined[{key!r}] must be [recombined, dropped segments], two whole "
                                f"numbers; got {_short(nm)}.")
        out[layer] = [int(x) for x in nm]
    return out


def _check_partition(groups: list[list[int]], E: int, at: str) -> None:
    """One layer's groups: non-empty, indices in 0..E-1 (bad ones named first), each expert in exactly one group,
    dominants (first members) ascending."""
    if not groups:
        raise MoePruneError(f"{at}: has no merge groups; list every expert 0..{E - 1} in one group.")
    if any(not g for g in groups):
        raise MoePruneError(f"{at}: a merge group is empty; remove it or give it its experts.")
    members = [j for g in groups for j in g]
    bad = [j for j in members if not _is_int(j) or not 0 <= j < E]
    if bad:
        raise MoePruneError(f"{at}: expert indices {bad} are outside the valid range 0..{E - 1} (the model has {E} "
                            f"routed experts per layer); use original expert indices 0..{E - 1}.")
    if sorted(members) != list(range(E)):
        missing = sorted(set(range(E)) - set(members))
        twice = sorted({j for j in members if members.count(j) > 1})
        raise MoePruneError(f"{at}: every expert 0..{E - 1} must be in exactly one merge group "
                            f"(missing {missing}, repeated {twice}).")
    dom = [g[0] for g in groups]
    if dom != sorted(dom):
        raise MoePruneError(f"{at}: order the groups by their dominant (first) member, ascending; got dominants {dom}.")


# ---------------------------------------------------------------------------------------------- parsing


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _kind(x) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(x), f"a number ({x!r})" if isinstance(x, (int, float)) else type(x).__name__)


def _short(x, limit: int = 60) -> str:
    text = json.dumps(x) if isinstance(x, (dict, list, str, int, float, bool, type(None))) else repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _layer_of(key, what: str, seen: dict, source: str) -> int:
    """A JSON layer key ("12") -> 12; refuses other keys and a layer written twice ("1" and "01")."""
    if _is_int(key) and key >= 0:
        layer = int(key)
    elif isinstance(key, str) and key.isascii() and key.isdigit():
        layer = int(key)
    else:
        raise MoePruneError(f"{source}: {what} key {key!r} is not a decoder-layer index; write the layer number as a "
                            'string such as "1".')
    if layer in seen:
        raise MoePruneError(f"{source}: layer {layer} appears twice in {what} (keys {seen[layer]!r} and {key!r}); "
                            "keep one.")
    seen[layer] = key
    return layer


def _parse_groups(value, E: int, source: str) -> dict[int, list[list[int]]]:
    example = '{"1": [[0, 5], [1], [2, 9, 11], ...]}'
    if not isinstance(value, dict) or not value:
        got = "missing" if value is None else f"{_kind(value)}" if not isinstance(value, dict) else "empty"
        raise MoePruneError(f"{source}: 'groups' must map every MoE layer to its merge groups, e.g. {example}; "
                            f"it is {got}.")
    groups: dict[int, list[list[int]]] = {}
    seen: dict = {}
    for key, gs in value.items():
        layer = _layer_of(key, "groups", seen, source)
        at = f"{source}: groups[{key!r}] (layer {layer})"
        if not isinstance(gs, list) or not gs:
            raise MoePruneError(f"{at} must be a non-empty list of groups, each a list of expert indices such as "
                                f"[[0, 5], [1]]; got {_short(gs)}.")
        for i, g in enumerate(gs):
            if not isinstance(g, list) or not g:
                raise MoePruneError(f"{at}, group {i}: must be a non-empty list of expert indices such as [0, 5]; "
                                    f"got {_short(g)}.")
            for j in g:
                if not _is_int(j):
                    raise MoePruneError(f"{at}, group {i}: member {_short(j)} is not an expert index; write whole "
                                        f"numbers 0..{E - 1} (not 3.0, \"3\" or true).")
                if not 0 <= j < E:
                    raise MoePruneError(f"{at}, group {i}: expert index {j} is outside the valid range 0..{E - 1} "
                                        f"(num_experts {E}).")
        groups[layer] = [[int(j) for j in g] for g in gs]
        _check_partition(groups[layer], E, at)
    return groups


def _parse_weights(value, groups: dict[int, list[list[int]]], source: str) -> dict[int, list[list[float]]]:
    """Usage weights shaped like `groups` (missing or {}: equal weights)."""
    if value is None or value == {}:
        return {}
    if not isinstance(value, dict):
        raise MoePruneError(f"{source}: 'weights' must map each layer to one usage number per group member, shaped "
                            f"like 'groups' (or be left out for equal weights); got {_kind(value)}.")
    weights: dict[int, list[list[float]]] = {}
    seen: dict = {}
    for key, ws in value.items():
        layer = _layer_of(key, "weights", seen, source)
        at = f"{source}: weights[{key!r}] (layer {layer})"
        if layer not in groups:
            raise MoePruneError(f"{at}: layer {layer} has no merge groups; remove it from 'weights' or add it to "
                                "'groups'.")
        gs = groups[layer]
        if not isinstance(ws, list) or len(ws) != len(gs):
            raise MoePruneError(f"{at} must hold one list per group ({len(gs)} groups); got {_short(ws)}.")
        row = []
        for i, (w, g) in enumerate(zip(ws, gs, strict=True)):
            if not isinstance(w, list) or len(w) != len(g):
                raise MoePruneError(f"{at}, group {i} {g}: give {len(g)} usage number(s), one per member; got "
                                    f"{_short(w)}.")
            bad = [x for x in w if not _is_number(x)]
            if bad:
                raise MoePruneError(f"{at}, group {i} {g}: weight {_short(bad[0])} is not a finite number.")
            row.append([float(x) for x in w])
        weights[layer] = row
    missing = sorted(set(groups) - set(weights))
    if missing:
        raise MoePruneError(f"{source}: 'weights' has no entry for layers {missing}; give one usage number per group "
                            "member for every layer in 'groups' (or leave 'weights' out for equal weights).")
    return weights
