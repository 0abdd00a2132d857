"""Verification: an export, reloaded by stock `from_pretrained` (moeprune's loader for non-uniform widths), must
compute what the ORIGINAL computes with every stage's reference applied (`stages/reference.py`), on seeded inputs:

    diff = max |logits_export − logits_reference|   over non-padding positions
    pass ⇔ diff ≤ tol · max |logits_reference|      (tol by dtype: `DEFAULT_TOL`; 1e-4 in float32)

The reference never uses the surgery that made the export: expert removal is masking in the original's own
router, neuron removal is zeroing down-projection columns, merging writes each merged expert into its dominant's
slot, and a weights stage (repair, distillation) writes its new values into their slots — the reference is then the
recipe's own result expressed on the original, and the distance to the masked original (the same chain without the
new values) is reported too (`masked_original_max_abs_diff`). The export's config must also hold the counts and
widths the plans predict.

Inputs: the seeded ids (default), or real tokens (`tokens`: ids [N, L] or {"input_ids", "attention_mask"};
`sets`: calibration sets, `calibration/data.py: CalibSet`), run `chunk` rows at a time; the figures are maxima over
every chunk. `lazy=True` runs the same comparison one decoder layer at a time with both models loaded lazily
(`pipeline/verify_layered.py`): memory for one layer instead of two whole models, and a per-layer error that names
the layer where an export departs from its reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moeprune.calibration.engine import last_hidden, outside_layers, to_device
from moeprune.errors import MoePruneError
from moeprune.eval.token_scores import head_rows
from moeprune.io import nonuniform
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.fit import choose_lazy
from moeprune.io.load import load_model
from moeprune.io.safetensors_io import DTYPES, FLOAT_DTYPES
from moeprune.log import logger
from moeprune.merge.align_memo import remembering
from moeprune.models import get_adapter
from moeprune.models.keys import get_key
from moeprune.pipeline.compare import DEFAULT_TOL, Logits, VerifyResult, combine, compare_heads, tolerance  # noqa: F401
from moeprune.pipeline.recipe import Chain, chain_adapters, is_export, read_chain
from moeprune.stages.base import stage_for_format
from moeprune.stages.reference import AS_COMPUTED, Reference, Storage


def seeded_inputs(vocab_size: int, batch: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Random token ids; the last row is left-padded by a quarter of its length so padding is exercised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=g)  # [B, S]
    mask = torch.ones(batch, seq_len, dtype=torch.long)  # [B, S]
    if batch > 1:
        mask[-1, : seq_len // 4] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits_of(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's whole logits [B, S, V] (float32, on the host) on `inputs`."""
    out = model(**to_device(inputs, next(model.parameters()).device), use_cache=False)
    return out.logits.float().cpu()  # [B, S, V]


@torch.no_grad()
def export_logits(model, inputs: list[dict[str, torch.Tensor]]) -> list[Logits]:
    """The export's side of each input chunk, held until the original runs, in whichever form is smaller: its logits
    [B, S, V] (the default few seeded rows), or its last decoder layer's output [B, S, H] with the model's
    embeddings, final norm and head, its decoder layers freed to meta (real windows at a real
    vocabulary: 8 x 512 tokens at V = 151 936 are 2.5 GB of float32 logits per chunk, 16 MB of hidden states)."""
    device = next(model.parameters()).device
    adapter = get_adapter(model.config, model=model)
    shell = sum(p.numel() * p.element_size() for p in outside_layers(model, adapter))
    if sum(x["input_ids"].numel() for x in inputs) * head_rows(model) * 4 <= shell:
        return [Logits(whole=logits_of(model, x)) for x in inputs]
    hidden = [last_hidden(model, adapter, to_device(x, device)).cpu() for x in inputs]  # [B, S, H] per chunk
    try:  # the head reads run the model's forward with every layer returning `hidden`: the modules stay, their
        adapter.decoder_layers(model).to("meta")  # tensors go
    except NotImplementedError:  # compressed-tensors' offload cache cannot copy to meta: such an export keeps them
        logger.debug("verify: the export's decoder layers could not be freed (%s); kept", type(model).__name__)
    return [Logits(model, adapter, h) for h in hidden]


