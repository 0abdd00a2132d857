"""How the testbed routes each domain, and how much its experts specialise.

For domain d, MoE layer l and expert e, the routing share is p_d(l, e) = count_d(l, e) / Σ_e count_d(l, e), the
fraction of domain d's routed slots (token × top-k) that go to e (from the calibration engine's `count`).

Specialisation, per layer:
- JS = mean over domain pairs of the Jensen–Shannon divergence between p_d and p_d' (bits; 0 = identical
  routing, 1 = disjoint experts);
- purity = Σ_e load(e) · max_d share_d(e), where share_d(e) = count_d(e) / Σ_d count_d(e) (with the domains
  weighted equally) and load(e) its fraction of all slots: the average share of an expert's traffic that comes
  from its favourite domain. 1/#domains = no specialisation, 1 = every expert serves one domain.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np


def routing_shares(counts: dict[str, dict[int, np.ndarray]]) -> dict[str, np.ndarray]:
    """{domain: {layer: count [E]}} -> {domain: shares [layers, E]} (rows sum to 1)."""
    out = {}
    for d, by_layer in counts.items():
        m = np.stack([by_layer[layer] for layer in sorted(by_layer)]).astype(np.float64)
        out[d] = m / np.maximum(m.sum(axis=1, keepdims=True), 1e-12)
    return out


def _js_bits(p: np.ndarray, q: np.ndarray) -> float:
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


def specialisation(shares: dict[str, np.ndarray]) -> list[dict[str, float]]:
    """Per layer {"js_bits", "purity"} (definitions in the module docstring)."""
    domains = list(shares)
    stack = np.stack([shares[d] for d in domains])  # [D, L, E]
    out = []
    for layer in range(stack.shape[1]):
        p = stack[:, layer]  # [D, E]
        pairs = list(itertools.combinations(range(len(domains)), 2))
        js = float(np.mean([_js_bits(p[a], p[b]) for a, b in pairs])) if pairs else 0.0
        load = p.sum(axis=0)  # [E] equal domain weights
        purity = float((p.max(axis=0)).sum() / load.sum()) if load.sum() else 0.0
        out.append({"js_bits": js, "purity": purity})
    return out


def format_routing(shares: dict[str, np.ndarray], layers: list[int], top: int = 3) -> str:
    """Per layer and domain: the `top` experts with their share of the domain's slots, plus the specialisation."""
    spec = specialisation(shares)
    lines = [f"routing per domain (top-{top} experts: share of the domain's routed slots); "
             f"uniform share = {1 / next(iter(shares.values())).shape[1]:.1%}"]
    for i, layer in enumerate(layers):
        lines.append(f"  layer {layer}: JS {spec[i]['js_bits']:.2f} bits, purity {spec[i]['purity']:.2f} "
                     f"(none = {1 / len(shares):.2f})")
        for d, m in shares.items():
            order = np.argsort(-m[i])[:top]
            lines.append(f"    {d:<11} " + "  ".join(f"e{e:<2} {m[i, e]:5.1%}" for e in order))
    return "\n".join(lines)


def plot_routing(shares: dict[str, np.ndarray], layers: list[int], out: Path) -> Path:
    """Heatmap per layer: domains × experts, colour = share of the domain's routed slots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(shares)
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 1.2 + 1.0 * len(layers) * max(1, len(domains) / 4)),
                             squeeze=False, sharex=True)
    vmax = max(float(m.max()) for m in shares.values())
    for i, layer in enumerate(layers):
        ax = axes[i, 0]
        im = ax.imshow(np.stack([shares[d][i] for d in domains]), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_yticks(range(len(domains)), domains, fontsize=8)
        ax.set_xticks(range(shares[domains[0]].shape[1]))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel(f"layer {layer}", fontsize=8)
    axes[-1, 0].set_xlabel("expert")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="share of the domain's routed slots")
    fig.suptitle("testbed routing per domain")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
