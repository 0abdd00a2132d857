"""The quality figure printed after a prune: perplexity before and after on calibration text held apart from the
windows that were scored (`--held-out N` windows per calibration set, the next N of the seeded draw).

    ratio(set) = ppl_export(held-apart windows of set) / ppl_original(same windows)
Cheap (N windows per set, one forward each per model) and labelled as calibration-split numbers: the text comes
from the calibration sources, so it says how much the prune cost on that distribution, not on unseen domains
(use `moeprune compare --data` for those).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moeprune.calibration.data import CalibSet
from moeprune.eval.perplexity import DomainScore, domain_score, evaluate_sets
from moeprune.io.load import load_model
from moeprune.log import logger
from moeprune.models import get_adapter


def held_apart(sets: list[CalibSet]) -> list[CalibSet]:
    """Each set's held-apart windows as a CalibSet of full windows (sets with none are left out)."""
    out = []
    for s in sets:
        if s.held_out_ids is None or not len(s.held_out_ids):
            continue
        ids = s.held_out_ids  # [M, L]
        out.append(CalibSet(s.name, ids, torch.ones_like(ids), s.sha256, s.source, s.documents, s.stream_tokens))
    return out


def calibration_split(original: str | Path, export: str | Path, sets: list[CalibSet], *, batch_size: int = 8,
                      device: str = "cpu", lazy: bool = False) -> dict:
    """{"sets": {name: {perplexity_before, perplexity_after, ratio, windows, tokens}}, "note": ...}; `lazy`: each
    model one decoder layer at a time (`layered_scores`)."""
    apart = held_apart(sets)
    missing = [s.name for s in sets if s.name not in {a.name for a in apart}]
    result: dict = {"sets": {}, "note": "perplexity on calibration text held apart from the scored windows "
                                        "(calibration split, not unseen domains)"}
    if missing:
        result["without_held_apart_text"] = missing
        logger.info("no calibration text held apart for %s (every window was used for calibration; add text or "
                    "lower --samples)", ", ".join(missing))
    if not apart:
        return result
    scores = []
    for path in (original, export):
        if lazy:
            scores.append(layered_scores(path, apart, batch_size, device))
            continue
        model = load_model(path, dtype="float32", device=device)
        scores.append(evaluate_sets(model, apart, batch_size))
        del model
    for s in apart:
        before, after = scores[0][s.name], scores[1][s.name]
        result["sets"][s.name] = {"perplexity_before": before.perplexity, "perplexity_after": after.perplexity,
                                  "ratio": after.perplexity / before.perplexity, "windows": int(s.input_ids.shape[0]),
                                  "tokens": before.tokens}
    return result


@torch.no_grad()
def layered_scores(path: str | Path, sets: list[CalibSet], batch_size: int = 8,
                   device: str = "cpu") -> dict[str, DomainScore]:
    """`evaluate_sets` with one decoder layer in memory at a time: the same windows and batches through the
    layer-by-layer engine, then the model's own final norm and head a chunk of positions at a time
    (`eval.token_scores.score_head`)."""
    from moeprune.calibration.engine import capture, run_layers
    from moeprune.eval.token_scores import score_head
    from moeprune.io.nonuniform import load_lazy_any

    lazy = load_lazy_any(path, "float32")
    adapter = get_adapter(lazy.model.config, model=lazy.model)
    windows = [(s.name, s.input_ids[i : i + batch_size], s.attention_mask[i : i + batch_size])
               for s in sets for i in range(0, s.input_ids.shape[0], batch_size)]  # [B, L] each
    batches = [capture(lazy.model, adapter, ids, mask) for _, ids, mask in windows]
    for _ in run_layers(lazy.model, adapter, batches, device=device, layer_context=lazy.layer):
        pass
    scored = [(name, score_head(lazy.model, adapter, {"input_ids": ids, "attention_mask": mask},
                                b.hidden.cpu()).totals())
              for (name, ids, mask), b in zip(windows, batches, strict=True)]
    return {s.name: domain_score([r for name, r in scored if name == s.name]) for s in sets}


def format_split(split: dict) -> str:
    rows = split.get("sets") or {}
    if not rows:
        return ""
    lines = [f"quality ({split['note']}):"]
    for name, r in rows.items():
        lines.append(f"  {name}: perplexity {r['perplexity_before']:.3f} -> {r['perplexity_after']:.3f} "
                     f"(x{r['ratio']:.3f}) on {r['windows']} windows, {r['tokens']} predicted tokens")
    return "\n".join(lines)