def verify_inputs(vocab_size: int, *, tokens: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
                  sets: Sequence[Any] | None = None, batch: int = 2, seq_len: int = 32, seed: int = 0,
                  chunk: int = 8, seeded: bool = True) -> list[dict[str, torch.Tensor]]:
    """The inputs both models run on, `chunk` rows per forward: the seeded ids (`seeded`), then the given rows
    (`tokens`, or `sets`: CalibSet). Token ids must lie in 0..vocab_size-1 (checked here, before any model is
    loaded)."""
    if tokens is not None and sets is not None:
        raise MoePruneError("give verify either tokens or calibration sets, not both.")
    if chunk < 1:
        raise MoePruneError(f"chunk={chunk}: verify runs at least one row per forward; give chunk >= 1.")
    if not seeded and tokens is None and sets is None:
        raise MoePruneError("verify has no inputs: give tokens or calibration sets, or keep the seeded ids.")
    out = [seeded_inputs(vocab_size, batch, seq_len, seed)] if seeded else []
    if tokens is not None:
        named = tokens if isinstance(tokens, Mapping) else {"input_ids": tokens}
        pairs = [("tokens", named["input_ids"], named.get("attention_mask"))]
    else:
        pairs = [(s.name, s.input_ids, s.attention_mask) for s in sets or []]
    for name, ids, mask in pairs:
        ids = torch.as_tensor(ids, dtype=torch.long)  # [N, L]
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, dtype=torch.long)  # [N, L]
        if ids.dim() != 2 or mask.shape != ids.shape or ids.numel() == 0:
            raise MoePruneError(f"verify inputs {name!r}: input_ids {tuple(ids.shape)} and attention_mask "
                                f"{tuple(mask.shape)} must be the same non-empty [rows, length].")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise MoePruneError(f"verify inputs {name!r}: token ids {int(ids.min())}..{int(ids.max())} fall outside "
                                f"the model's vocabulary 0..{vocab_size - 1}; tokenize with the model's tokenizer.")
        out += [{"input_ids": ids[i : i + chunk], "attention_mask": mask[i : i + chunk]}
                for i in range(0, ids.shape[0], chunk)]
    return out


def describe_inputs(inputs: list[dict[str, torch.Tensor]], *, seeded: bool, seed: int, sets: Sequence[Any] | None,
                    tokens: Any) -> str:
    """What verify ran on, for the log and the report, e.g. '6 rows, 216 tokens: random token ids (seed 0) and 2
    windows each of web, short'."""
    parts = [f"random token ids (seed {seed})"] if seeded else []
    if tokens is not None:
        parts.append("the given tokens")
    if sets:
        rows = sorted({int(s.input_ids.shape[0]) for s in sets})
        each = f"{rows[0]} window{'s' * (rows[0] > 1)} each of " if len(rows) == 1 else "windows of "
        parts.append(each + ", ".join(s.name for s in sets))
    return (f"{sum(x['input_ids'].shape[0] for x in inputs)} rows, "
            f"{sum(int(x['attention_mask'].sum()) for x in inputs)} tokens: " + " and ".join(parts))


def first_windows(sets: Sequence[Any], rows: int) -> list[Any]:
    """Each calibration set cut to its first `rows` windows (what `prune` verifies on besides the seeded ids)."""
    return [dataclasses.replace(s, input_ids=s.input_ids[:rows], attention_mask=s.attention_mask[:rows],
                                held_out_ids=None) for s in sets]


def as_chain(plans: list[Any]) -> Chain:
    """Plan objects (PrunePlan, MergePlan, NeuronPlan, ...) -> (stage, plan) pairs, by their JSON format."""
    return [(stage_for_format(p.to_dict().get("format"), type(p).__name__), p) for p in plans]


@remembering(False)  # the last alignment of a run: merges' references look up what the export stored, store nothing
def verify(original: str | Path, export: str | Path, plans: Chain | list[Any] | None = None, *,
           dtype: str = "float32", tol: float | None = None, seed: int = 0, batch: int = 2,
           seq_len: int = 32, lazy: bool | None = None, tokens: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
           sets: Sequence[Any] | None = None, chunk: int = 8, device: str = "cpu",
           seeded: bool | None = None) -> VerifyResult:
    """Compare the reloaded EXPORT with ORIGINAL under the chained references of its plans (read from EXPORT by
    default: its moeprune_recipe.json, or the single plan of an older export).

    `lazy`: True = layer by layer (`verify_layered`), one decoder layer in memory; False = both models whole;
    None = layer by layer when the original does not fit in memory (`io.fit.choose_lazy`). `tokens`/`sets` replace
    the seeded inputs, `seeded=True` keeps them besides (`verify_inputs`)."""
    tol = tolerance(dtype, tol)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise MoePruneError(f"verify --device {device}: no CUDA device is visible; use --device cpu.")
    src, dst = Checkpoint.open(original), Checkpoint.open(export)
    if plans is None:
        if not is_export(dst.path) and is_export(src.path):
            raise MoePruneError(f"{dst.path} is not a moeprune export but {src.path} is: the order is "
                                "`moeprune verify ORIGINAL EXPORT` — swap the two arguments.")
        plans = read_chain(dst.path)
    chain = [p if isinstance(p, tuple) else as_chain([p])[0] for p in plans]
    adapter = get_adapter(src.config, weight_keys=src.names())
    final = chain_adapters(chain, adapter)[-1]
    _check_config(dst, final)

    if seeded is None:
        seeded = tokens is None and sets is None
    inputs = verify_inputs(src.config.get_text_config().vocab_size, tokens=tokens, sets=sets, batch=batch,
                           seq_len=seq_len, seed=seed, chunk=chunk, seeded=seeded)
    what = describe_inputs(inputs, seeded=seeded, seed=seed, sets=sets, tokens=tokens)
    logger.info("verify on %s", what)
    result = _run(src, dst, chain, adapter, inputs, dtype=dtype, tol=tol, device=device, lazy=lazy,
                  storage=stored_dtypes(dst, final))
    result.inputs = what
    return result


