"""Protected experts: never dropped by any policy. From the user (`--protect 3:5,7`) or found as super experts.

Super experts (REAP): a few experts produce activations orders of magnitude above the rest (massive
activations); removing one breaks the model whatever its average score. With m_{l,j} = max_t |y_{l,j}(t)| the
largest absolute output activation of expert j in layer l over the calibration tokens,

    τ = max( P_99.5({m_{l,j}} over all layers and experts),  max_{l,j} m_{l,j} / 10 )
    super experts = {(l, j) : m_{l,j} > τ}

P_99.5 is the linearly interpolated percentile (numpy's default). The second term stops a model without any
massive activation from protecting its top 0.5% anyway: a super expert must be within 10x of the largest.
"""

from __future__ import annotations

import torch

from moeprune.errors import MoePruneError
from moeprune.log import logger

PERCENTILE = 99.5
MAX_FRACTION = 0.1


def parse_protected(specs: list[str]) -> dict[int, set[int]]:
    """Parse `LAYER:EXPERT[,EXPERT...]` flags (repeatable; the same layer may appear twice) into {layer: experts}.

    Only the syntax is checked here; whether the layer is a MoE layer and the index is below E is checked by
    the policy, which knows the model.
    """
    if isinstance(specs, str):
        specs = [specs]
    out: dict[int, set[int]] = {}
    for spec in specs:
        layer_text, sep, experts_text = str(spec).partition(":")
        hint = f"--protect {spec!r}: write LAYER:EXPERT[,EXPERT...], e.g. --protect 3:5,7"
        if not sep or not layer_text.strip() or not experts_text.strip():
            raise MoePruneError(f"{hint}.")
        try:
            layer = int(layer_text)
            experts = {int(e) for e in experts_text.split(",")}
        except ValueError:
            raise MoePruneError(f"{hint} (layers and experts are integer indices).") from None
        if layer < 0 or any(e < 0 for e in experts):
            raise MoePruneError(f"{hint} (indices count from 0 and cannot be negative).")
        out.setdefault(layer, set()).update(experts)
    return out


def super_experts(max_abs: dict[int, torch.Tensor]) -> dict[int, set[int]]:
    """{layer: experts} whose max |activation| m_{l,j} exceeds τ (module docstring); layers with none omitted."""
    if not isinstance(max_abs, dict) or not max_abs:
        raise MoePruneError("no max-activation statistics to find super experts in; calibrate first.")
    for layer, m in sorted(max_abs.items()):
        if m.dim() != 1 or m.numel() == 0:
            raise MoePruneError(f"layer {layer}: max activations must be one vector [E], got shape {tuple(m.shape)}.")
        if not torch.isfinite(m.double()).all() or (m < 0).any():
            raise MoePruneError(f"layer {layer}: max |activation| values must be finite and >= 0; re-calibrate.")
    values = torch.cat([m.double().flatten() for _, m in sorted(max_abs.items())])  # [L·E]
    tau = max(float(torch.quantile(values, PERCENTILE / 100)), float(values.max()) * MAX_FRACTION)
    found = {layer: {int(j) for j in torch.nonzero(m.double() > tau).flatten()} for layer, m in max_abs.items()}
    found = {layer: experts for layer, experts in sorted(found.items()) if experts}
    logger.info("super experts (max |activation| > %.4g): %s", tau, found or "none")
    return found
