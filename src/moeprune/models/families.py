"""The MoE families moeprune supports through `StructuralAdapter`, as data: one `FamilySpec` row each.

A row says only what the structure cannot: the routing kind when reading it off the router's source is ambiguous,
extra config keys, or why the family is refused. Everything else (MoE layers, names, counts, layouts) is found on
the stock model (`models/structure.py`). The eight families with hand-written adapters (`models/<family>.py`) are
not listed here. Each row is verified by `tests/test_family_matrix.py` / `benchmarks/families.py`; a family of a
newer transformers that is not listed is reported there as unsupported until a row is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moeprune.errors import MoePruneError
from moeprune.models.registry import ADAPTERS
from moeprune.models.structural import StructuralAdapter


@dataclass(frozen=True)
class FamilySpec:
    family: str
    model_types: tuple[str, ...]
    routing: str | None = None  # a RoutingSpec kind; None: inferred (models/structural.py)
    count_keys: tuple[str, ...] = ()
    top_k_keys: tuple[str, ...] = ()
    width_keys: tuple[str, ...] = ()
    note: str = ""  # what the router does, in one line
    # routing chosen by a config value: the (text) config attribute and (value, kind) pairs; overrides `routing`
    routing_key: str = ""
    routing_by: tuple[tuple[Any, str], ...] = ()

    def routing_kind(self, config: Any) -> str | None:
        """The routing kind for this (text) config: picked by `routing_key` when set, else `routing`."""
        if not self.routing_key:
            return self.routing
        value = getattr(config, self.routing_key, None)
        kinds = dict(self.routing_by)
        if value not in kinds:
            raise MoePruneError(f"{self.family}: config {self.routing_key}={value!r} selects a routing moeprune does "
                                f"not know; known values: {', '.join(repr(v) for v in kinds)} "
                                "(models/families.py).")
        return kinds[value]


# families that cannot be pruned correctly, with the reason (checked before any work)
REFUSED: dict[str, str] = {
    "deepseek_v4": "its first layers route by a hash of the token id (DeepseekV4HashRouter), not by router scores: "
                   "removing an expert would re-hash tokens, which no router mask can express.",
}

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("afmoe", ("afmoe",)),
    FamilySpec("aria", ("aria", "aria_text")),
    FamilySpec("cohere2_moe", ("cohere2_moe",), routing_key="expert_selection_fn",
               routing_by=(("softmax", "topk_softmax"), ("sigmoid", "sigmoid_topk")),
               note="top-k of the logits, then softmax or sigmoid (config expert_selection_fn) over the k selected"),
    FamilySpec("ernie4_5_moe", ("ernie4_5_moe",),
               note="softmax over all experts, top-k of softmax + [1, E] correction bias (moe_statics), gather the "
                    "softmax, renormalise"),
    FamilySpec("exaone_moe", ("exaone_moe",)),
    FamilySpec("flint", ("flint",)),
    FamilySpec("granitemoe", ("granitemoe",)),
    FamilySpec("granitemoe_swa", ("granitemoe_swa",)),
    FamilySpec("granitemoeshared", ("granitemoeshared",)),
    FamilySpec("hy_v3", ("hy_v3",)),
    FamilySpec("inkling", ("inkling_text",)),
    FamilySpec("inkling2", ("inkling2_text", "inkling2_loop_text"), routing_key="scoring_func",
               routing_by=(("sigmoid", "sigmoid_grouped"),),
               note="score_fn (config scoring_func) of the logits, top-k of score + correction bias, gather the "
                    "scores, renormalise, scale"),
    FamilySpec("kolibri1", ("kolibri1",),
               note="top-k of logits + correction bias, sigmoid of the selected logits only, optional renormalise"),
    FamilySpec("laguna", ("laguna",),
               note="optional tanh softcap of the logits, sigmoid, top-k of sigmoid + correction bias, gather the "
                    "sigmoid, renormalise"),
    FamilySpec("lara_mini", ("lara_mini",)),
    FamilySpec("llama4", ("llama4_text",)),
    FamilySpec("mellum", ("mellum",)),
    FamilySpec("mimo_v2_flash", ("mimo_v2_flash",)),
    FamilySpec("minimax", ("minimax",)),
    FamilySpec("minimax_m2", ("minimax_m2",)),
    FamilySpec("minimax_m3_vl", ("minimax_m3_vl_text",),
               note="sigmoid of the logits, top-k of sigmoid + correction bias, gather the sigmoid, renormalise; "
                    "the block scales by routed_scaling_factor"),
    FamilySpec("nemotron_h", ("nemotron_h",)),
    FamilySpec("phimoe", ("phimoe",)),
    FamilySpec("qwen3_5_moe", ("qwen3_5_moe_text",)),
    FamilySpec("qwen3_next", ("qwen3_next",)),
    FamilySpec("qwen3_omni_moe", ("qwen3_omni_moe_thinker",),
               note="softmax, top-k, renormalised (Qwen3-MoE); the thinker config must carry vision_start_token_id "
                    "as real checkpoints do (its class lacks the field its model reads)"),
    FamilySpec("solar_open", ("solar_open",)),
)


def _register(spec: FamilySpec) -> None:
    cls = type(f"{spec.family.title().replace('_', '')}Adapter", (StructuralAdapter,),
               {"family": spec.family, "model_types": spec.model_types, "spec": spec,
                "__doc__": f"{spec.family}: found by structure ({spec.note or 'see models/families.py'})."})
    for model_type in spec.model_types:
        ADAPTERS.register(model_type, cls)


for _spec in FAMILIES:
    _register(_spec)
