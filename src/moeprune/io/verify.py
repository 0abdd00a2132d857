"""Verification: the pruned checkpoint, loaded by stock `from_pretrained`, must equal the original model with the
removed experts masked out of routing (`models/masking.py`), on seeded inputs.

    diff = max |logits_pruned − logits_masked|   over non-padding positions
    pass ⇔ diff ≤ tol · max |logits_masked|      (tol = 1e-4 in float32)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.load import load_model
from moeprune.io.report import read_report
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.select.plan import PrunePlan


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


def saved_logits(src: Checkpoint, dst: Checkpoint, batch: int, seq_len: int, seed: int,
                 dtype: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Seeded inputs over the source vocabulary and the logits of DST loaded by stock `from_pretrained`."""
    inputs = seeded_inputs(src.config.get_text_config().vocab_size, batch, seq_len, seed)
    logger.info("verify: loading %s with stock from_pretrained", dst.path)
    model = load_model(dst.path, dtype=dtype)
    logits = logits_of(model, inputs)
    del model
    return inputs, logits


def compare(reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor, tol: float) -> VerifyResult:
    keep = mask.bool()  # [B, S]
    ref, cand = reference[keep], candidate[keep]  # [N, V]
    diff = (ref - cand).abs().max().item()
    scale = ref.abs().max().item()
    result = VerifyResult(diff, scale, tol, int(keep.sum()), bool(diff <= tol * scale))
    logger.info(
        "verify: max |Δlogit| = %.3g (max |logit| %.3g, relative %.3g, tolerance %.1g) -> %s",
        result.max_abs_diff, result.max_abs_logit, result.relative, tol, "PASS" if result.passed else "FAIL",
    )
    return result


def verify(
    original: str | Path,
    pruned: str | Path,
    plan: PrunePlan | None = None,
    *,
    seed: int = 0,
    batch: int = 2,
    seq_len: int = 32,
    dtype: str = "float32",
    tol: float = 1e-4,
) -> VerifyResult:
    """Compare stock-reloaded PRUNED with ORIGINAL masked by the plan (read from PRUNED's report by default)."""
    src, dst = Checkpoint.open(original), Checkpoint.open(pruned)
    if plan is None:
        report = read_report(dst.path)
        if report is None or "kept_experts" not in report:
            raise MoePruneError(f"{dst.path} has no moeprune_report.json with kept_experts; pass --plan.")
        plan = PrunePlan.from_dict(report, source=str(dst.path / "moeprune_report.json"))
    adapter = get_adapter(src.config, weight_keys=src.names())
    plan.validate(adapter)
    count = getattr(dst.config.get_text_config(), adapter.count_key, None)
    if count != plan.kept_count:
        raise MoePruneError(f"pruned config has {adapter.count_key}={count}, the plan keeps {plan.kept_count}.")

    inputs, got = saved_logits(src, dst, batch, seq_len, seed, dtype)
    n_masked = plan.num_experts - plan.kept_count
    logger.info("verify: running original %s with %d experts/layer masked", src.path, n_masked)
    original_model = load_model(src.path, dtype=dtype)
    with masked_experts(original_model, adapter, {layer: plan.dropped(layer) for layer in plan.layers}):
        want = logits_of(original_model, inputs)
    return compare(want, got, inputs["attention_mask"], tol)