def stored_dtypes(ckpt: Checkpoint, adapter) -> Storage:
    """The one floating dtype `ckpt` stores its routed experts' tensors in (bf16 for a bf16 export), and the one its
    router tensors are stored in; None where there is no such one dtype (packed / quantized experts, a float32
    correction bias beside a bf16 router weight): the reference then writes those values as computed."""
    names: dict[str, set[str]] = {"experts": set(), "router": set()}
    for e in ckpt.entries:
        kind = adapter.classify_key(e.name).kind
        if kind in ("expert", "fused", "router"):
            names["router" if kind == "router" else "experts"].add(e.dtype)
    one = {k: {DTYPES[n][1] for n in v} if v and v <= FLOAT_DTYPES else set() for k, v in names.items()}
    return Storage(*(next(iter(one[k])) if len(one[k]) == 1 else None for k in ("experts", "router")))


def _run(src: Checkpoint, dst: Checkpoint, chain: Chain, adapter, inputs: list[dict[str, torch.Tensor]], *,
         dtype: str, tol: float, device: str, lazy: bool | None, storage: Storage = AS_COMPUTED) -> VerifyResult:
    """The comparison itself: layer by layer or with both models whole (`lazy`, `io.fit.choose_lazy`); `storage`:
    the export's stored dtypes, which the reference rounds new expert and router values to (`stages/reference.py`)."""
    if choose_lazy(lazy, src, dtype, "verify"):
        from moeprune.pipeline.verify_layered import verify_layered

        return verify_layered(src.path, dst.path, chain, adapter, inputs, dtype=dtype, tol=tol, device=device,
                              storage=storage)
    logger.info("verify: loading %s%s", dst.path, "" if nonuniform.is_nonuniform(dst.config_dict) else
                " with stock from_pretrained")
    got = export_logits(load_model(dst.path, dtype=dtype, device=device), inputs)
    logger.info("verify: original %s with the references of %s", src.path,
                " → ".join(stage.describe(plan) for stage, plan in chain))
    results = _against(src.path, adapter, chain, inputs, got, dtype, tol, device, storage)
    result = results[0] if len(results) == 1 else combine(results, tol)
    if any(getattr(stage, "changes_weights", False) for stage, _ in chain):
        masked = [(stage, plan) for stage, plan in chain if not getattr(stage, "changes_weights", False)]
        result.masked_original_max_abs_diff = max(r.max_abs_diff for r in _against(src.path, adapter, masked, inputs,
                                                                                   got, dtype, tol, device, storage))
    return result


def _against(original: Path, adapter, chain: Chain, inputs: list[dict[str, torch.Tensor]], got: list[Logits],
             dtype: str, tol: float, device: str, storage: Storage = AS_COMPUTED) -> list[VerifyResult]:
    """The export's logits `got` against the original with `chain`'s references, per input chunk."""
    reference = Reference.of_chain(load_model(original, dtype=dtype, device=device), adapter, chain,
                                   storage=storage)
    with reference.routing(), torch.no_grad():
        model = reference.model
        return [compare_heads(Logits(model, adapter, last_hidden(model, adapter, to_device(x, device))), g, x, tol)
                for x, g in zip(inputs, got, strict=True)]


def _check_config(dst: Checkpoint, final) -> None:
    """The export's config holds the expert count and width the plans leave."""
    text = dst.config.get_text_config()
    count = get_key(text, final.count_key)
    if count != final.num_experts:
        raise MoePruneError(f"export config has {final.count_key}={count}; the plans leave {final.num_experts} "
                            "experts per layer.")
    if nonuniform.is_nonuniform(dst.config_dict):
        return
    width = get_key(text, final.intermediate_key)
    if final.expert_width is not None and width != final.expert_width:
        raise MoePruneError(f"export config has {final.intermediate_key}={width}; the plans leave width "
                            f"{final.expert_width}.")
