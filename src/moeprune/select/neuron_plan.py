"""`NeuronPlan`: which neurons each routed expert keeps (intra-expert pruning) — plain data, saved as JSON.

    {"format": "moeprune.neurons/1", "model_type": "qwen3_moe", "width": 768, "method": "heapr",
     "ratio": 0.25, "budget": "expert",
     "kept_neurons": {"1": {"0": [0, 3, 4, ...], "1": [...], ...}, "2": {...}}}

Neuron k of expert j is row k of the gate and up projections (gate/up [E, I, H]) and column k of the down
projection (down [E, H, I]). `kept_neurons[layer][j]` lists, ascending, the original neuron indices 0..width-1
that expert j keeps; kept neurons are renumbered 0..I'-1 in that order. Experts are numbered as in the model the
plan is applied to, i.e. *after* any expert removal (`to_original` maps a plan back through a `PrunePlan`).
`ratio` is the fraction of neurons removed; `budget` names how the removal was spread (`select/neurons.py`:
"expert", "layer", "global"; a plan built by hand without one says "uniform").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter
from moeprune.models.layouts import experts_shape
from moeprune.select.plan import PrunePlan, read_plan_json, write_plan_json

NEURON_FORMAT = "moeprune.neurons/1"


@dataclass
class NeuronPlan:
    kept_neurons: dict[int, dict[int, list[int]]]  # MoE layer -> expert (current numbering) -> kept neurons
    width: int  # the expert width I the indices refer to
    method: str = "manual"
    ratio: float | None = None
    budget: str = "uniform"
    model_type: str | None = None

    # ------------------------------------------------------------------ derived
    @property
    def layers(self) -> list[int]:
        return sorted(self.kept_neurons)

    @property
    def uniform_width(self) -> int | None:
        """The kept width I' when every expert of every layer keeps the same number of neurons, else None."""
        counts = {len(v) for experts in self.kept_neurons.values() for v in experts.values()}
        return counts.pop() if len(counts) == 1 else None

    def dropped(self, layer: int, expert: int) -> list[int]:
        kept = set(self.kept_neurons[layer][expert])
        return [k for k in range(self.width) if k not in kept]

    def sha256(self) -> str:
        payload = json.dumps(self.to_dict()["kept_neurons"], sort_keys=True)
        return hashlib.sha256(f"{self.width}:{payload}".encode()).hexdigest()

    def to_original(self, expert_plan: PrunePlan) -> NeuronPlan:
        """The same neurons with experts numbered as in the model *before* `expert_plan` removed experts.

        Surviving expert i of layer L is original expert `expert_plan.kept_experts[L][i]`; dropped experts keep
        all their neurons (they are masked out of routing in a reference, so their weights do not matter).
        """
        out: dict[int, dict[int, list[int]]] = {}
        for layer, experts in self.kept_neurons.items():
            kept = expert_plan.kept_experts.get(layer)
            if kept is None or sorted(experts) != list(range(len(kept))):
                raise MoePruneError(
                    f"layer {layer}: the neuron plan lists experts {sorted(experts)} but the expert plan keeps "
                    f"{None if kept is None else len(kept)} experts there; make the neuron plan on the pruned model."
                )
            full = {j: list(range(self.width)) for j in range(expert_plan.num_experts)}
            out[layer] = full | {kept[i]: list(v) for i, v in experts.items()}
        return NeuronPlan(out, self.width, self.method, self.ratio, self.budget, self.model_type)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {
            "format": NEURON_FORMAT,
            "model_type": self.model_type,
            "width": self.width,
            "method": self.method,
            "ratio": self.ratio,
            "budget": self.budget,
            "kept_neurons": {
                str(layer): {str(j): list(v) for j, v in sorted(experts.items())}
                for layer, experts in sorted(self.kept_neurons.items())
            },
        }

    def save(self, path: str | Path) -> Path:
        """Write the plan atomically (temporary sibling, then rename)."""
        return write_plan_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> NeuronPlan:
        return cls.from_dict(read_plan_json(path, "neuron plan"), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "neuron plan") -> NeuronPlan:
        if not isinstance(raw, dict) or not isinstance(raw.get("kept_neurons"), dict):
            raise MoePruneError(f"{source}: missing the 'kept_neurons' object ({{layer: {{expert: [neurons]}}}}).")
        if raw.get("format", NEURON_FORMAT) != NEURON_FORMAT:
            raise MoePruneError(f"{source}: format {raw.get('format')!r} is not {NEURON_FORMAT!r}.")
        width = raw.get("width")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise MoePruneError(f"{source}: 'width' must be the original expert width (a positive integer).")
        kept: dict[int, dict[int, list[int]]] = {}
        for lkey, experts in raw["kept_neurons"].items():
            layer = _index(lkey, f"{source}: layer key")
            if layer in kept:
                raise MoePruneError(f"{source}: layer {layer} appears twice in kept_neurons.")
            if not isinstance(experts, dict):
                raise MoePruneError(f"{source}: kept_neurons[{lkey!r}] must map expert indices to neuron lists.")
            kept[layer] = {}
            for ekey, value in experts.items():
                j = _index(ekey, f"{source}: layer {layer}: expert key")
                if j in kept[layer]:
                    raise MoePruneError(f"{source}: layer {layer} lists expert {j} twice.")
                if not isinstance(value, list) or not all(isinstance(k, int) and not isinstance(k, bool)
                                                          for k in value):
                    raise MoePruneError(f"{source}: layer {layer} expert {j}: kept neurons must be a list of ints.")
                kept[layer][j] = value
        return cls(kept, width, raw.get("method", "manual"), raw.get("ratio"), raw.get("budget", "uniform"),
                   raw.get("model_type"))

    # ------------------------------------------------------------------ validation
    def validate(self, adapter: MoEAdapter, model=None) -> None:
        """Raise MoePruneError unless the plan fits the model: every MoE layer and every expert 0..E-1 listed,
        neuron indices unique, ascending and within 0..width-1, at least one neuron per expert.

        Without `model`, E and the width come from the adapter's config; with it, from the experts tensors of
        each layer (so a model whose experts were just removed is checked against what it really holds).
        """
        if self.model_type and adapter.model_type and self.model_type != adapter.model_type:
            raise MoePruneError(f"neuron plan was made for model_type {self.model_type!r}, not {adapter.model_type!r}.")
        expected = set(adapter.moe_layers())
        missing, extra = sorted(expected - set(self.kept_neurons)), sorted(set(self.kept_neurons) - expected)
        if missing:
            raise MoePruneError(f"neuron plan has no entry for MoE layers {missing}; list every MoE layer "
                                f"{sorted(expected)}.")
        if extra:
            raise MoePruneError(f"neuron plan names layers {extra} that are not MoE layers (MoE layers: "
                                f"{sorted(expected)}).")
        for layer in self.layers:
            if model is None:
                E, width = adapter.num_experts, adapter.expert_width
            else:
                E, width = experts_shape(adapter, adapter.experts(adapter.block(model, layer)))
            if width is not None and width != self.width:
                raise MoePruneError(f"layer {layer}: experts are {width} neurons wide but the neuron plan was made "
                                    f"for width {self.width}.")
            _check_layer(layer, self.kept_neurons[layer], E, self.width)


