"""The verdict of a verification: max |Δ logit| against a tolerance relative to the reference's largest logit,
per chunk of inputs (`compare`), over chunks (`combine`), and per decoder layer for layer-by-layer runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from moeprune.io.load import parse_dtype
from moeprune.log import logger

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


def compare(reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor, tol: float) -> VerifyResult:
    keep = mask.bool()  # [B, S]
    ref, cand = reference[keep], candidate[keep]  # [N, V]
    diff = (ref - cand).abs().max().item()
    scale = ref.abs().max().item()
    result = VerifyResult(diff, scale, tol, int(keep.sum()), bool(diff <= tol * scale))
    logger.debug("verify: %s", result.line())  # the CLI prints the line once
    return result


def combine(results: Sequence[VerifyResult], tol: float) -> VerifyResult:
    """One result over several chunks: the largest difference against the largest |logit|, tokens summed."""
    diff, scale = max(r.max_abs_diff for r in results), max(r.max_abs_logit for r in results)
    return VerifyResult(diff, scale, tol, sum(r.tokens for r in results), bool(diff <= tol * scale))
