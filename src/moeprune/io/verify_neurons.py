"""Verification of intra-expert pruning: the pruned checkpoint, loaded by stock `from_pretrained`, must equal the
original model with (a) the experts an optional `PrunePlan` removed masked out of routing (`models/masking.py`) and
(b) the down-projection columns of every removed neuron zeroed (`surgery/neurons.mask_neurons`). Non-uniform
folders (per-layer widths, `io/nonuniform.py`) are loaded with moeprune's loader, everything else with stock
`from_pretrained`.

    diff = max |logits_pruned − logits_reference|   over non-padding positions
    pass ⇔ diff ≤ tol · max |logits_reference|      (tol = 1e-4 in float32), as in `io/verify.py`
"""

from __future__ import annotations

from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.io import nonuniform
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.load import load_model
from moeprune.io.verify import VerifyResult, compare, logits_of, saved_logits
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.select.neuron_plan import NeuronPlan
from moeprune.select.plan import PrunePlan
from moeprune.surgery.neurons import mask_neurons


def verify_neurons(
    original: str | Path,
    pruned: str | Path,
    expert_plan: PrunePlan | None,
    neuron_plan: NeuronPlan,
    *,
    seed: int = 0,
    batch: int = 2,
    seq_len: int = 32,
    dtype: str = "float32",
    tol: float = 1e-4,
) -> VerifyResult:
    """Compare stock-reloaded PRUNED with ORIGINAL masked by `expert_plan` (None: no expert removed) and with the
    removed neurons of `neuron_plan` (experts numbered after expert removal) zeroed."""
    src, dst = Checkpoint.open(original), Checkpoint.open(pruned)
    adapter = get_adapter(src.config, weight_keys=src.names())
    if expert_plan is not None:
        expert_plan.validate(adapter)
        reference_plan = neuron_plan.to_original(expert_plan)
    else:
        reference_plan = neuron_plan
    reference_plan.validate(adapter)
    if nonuniform.is_nonuniform(dst.config_dict):
        if neuron_plan.uniform_width is not None:
            raise MoePruneError("the pruned folder has non-uniform expert widths but the neuron plan is uniform.")
    else:
        width = getattr(dst.config.get_text_config(), adapter.intermediate_key, None)
        if width != neuron_plan.uniform_width:
            raise MoePruneError(f"pruned config has {adapter.intermediate_key}={width}, the neuron plan keeps "
                                f"{neuron_plan.uniform_width} neurons per expert.")
    if expert_plan is not None:
        count = getattr(dst.config.get_text_config(), adapter.count_key, None)
        if count != expert_plan.kept_count:
            raise MoePruneError(f"pruned config has {adapter.count_key}={count}, the plan keeps "
                                f"{expert_plan.kept_count}.")

    inputs, got = saved_logits(src, dst, batch, seq_len, seed, dtype)
    logger.info("verify: running original %s with removed neurons zeroed%s", src.path,
                "" if expert_plan is None else " and removed experts masked")
    original_model = load_model(src.path, dtype=dtype)
    mask_neurons(original_model, adapter, reference_plan)
    dropped = {} if expert_plan is None else {layer: expert_plan.dropped(layer) for layer in expert_plan.layers}
    with masked_experts(original_model, adapter, dropped):
        want = logits_of(original_model, inputs)
    return compare(want, got, inputs["attention_mask"], tol)