def _check_layer(layer: int, experts: dict[int, list[int]], E: int, width: int) -> None:
    missing, extra = sorted(set(range(E)) - set(experts)), sorted(set(experts) - set(range(E)))
    if missing or extra:
        raise MoePruneError(f"layer {layer}: the model has experts 0..{E - 1}; the neuron plan misses {missing} and "
                            f"names unknown experts {extra}. List every expert (numbered after expert removal).")
    for j, kept in sorted(experts.items()):
        where = f"layer {layer} expert {j}"
        if not kept:
            raise MoePruneError(f"{where}: keeps no neuron; keep at least one (or remove the expert with a PrunePlan).")
        if len(set(kept)) != len(kept):
            dup = sorted({k for k in kept if kept.count(k) > 1})
            raise MoePruneError(f"{where}: neurons {dup} are listed more than once.")
        bad = [k for k in kept if not 0 <= k < width]
        if bad:
            raise MoePruneError(f"{where}: neuron indices {bad} are outside 0..{width - 1}.")
        if kept != sorted(kept):
            raise MoePruneError(f"{where}: kept neurons must be ascending (they are renumbered in that order).")


def _index(key: str, what: str) -> int:
    try:
        value = int(key)
    except (TypeError, ValueError):
        raise MoePruneError(f"{what} {key!r} is not an integer index.") from None
    if value < 0:
        raise MoePruneError(f"{what} {key!r} is negative.")
    return value
