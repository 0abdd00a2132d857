"""The verdict of a verification: max |Δ logit| over the non-padding positions against a tolerance relative to the
reference's largest logit, per chunk of inputs (`compare_heads`: two models' heads, a chunk of positions at a time),
over chunks (`combine`), and per decoder layer for layer-by-layer runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from moeprune.calibration.engine import head_logits, takes_logits_to_keep, to_device
from moeprune.eval.token_scores import SCORE_BYTES, chunk_positions, head_rows
from moeprune.io.load import parse_dtype
from moeprune.log import logger
from moeprune.models.base import MoEAdapter

DEFAULT_TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


@dataclass
class VerifyResult:
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    tokens: int
    passed: bool
    # layer by layer (lazy) only, per decoder layer: max |export block − reference block| on the same (reference)
    # input, max |reference block output|, and the export's own running forward vs the reference after that layer
    layer_max_abs_diff: list[float] | None = None
    layer_max_abs: list[float] | None = None
    running_max_abs_diff: list[float] | None = None
    # recipes with a weights stage (repair, distillation): max |Δ logit| between the export and the masked original
    # (every other stage's reference, the changed weights not written) — how far the new values moved the model
    masked_original_max_abs_diff: float | None = None
    inputs: str | None = None  # what the models ran on (`verify.describe_inputs`)

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(self.max_abs_logit, 1e-30)

    @property
    def layer_relative(self) -> list[float] | None:
        if self.layer_max_abs_diff is None:
            return None
        return [d / max(s, 1e-30) for d, s in zip(self.layer_max_abs_diff, self.layer_max_abs or [], strict=True)]

    @property
    def failed_layers(self) -> list[int]:
        """Decoder layers whose block output departs from the reference's beyond tolerance (layered verify)."""
        return [i for i, r in enumerate(self.layer_relative or []) if not r <= self.tolerance]

    def to_dict(self) -> dict:
        return asdict(self) | {"relative": self.relative, "layer_relative": self.layer_relative,
                               "failed_layers": self.failed_layers}

    def line(self) -> str:
        text = (f"max abs logit difference: {self.max_abs_diff:.3e} (relative {self.relative:.3e}, tolerance "
                f"{self.tolerance:.1e} x max |logit| {self.max_abs_logit:.3g})")
        if self.layer_relative:
            worst = max(range(len(self.layer_relative)), key=lambda i: self.layer_relative[i])
            text += f"; worst decoder layer {worst}: relative {self.layer_relative[worst]:.3e}"
        if self.failed_layers:
            text += f"; decoder layers {self.failed_layers} differ from the reference beyond tolerance"
        if self.masked_original_max_abs_diff is not None:
            text += (f"; the reference is the recipe's result with its new weights (distance to the masked "
                     f"original: {self.masked_original_max_abs_diff:.3e})")
        return f"{text} -> {'PASS' if self.passed else 'FAIL'}"


def tolerance(dtype: str, tol: float | None = None) -> float:
    parse_dtype(dtype)
    return DEFAULT_TOL.get(dtype, 1e-2) if tol is None else tol


@dataclass
class Logits:
    """One model's logits on one input batch, read any positions at a time: its own final norm, head and logit
    post-processing on its last decoder layer's output `hidden` [B, S, H] (`engine.head_logits`; moved to the
    model's device when read), or logits computed before (`whole` [B, S, V])."""

    model: nn.Module | None = None
    adapter: MoEAdapter | None = None
    hidden: torch.Tensor | None = None
    whole: torch.Tensor | None = None

    def by_positions(self) -> bool:
        """Whether positions can be read without the whole logits (the class takes `logits_to_keep`)."""
        return self.whole is not None or takes_logits_to_keep(self.model)

    def vocab(self) -> int:
        return int(self.whole.shape[-1]) if self.whole is not None else head_rows(self.model)

    def at(self, inputs: dict[str, torch.Tensor], keep: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, c, V] (float32) of positions `keep` [c]; every position when `keep` is None."""
        if self.whole is not None:
            return self.whole if keep is None else self.whole[:, keep]
        device = next(self.model.parameters()).device
        keep = None if keep is None else keep.to(device)
        return head_logits(self.model, self.adapter, to_device(inputs, device), self.hidden.to(device),
                           logits_to_keep=keep)


@torch.no_grad()
def compare_heads(reference: Logits, candidate: Logits, inputs: dict[str, torch.Tensor], tol: float,
                  max_bytes: int = SCORE_BYTES) -> VerifyResult:
    """max |candidate − reference| and max |reference| over the non-padding positions of two models' logits on
    `inputs`, pass ⇔ diff ≤ tol · max |reference|, c positions at a time (c from `chunk_positions`: the two chunks
    and their difference, 12 bytes per logit, stay within `max_bytes`). max |Δ| and max |reference| are maxima over
    the non-padding positions, so the chunks give the figures of the whole logits; only the head's matmul over fewer
    rows may round differently. Either side whose class lacks `logits_to_keep`: one chunk of every position."""
    mask = inputs["attention_mask"].bool()  # [B, S]
    B, S = mask.shape
    chunked = reference.by_positions() and candidate.by_positions()
    c = chunk_positions(B, reference.vocab(), max_bytes) if chunked else S
    diff = scale = torch.zeros(())
    for start in range(0, S, c):
        keep = torch.arange(start, min(start + c, S)) if chunked else None  # [c]
        ref = reference.at(inputs, keep)  # [B, c, V]
        cand = candidate.at(inputs, keep).to(ref.device)  # [B, c, V]
        m = mask[:, start : start + c].to(ref.device)  # [B, c]
        zero = ref.new_zeros(())
        scale = torch.maximum(scale, torch.where(m, ref.abs().amax(-1), zero).max().cpu())
        diff = torch.maximum(diff, torch.where(m, (cand - ref).abs_().amax(-1), zero).max().cpu())  # NaN stays
    result = VerifyResult(diff.item(), scale.item(), tol, int(mask.sum()), bool(diff.item() <= tol * scale.item()))
    logger.debug("verify: %s", result.line())
    return result


def combine(results: Sequence[VerifyResult], tol: float) -> VerifyResult:
    """One result over several chunks: the largest difference against the largest |logit|, tokens summed."""
    diff, scale = max(r.max_abs_diff for r in results), max(r.max_abs_logit for r in results)
    return VerifyResult(diff, scale, tol, sum(r.tokens for r in results), bool(diff <= tol * scale))
