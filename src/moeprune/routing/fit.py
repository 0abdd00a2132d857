"""Thresholds from calibration text.

`capture_weights` runs the model (as the earlier stages of the recipe left it, routing unchanged) on calibration
windows and keeps, per MoE layer, the gate weights w [N, k] of up to `max_tokens` tokens. From them:

- naee_skip: β_ℓ = median_t w_(2)/w_(1) (NAEE);
- `target_active` A: the threshold is searched (bisection on the captured weights) so that the average number of
  active experts per token is A —
  ``per_layer`` (default): each layer's threshold is searched alone, so every layer averages A;
  ``global``: one knob for the whole model (top_p's single p, or one scale λ on NAEE's per-layer β_ℓ,
  β'_ℓ = λ·β_ℓ): the mean over layers is A, and layers whose routing is flatter keep more experts.
  Measured on the testbed (top-2 of 16, 4 MoE layers) at A = 1.5, top_p: mean held-out perplexity ×1.012 per layer
  vs ×1.021 global, so per_layer is the default; global remains an option for models whose layers differ more.
The captured weights come from the model without the policy: once it runs, later layers see slightly different
inputs, so the measured average (`apply.routing_report`) can differ a little from A; the report states both.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.models.base import MoEAdapter
from moeprune.models.dynamic import install_policy
from moeprune.routing import rules

DEFAULT_MAX_TOKENS = 65536  # per layer


@torch.no_grad()
def capture_weights(model: nn.Module, adapter: MoEAdapter, sets, batch_size: int = 8,
                    max_tokens: int = DEFAULT_MAX_TOKENS, device: str = "cpu",
                    layer_context: Callable[[int], AbstractContextManager] | None = None) -> dict[int, torch.Tensor]:
    """{layer: w [N, k] float64} — the router's gate weights on the real (non-padding) calibration tokens.

    The windows read are those a whole-model pass reads until `max_tokens` real tokens are seen. With
    `layer_context` (a lazily loaded model: `StageContext.layer_view`) they run one decoder layer at a time over
    every window (the calibration engine); each layer then sees the windows in the same order, so the captured
    weights are the same."""
    windows = batches(sets, batch_size)
    seen, n = 0, 0
    while n < len(windows) and seen < max_tokens:
        seen += int(windows[n][1].sum())
        n += 1
    windows = windows[:n]
    kept: dict[int, list[torch.Tensor]] = {layer: [] for layer in adapter.moe_layers()}

    def record(w, sel, layer):
        kept[layer].append(w.detach().double().cpu())  # [B·S, k], one entry per window batch
        return torch.ones_like(w, dtype=torch.bool)

    inst = install_policy(model, adapter, record)
    try:
        if layer_context is None:
            for ids, mask in tqdm(windows, desc="routing weights on calibration text", leave=False):
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
        else:
            _run_layered(model, adapter, sets, batch_size, len(windows), device, layer_context)
    finally:
        inst.remove()
    masks = [mask.reshape(-1).bool() for _, mask in windows]
    out = {}
    for layer, ws in kept.items():
        if ws:  # rows of real tokens (all rows where the router saw another token count)
            out[layer] = torch.cat([w[m] if m.numel() == w.shape[0] else w for w, m in zip(ws, masks, strict=True)])
            out[layer] = out[layer][:max_tokens]
    return out


def _run_layered(model: nn.Module, adapter: MoEAdapter, sets, batch_size: int, n: int, device: str,
                 layer_context: Callable[[int], AbstractContextManager]) -> None:
    """The first n windows batches through the decoder layers one layer at a time (the hooks record as they run)."""
    from moeprune.calibration.engine import run_layers
    from moeprune.calibration.session import make_batches

    inputs = make_batches(model, adapter, sets, batch_size, device, max_batches=n)
    for _ in run_layers(model, adapter, inputs, device=device, layer_context=layer_context):
        pass


def batches(sets, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) [≤ batch_size, L] of every calibration set's windows, set by set."""
    return [(s.input_ids[i : i + batch_size], s.attention_mask[i : i + batch_size])
            for s in sets for i in range(0, s.input_ids.shape[0], batch_size)]


def _bisect(f, lo: float, hi: float, target: float, increasing: bool, iters: int = 60) -> float:
    """x in [lo, hi] with f(x) closest to target for a monotone step function f."""
    best = min((lo, hi), key=lambda x: abs(f(x) - target))
    for _ in range(iters):
        mid = (lo + hi) / 2
        v = f(mid)
        if abs(v - target) < abs(f(best) - target):
            best = mid
        if (v < target) == increasing:
            lo = mid
        else:
            hi = mid
    return best


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def fit_top_p(weights: dict[int, torch.Tensor], target: float, scope: str, k_min: int, k_max: int | None
              ) -> dict[int, float]:
    """p (global) or p_ℓ (per layer) whose average kept count on `weights` is closest to `target`."""
    def active(w, p):
        return float(rules.top_p_counts(w, p, k_min, k_max).double().mean())

    if scope == "per_layer":
        return {layer: _bisect(lambda p, w=w: active(w, p), 0.0, 1.0, target, True) for layer, w in weights.items()}
    p = _bisect(lambda p: _mean(active(w, p) for w in weights.values()), 0.0, 1.0, target, True)
    return dict.fromkeys(weights, p)


def fit_naee(weights: dict[int, torch.Tensor], target: float | None, scope: str
             ) -> tuple[dict[int, float], dict[int, float], float | None]:
    """(β used per layer, calibrated medians β_ℓ, global scale λ or None)."""
    beta = {layer: rules.naee_beta(w) for layer, w in weights.items()}
    if target is None:
        return dict(beta), beta, None

    def active(w, b):
        return float(rules.naee_counts(w, b).double().mean())

    if scope == "per_layer":
        return ({layer: _bisect(lambda b, w=w: active(w, b), 0.0, 1.0 + 1e-6, target, False)
                 for layer, w in weights.items()}, beta, None)
    floor = min((b for b in beta.values() if b > 0), default=1.0)
    lam = _bisect(lambda s: _mean(active(w, s * beta[layer]) for layer, w in weights.items()), 0.0,
                  (1.0 + 1e-6) / floor, target, False)
    return {layer: lam * b for layer, b in beta.items()}, beta, lam
