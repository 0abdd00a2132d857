"""PNG plots of a routing analysis (matplotlib, Agg backend). Each function takes the analysis dict (analysis.json)
and a file path, draws one figure and returns the path."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

MAX_LIFT_PANELS = 4  # co-activation heatmaps: this many layers, evenly spread
MAX_ANNOTATED_EXPERTS = 32  # owner initials are written into cells up to this many experts


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display); shared by every plot of the reports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write `fig` as a PNG at the reports' resolution and close it."""
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def plot_usage(a: dict[str, Any], path: Path) -> Path:
    """One panel per domain: layers × experts, colour = count / tokens; last panel: domain specificity with the
    owner's initial in each cell (when E is small enough to read)."""
    plt = pyplot()
    layers, usage, spec = a["layers"], a["usage"], a["specialisation"]
    panels = [(f"{d}: usage (count / tokens)", np.array(m, dtype=float)) for d, m in usage["per_domain"].items()]
    if len(panels) == 1:
        panels = [("usage (count / tokens)", np.array(usage["all"], dtype=float))]
    has_spec = "per_expert" in spec
    n = len(panels) + int(has_spec)
    E = len(usage["all"][0])
    fig, axes = plt.subplots(n, 1, figsize=(min(18, 4 + 0.35 * E), 1.0 + n * (0.6 + 0.28 * len(layers))),
                             squeeze=False)
    vmax = max(float(m.max()) for _, m in panels) or 1.0
    for ax, (title, m) in zip(axes[:, 0], panels, strict=False):
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    if has_spec:
        ax = axes[-1, 0]
        m = np.array(spec["per_expert"], dtype=float)
        im = ax.imshow(m, aspect="auto", cmap="magma", vmin=0, vmax=1)
        ax.set_title("domain specificity per expert (letter = owning domain)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
        if E <= MAX_ANNOTATED_EXPERTS:
            for i, row in enumerate(spec["owner"]):
                for e, owner in enumerate(row):
                    if owner:
                        ax.text(e, i, owner[0], ha="center", va="center", fontsize=7,
                                color="white" if m[i, e] < 0.6 else "black")
    for ax in axes[:, 0]:
        ax.set_yticks(range(len(layers)), [str(v) for v in layers], fontsize=7)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xticks(range(0, E, max(1, E // 32)))
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_balance(a: dict[str, Any], path: Path) -> Path:
    """Normalised usage entropy and CV per layer, one line per domain and all domains (black)."""
    plt = pyplot()
    layers, bal = a["layers"], a["balance"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    series = [(d, v) for d, v in bal["per_domain"].items() if "cv" in v]
    if "cv" in bal["all"]:
        series.append(("all", bal["all"]))
    for name, v in series:
        style = dict(color="black", linewidth=2) if name == "all" else {}
        axes[0].plot(layers, v["entropy_normalized"], marker="o", label=name, **style)
        axes[1].plot(layers, v["cv"], marker="o", label=name, **style)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_ylabel("usage entropy / log2 E (1 = balanced)")
    axes[1].set_ylabel("CV of expert counts (0 = balanced)")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def lift_layers(layers: list[int]) -> list[int]:
    """Indices (into `layers`) of the layers shown: up to MAX_LIFT_PANELS, evenly spread, first and last included."""
    n = len(layers)
    if n <= MAX_LIFT_PANELS:
        return list(range(n))
    return sorted({round(i * (n - 1) / (MAX_LIFT_PANELS - 1)) for i in range(MAX_LIFT_PANELS)})


def plot_coactivation(a: dict[str, Any], path: Path) -> Path:
    """log2 lift heatmaps (red: together more than chance, blue: less) for a few layers."""
    plt = pyplot()
    shown = [i for i in lift_layers(a["layers"]) if a["coactivation"]["lift"][i] is not None]
    rows, cols = _grid(max(1, len(shown)), 2)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols + 1.2, 3.6 * rows + 0.4), squeeze=False,
                             layout="constrained")
    im = None
    for ax, i in zip(axes.flat, shown, strict=False):
        lift = np.array([[np.nan if v is None else v for v in row] for row in a["coactivation"]["lift"][i]])
        with np.errstate(divide="ignore"):
            logl = np.log2(np.where(lift > 0, lift, np.nan))
        im = ax.imshow(logl, cmap="coolwarm", vmin=-3, vmax=3)
        ax.set_title(f"layer {a['layers'][i]}", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9, label="log2 lift (0 = independent; white = never)")
    fig.suptitle("co-activation lift P(i, j) / (P(i) P(j))", fontsize=10)
    return save_figure(fig, path)


def plot_supers(a: dict[str, Any], path: Path) -> Path:
    """max |expert output| per expert and layer (log scale), threshold τ dashed, super experts in red."""
    plt = pyplot()
    s = a["super_experts"]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for i, layer in enumerate(a["layers"]):
        m = np.array(s["max_abs"][i], dtype=float)
        sup = set(s["experts"][i])
        colors = ["tab:red" if e in sup else "tab:blue" for e in range(len(m))]
        ax.scatter(np.full(len(m), layer) + np.linspace(-0.3, 0.3, len(m)), np.maximum(m, 1e-12), c=colors, s=10)
    ax.axhline(s["threshold"], color="black", linestyle="--", linewidth=0.8, label=f"τ = {s['threshold']:.3g}")
    ax.set_yscale("log")
    ax.set_xticks(a["layers"])
    ax.set_xlabel("layer (dots: experts in index order)")
    ax.set_ylabel("max |expert output|")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_agreement(a: dict[str, Any], path: Path) -> Path:
    """One kept-set overlap heatmap per ratio."""
    plt = pyplot()
    done = [g for g in a["agreement"] if "matrix" in g]
    rows, cols = _grid(max(1, len(done)), 2)
    M = len(done[0]["methods"]) if done else 1
    fig, axes = plt.subplots(rows, cols, figsize=(cols * (2.5 + 0.45 * M), rows * (2 + 0.42 * M)), squeeze=False)
    for ax, g in zip(axes.flat, done, strict=False):
        im = ax.imshow(np.array(g["matrix"], dtype=float), cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(g["methods"])), g["methods"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(g["methods"])), g["methods"], fontsize=7)
        ax.set_title(f"ratio {g['ratio']:g} (chance ≈ {1 - g['ratio']:.2f})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(done):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_probe(a: dict[str, Any], path: Path) -> Path:
    """Per layer: predicted (mass removed) and measured (relative output error) cost over ratio; cliff marked."""
    plt = pyplot()
    p = a["probe"]
    layers, ratios = a["layers"], p["ratios"]
    rows, cols = _grid(len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.8 * rows), squeeze=False, sharey=True)
    top = max(1.0, 1.05 * max(v for key in ("predicted", "measured") for row in p.get(key, []) for v in row))
    for i, layer in enumerate(layers):
        ax = axes.flat[i]
        ax.plot(ratios, p["predicted"][i], marker="o", label="predicted (mass removed)")
        if "measured" in p:
            ax.plot(ratios, p["measured"][i], marker="s", label="measured ‖Z−Ẑ‖²/‖Z‖²")
            ax.axhline(p["cliff_threshold"], color="grey", linestyle=":", linewidth=0.8)
            if p["cliff"][i] is not None:
                ax.axvline(p["cliff"][i], color="tab:red", linestyle="--", linewidth=0.9, label="cliff")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("ratio of experts dropped", fontsize=8)
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("cost of dropping the experts with the least routed output mass", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_locality(a: dict[str, Any], path: Path) -> Path:
    """SRP(L) and SCH(L, m*) per layer over segment length L, as routed (solid), tokens shuffled within each
    sequence (dashed) and across sequences (dotted), in the layer's colour."""
    plt = pyplot()
    loc = a["locality"]
    v = loc["verdict"]
    j = loc["cache_sizes"].index(v["cache_size"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, layer in enumerate(a["layers"]):
        c = f"C{i % 10}"
        axes[0].plot(loc["lengths"], loc["srp"][i], marker="o", color=c, label=f"layer {layer}")
        axes[0].plot(loc["lengths"], loc["srp_baseline"][i], linestyle="--", color=c)
        axes[0].plot(loc["lengths"], loc["srp_global"][i], linestyle=":", color=c)
        axes[1].plot(loc["lengths"], [r[j] for r in loc["sch"][i]], marker="o", color=c)
        axes[1].plot(loc["lengths"], [r[j] for r in loc["sch_baseline"][i]], linestyle="--", color=c)
        axes[1].plot(loc["lengths"], [r[j] for r in loc["sch_global"][i]], linestyle=":", color=c)
    axes[0].set_ylabel("SRP (segment-router F1)")
    axes[1].set_ylabel(f"SCH, cache of m = {v['cache_size']} experts")
    for ax in axes:
        ax.set_title("solid: as routed; dashed: shuffled in sequence; dotted: across sequences", fontsize=8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(loc["lengths"], [str(L) for L in loc["lengths"]])
        ax.set_xlabel("segment length L (tokens)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
