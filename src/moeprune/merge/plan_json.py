"""Reading a merge plan's JSON fields: types, shapes, names and indices, refused with a MoePruneError that names
the file, the key, the layer and the value (`MergePlan.from_dict` and `check`, merge/plan.py)."""

from __future__ import annotations

import json
import math
from numbers import Integral, Real

from moeprune.errors import MoePruneError


def parse_threshold(value, source: str) -> float | dict[int, float] | None:
    """'threshold': one number, {"layer": number} (per-layer cosines chosen from the data), or null (no segment is
    recombined)."""
    if value is None:
        return None
    if isinstance(value, dict):
        seen: dict = {}
        out = {}
        for key, v in value.items():
            layer = layer_of(key, "threshold", seen, source)
            if not is_number(v):
                raise MoePruneError(f"{source}: threshold[{key!r}] must be a number (layer {layer}'s least cosine, "
                                    f"in [-1, 1]); got {shorten(v)}.")
            out[layer] = float(v)
        return out
    if not is_number(value):
        raise MoePruneError(f"{source}: 'threshold' must be a number (the dern merge's least cosine, in [-1, 1]), "
                            f"one per layer ({{\"1\": 0.3}}), or null (recombine none); got {shorten(value)}.")
    return float(value)


def parse_recombined(value, source: str) -> dict[int, list[int]] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MoePruneError(f"{source}: 'recombined' must map each layer to [recombined, dropped segments]; got "
                            f"{type_name(value)}.")
    seen: dict = {}
    out = {}
    for key, nm in value.items():
        layer = layer_of(key, "recombined", seen, source)
        if not isinstance(nm, list) or len(nm) != 2 or not all(is_int(x) for x in nm):
            raise MoePruneError(f"{source}: recombined[{key!r}] must be [recombined, dropped segments], two whole "
                                f"numbers; got {shorten(nm)}.")
        out[layer] = [int(x) for x in nm]
    return out


def check_partition(groups: list[list[int]], E: int, at: str) -> None:
    """One layer's groups: non-empty, indices in 0..E-1 (bad ones named first), each expert in exactly one group,
    dominants (first members) ascending."""
    if not groups:
        raise MoePruneError(f"{at}: has no merge groups; list every expert 0..{E - 1} in one group.")
    if any(not g for g in groups):
        raise MoePruneError(f"{at}: a merge group is empty; remove it or give it its experts.")
    members = [j for g in groups for j in g]
    bad = [j for j in members if not is_int(j) or not 0 <= j < E]
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


def is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def type_name(x) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(x), f"a number ({x!r})" if isinstance(x, (int, float)) else type(x).__name__)


def shorten(x, limit: int = 60) -> str:
    text = json.dumps(x) if isinstance(x, (dict, list, str, int, float, bool, type(None))) else repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def layer_of(key, what: str, seen: dict, source: str) -> int:
    """A JSON layer key ("12") -> 12; refuses other keys and a layer written twice ("1" and "01")."""
    if is_int(key) and key >= 0:
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


def parse_groups(value, E: int, source: str) -> dict[int, list[list[int]]]:
    example = '{"1": [[0, 5], [1], [2, 9, 11], ...]}'
    if not isinstance(value, dict) or not value:
        got = "missing" if value is None else f"{type_name(value)}" if not isinstance(value, dict) else "empty"
        raise MoePruneError(f"{source}: 'groups' must map every MoE layer to its merge groups, e.g. {example}; "
                            f"it is {got}.")
    groups: dict[int, list[list[int]]] = {}
    seen: dict = {}
    for key, gs in value.items():
        layer = layer_of(key, "groups", seen, source)
        at = f"{source}: groups[{key!r}] (layer {layer})"
        if not isinstance(gs, list) or not gs:
            raise MoePruneError(f"{at} must be a non-empty list of groups, each a list of expert indices such as "
                                f"[[0, 5], [1]]; got {shorten(gs)}.")
        for i, g in enumerate(gs):
            if not isinstance(g, list) or not g:
                raise MoePruneError(f"{at}, group {i}: must be a non-empty list of expert indices such as [0, 5]; "
                                    f"got {shorten(g)}.")
            for j in g:
                if not is_int(j):
                    raise MoePruneError(f"{at}, group {i}: member {shorten(j)} is not an expert index; write whole "
                                        f"numbers 0..{E - 1} (not 3.0, \"3\" or true).")
                if not 0 <= j < E:
                    raise MoePruneError(f"{at}, group {i}: expert index {j} is outside the valid range 0..{E - 1} "
                                        f"(num_experts {E}).")
        groups[layer] = [[int(j) for j in g] for g in gs]
        check_partition(groups[layer], E, at)
    return groups


def parse_weights(value, groups: dict[int, list[list[int]]], source: str) -> dict[int, list[list[float]]]:
    """Usage weights shaped like `groups` (missing or {}: equal weights)."""
    if value is None or value == {}:
        return {}
    if not isinstance(value, dict):
        raise MoePruneError(f"{source}: 'weights' must map each layer to one usage number per group member, shaped "
                            f"like 'groups' (or be left out for equal weights); got {type_name(value)}.")
    weights: dict[int, list[list[float]]] = {}
    seen: dict = {}
    for key, ws in value.items():
        layer = layer_of(key, "weights", seen, source)
        at = f"{source}: weights[{key!r}] (layer {layer})"
        if layer not in groups:
            raise MoePruneError(f"{at}: layer {layer} has no merge groups; remove it from 'weights' or add it to "
                                "'groups'.")
        gs = groups[layer]
        if not isinstance(ws, list) or len(ws) != len(gs):
            raise MoePruneError(f"{at} must hold one list per group ({len(gs)} groups); got {shorten(ws)}.")
        row = []
        for i, (w, g) in enumerate(zip(ws, gs, strict=True)):
            if not isinstance(w, list) or len(w) != len(g):
                raise MoePruneError(f"{at}, group {i} {g}: give {len(g)} usage number(s), one per member; got "
                                    f"{shorten(w)}.")
            bad = [x for x in w if not is_number(x)]
            if bad:
                raise MoePruneError(f"{at}, group {i} {g}: weight {shorten(bad[0])} is not a finite number.")
            row.append([float(x) for x in w])
        weights[layer] = row
    missing = sorted(set(groups) - set(weights))
    if missing:
        raise MoePruneError(f"{source}: 'weights' has no entry for layers {missing}; give one usage number per group "
                            "member for every layer in 'groups' (or leave 'weights' out for equal weights).")
    return weights
