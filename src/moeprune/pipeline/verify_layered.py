"""Layer-by-layer verification: the whole-model verify (`pipeline/verify.py`) for exports larger than memory.

Both checkpoints are loaded lazily (`io/lazy.py`: embeddings, final norm and head in memory, decoder layers on
`meta`); `capture` records each model's layer-0 input and every layer's kwargs on the same tokens. Then, for each
decoder layer i, with only one layer materialised at a time:

    r_{i+1} = Ref_i(r_i)        the original's layer i with the chain's references written onto THAT layer only
                                (`Reference.of_chain(..., layers=[i])`), removed experts masked in its router
    y_i     = Exp_i(r_i)        the export's layer i on the same input
    x_{i+1} = Exp_i(x_i)        the export's own forward (x_0 = its embedding output)

    layer error e_i = max |y_i − r_{i+1}|,  pass_i ⇔ e_i ≤ tol · max |r_{i+1}|      (non-padding positions)

so an error cannot compound from layer to layer and the first layer that departs is named. Last, each model's own
final norm and head (its forward with every decoder layer replaced by "return the stored last hidden state") turn
r_L and x_L into logits, compared exactly as the whole-model verify compares them: max |logits(x_L) − logits(r_L)|
is the same figure. The running divergence max |x_{i+1} − r_{i+1}| is reported per layer.

Passes ⇔ the logits pass and every layer passes.

Memory: one decoder layer (of one model) at a time, both models' embeddings, final norms and heads, the hidden
states r_i, r_{i+1} and x_i of every chunk, one chunk's export outputs, and at the end one chunk's logits per model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from moeprune.calibration.engine import LayerInputs, capture, run_one
from moeprune.errors import MoePruneError
from moeprune.io.lazy import load_lazy
from moeprune.io.nonuniform import load_lazy_any
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.models.base import MoEAdapter
from moeprune.pipeline.compare import Logits, VerifyResult, combine, compare_heads
from moeprune.stages.reference import AS_COMPUTED, Reference, Storage


@torch.no_grad()
def verify_layered(original: Path, export: Path, chain, adapter: MoEAdapter, inputs: list[dict[str, torch.Tensor]],
                   *, dtype: str, tol: float, device: str = "cpu", storage: Storage = AS_COMPUTED) -> VerifyResult:
    """See the module docstring. `adapter` describes ORIGINAL; `chain` is already validated against it; `storage`:
    the export's stored dtypes (`stages/reference.py`)."""
    orig = load_lazy(original, dtype, head=True)
    exp = load_lazy_any(export, dtype)
    exp_adapter = get_adapter(exp.model.config, model=exp.model)
    from moeprune.routing.apply import apply_config_routing

    apply_config_routing(exp.model)  # a dynamic routing policy in its config.json, as `load_model` applies it
    L = len(orig.layers)
    if len(exp.layers) != L:
        raise MoePruneError(f"{export} has {len(exp.layers)} decoder layers but {original} has {L}: it is not an "
                            "export of this original.")
    refs = [capture(orig.model, adapter, x["input_ids"], x["attention_mask"]) for x in inputs]  # r_0 per chunk
    runs = [capture(exp.model, exp_adapter, x["input_ids"], x["attention_mask"]) for x in inputs]  # x_0 per chunk
    masks = [x["attention_mask"].bool() for x in inputs]  # [B, S] per chunk
    errors, scales, running = [], [], []
    logger.info("verify (layer by layer): %s against %s with the references of %s", export, original,
                " → ".join(stage.describe(plan) for stage, plan in chain))
    bar = tqdm(range(L), leave=False)
    for i in bar:
        bar.set_description(f"verifying (layer {i + 1}/{L})")
        with orig.layer(i) as layer:
            reference = Reference.of_chain(orig.model, adapter, chain, layers=[i], storage=storage)
            with reference.routing():
                want = run_one(layer, i, refs, device)  # r_{i+1}: [B, S, H] per chunk (on CPU)
        err, run_err = torch.zeros(()), torch.zeros(())  # max over chunks; one chunk's outputs held at a time
        with exp.layer(i) as layer:
            for r, x, w, m in zip(refs, runs, want, masks, strict=True):
                y = run_one(layer, i, [LayerInputs(r.hidden, x.kwargs, x.attention_mask)], device)[0]  # y_i
                x.hidden = run_one(layer, i, [x], device)[0]  # x_{i+1}
                err = torch.maximum(err, _max_abs(w, y, m))
                run_err = torch.maximum(run_err, _max_abs(w, x.hidden, m))
                r.hidden = w  # r_{i+1}
        errors.append(err.item())
        running.append(run_err.item())
        scales.append(max(w[m].abs().max().float().item() for w, m in zip(want, masks, strict=True)))
        del want
        logger.debug("verify: decoder layer %d: max |Δ| %.3e of max |h| %.3g (running %.3e)", i, errors[-1],
                     scales[-1], running[-1])
    results = [compare_heads(Logits(orig.model, adapter, r.hidden),  # reference: r_L
                             Logits(exp.model, exp_adapter, o.hidden),  # export: x_L
                             x, tol) for x, r, o in zip(inputs, refs, runs, strict=True)]
    result = results[0] if len(results) == 1 else combine(results, tol)
    result.layer_max_abs_diff, result.layer_max_abs, result.running_max_abs_diff = errors, scales, running
    result.passed = result.passed and not result.failed_layers
    if result.failed_layers:
        logger.warning("verify: decoder layers %s of %s differ from the reference beyond tolerance %.1e",
                       result.failed_layers, export, tol)
    return result


def _max_abs(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """max |a − b| over the non-padding positions (NaN propagates through torch.maximum: it fails the check)."""
    return (a.float() - b.float())[mask].abs().max()
