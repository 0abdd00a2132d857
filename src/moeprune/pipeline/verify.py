"""Verification: an export, reloaded by stock `from_pretrained` (moeprune's loader for non-uniform widths), must
compute what the ORIGINAL computes with every stage's reference applied (`stages/reference.py`), on seeded inputs:

    diff = max |logits_export − logits_reference|   over non-padding positions
    pass ⇔ diff ≤ tol · max |logits_reference|      (tol by dtype: `DEFAULT_TOL`; 1e-4 in float32)

The reference never uses the surgery that made the export: expert removal is masking in the original's own
router, neuron removal is zeroing down-projection columns, merging writes each merged expert into its dominant's
slot. The export's config must also hold the counts and widths the plans predict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moeprune.errors import MoePruneError
from moeprune.io import nonuniform
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.load import load_model, parse_dtype
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.pipeline.recipe import Chain, chain_adapters, is_export, read_chain
from moeprune.stages.base import stage_for_format
from moeprune.stages.reference import Reference

DEFAULT_TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


@dataclass
class VerifyResult:
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    tokens: int
    passed: bool

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(self.max_abs_logit, 1e-30)

    def to_dict(self) -> dict:
        return asdict(self) | {"relative": self.relative}

    def line(self) -> str:
        return (f"max abs logit difference: {self.max_abs_diff:.3e} (relative {self.relative:.3e}, tolerance "
                f"{self.tolerance:.1e} x max |logit| {self.max_abs_logit:.3g}) -> {'PASS' if self.passed else 'FAIL'}")


def tolerance(dtype: str, tol: float | None = None) -> float:
    parse_dtype(dtype)
    return DEFAULT_TOL.get(dtype, 1e-2) if tol is None else tol


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
    out = model(**inputs, use_cache=False)
    return out.logits.float()  # [B, S, V]


def compare(reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor, tol: float) -> VerifyResult:
    keep = mask.bool()  # [B, S]
    ref, cand = reference[keep], candidate[keep]  # [N, V]
    diff = (ref - cand).abs().max().item()
    scale = ref.abs().max().item()
    result = VerifyResult(diff, scale, tol, int(keep.sum()), bool(diff <= tol * scale))
    logger.debug("verify: %s", result.line())  # the CLI prints the line once
    return result


def as_chain(plans: list[Any]) -> Chain:
    """Plan objects (PrunePlan, MergePlan, NeuronPlan, ...) -> (stage, plan) pairs, by their JSON format."""
    return [(stage_for_format(p.to_dict().get("format"), type(p).__name__), p) for p in plans]


def verify(original: str | Path, export: str | Path, plans: Chain | list[Any] | None = None, *,
           dtype: str = "float32", tol: float | None = None, seed: int = 0, batch: int = 2,
           seq_len: int = 32) -> VerifyResult:
    """Compare the reloaded EXPORT with ORIGINAL under the chained references of its plans (read from EXPORT by
    default: its moeprune_recipe.json, or the single plan of an older export)."""
    tol = tolerance(dtype, tol)
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

    inputs = seeded_inputs(src.config.get_text_config().vocab_size, batch, seq_len, seed)
    logger.info("verify: loading %s%s", dst.path, "" if nonuniform.is_nonuniform(dst.config_dict) else
                " with stock from_pretrained")
    model = load_model(dst.path, dtype=dtype)
    got = logits_of(model, inputs)
    del model
    logger.info("verify: original %s with the references of %s", src.path,
                " → ".join(stage.describe(plan) for stage, plan in chain))
    reference = Reference(load_model(src.path, dtype=dtype), adapter)
    for stage, plan in chain:
        stage.reference(reference, plan)
        for layer, kept in (stage.survivors(plan) or {}).items():
            reference.keep_experts(layer, kept)
    with masked_experts(reference.model, adapter, reference.masked()):
        want = logits_of(reference.model, inputs)
    return compare(want, got, inputs["attention_mask"], tol)


def _check_config(dst: Checkpoint, final) -> None:
    """The export's config holds the expert count and width the plans leave."""
    text = dst.config.get_text_config()
    count = getattr(text, final.count_key, None)
    if count != final.num_experts:
        raise MoePruneError(f"export config has {final.count_key}={count}; the plans leave {final.num_experts} "
                            "experts per layer.")
    if nonuniform.is_nonuniform(dst.config_dict):
        return
    width = getattr(text, final.intermediate_key, None)
    if final.expert_width is not None and width != final.expert_width:
        raise MoePruneError(f"export config has {final.intermediate_key}={width}; the plans leave width "
                            f"{final.expert_width}.")
