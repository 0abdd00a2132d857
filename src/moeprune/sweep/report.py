"""The sweep's files: sweep.md (tables), sweep.png (held-out quality curves with the knees; per-layer block-error
heat maps with the cliffs marked), ratios.json ({task: recommended ratio}) and sweep.json, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeprune.analysis.plots import pyplot, save_figure
from moeprune.io.atomic import atomic_dir
from moeprune.log import logger


def fmt(v: float | None, spec: str = ".3g") -> str:
    """`v` formatted with `spec`, or "—" for None."""
    return "—" if v is None else format(v, spec)


def tables(d: dict[str, Any]) -> str:
    """Markdown: quality per task and ratio with knee / recommendation / elbow, the per-layer cliffs, and the
    measured block error per task, layer and ratio."""
    ratios, layers, tol = d["ratios"], d["layers"], d["tolerance"]
    head = "| task | ppl original | " + " | ".join(f"{r:g}" for r in ratios) + " | knee | recommend | elbow |"
    lines = [f"Held-out perplexity ratio (pruned / original; criterion {d['criterion']}, uniform per layer); knee = "
             f"first crossing of ×{1 + tol:.3g}, recommend = the knee rounded down to a swept ratio.", "", head,
             "|" + "---|" * (len(ratios) + 5)]
    for name, t in d["tasks"].items():
        cells = [f"**{q:.3f}**" if q > 1 + tol else f"{q:.3f}" for q in t["quality"]]
        knee = "holds" if t["holds"] else fmt(t["knee"], ".3f")
        lines.append(f"| {name} | {t['perplexity_original']:.3f} | " + " | ".join(cells)
                     + f" | {knee} | {fmt(t['recommend'], 'g')} | {fmt(t['elbow'], 'g')} |")
    lines += ["", f"Per-layer cliff: first swept ratio whose block reconstruction error exceeds "
              f"{d['cliff_threshold']:g} (— : none).", "",
              "| task | " + " | ".join(f"layer {x}" for x in layers) + " |", "|" + "---|" * (len(layers) + 1)]
    for name, t in d["tasks"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(c, "g") for c in t["cliff"]) + " |")
    lines += ["", "Block reconstruction error ‖Z − Ẑ‖² / ‖Z‖² of each task's own plan on its calibration tokens.", "",
              "| task | layer | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|" + "---|" * (len(ratios) + 2)]
    for name, t in d["tasks"].items():
        for layer, row in zip(layers, t["measured"], strict=True):
            lines.append(f"| {name} | {layer} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines += ["", "Recommended ratios (ratios.json): " + (", ".join(f"{k} {v:g}" for k, v in d["recommended"].items())
                                                           or "none")]
    if d["not_recommended"]:
        lines.append(f"No swept ratio keeps {', '.join(d['not_recommended'])} within ×{1 + tol:.3g}: sweep smaller "
                     "ratios for them.")
    return "\n".join(lines) + "\n"


def plot(d: dict[str, Any], path: Path) -> Path:
    """Top: quality vs ratio per task, the tolerance line and each knee; bottom: one heat map per task
    of the block error (layers × ratios), each layer's cliff written in its cell."""
    plt = pyplot()
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    ratios, layers, tasks = d["ratios"], d["layers"], d["tasks"]
    n = len(tasks)
    fig = plt.figure(figsize=(max(8.0, 3.0 * n), 7.0), layout="constrained")
    grid = fig.add_gridspec(2, n, height_ratios=[1.3, 1.0])
    ax = fig.add_subplot(grid[0, :])
    line = 1 + d["tolerance"]
    for i, (name, t) in enumerate(tasks.items()):
        c = f"C{i % 10}"
        ax.plot([0.0, *ratios], [1.0, *t["quality"]], marker="o", color=c, label=name)
        if t["knee"] is not None:
            ax.plot([t["knee"]], [line], marker="X", markersize=11, color=c, markeredgecolor="black")
    ax.axhline(line, color="grey", linestyle=":", linewidth=1, label=f"×{line:.3g} (tolerance)")
    values = [v for t in tasks.values() for v in t["quality"]]
    cap = 1 + 20 * d["tolerance"]  # the knee region stays readable; steeper points leave the panel
    ax.set_ylim(min(0.98, *values), min(max(values), cap) * 1.02)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"×{v:.3g}"))
    ax.set_xlabel("ratio of experts dropped per layer")
    ax.set_ylabel("held-out ppl / original")
    clipped = f"; y clipped at ×{cap:.3g}, see sweep.md" if max(values) > cap else ""
    ax.set_title(f"held-out quality per task ({d['criterion']} plan of each task; X = knee{clipped})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    top = max(1e-9, max(v for t in tasks.values() for row in t["measured"] for v in row))
    for i, (name, t) in enumerate(tasks.items()):
        h = fig.add_subplot(grid[1, i])
        img = h.imshow(np.array(t["measured"]), aspect="auto", cmap="viridis", vmin=0, vmax=top)
        for j, c in enumerate(t["cliff"]):
            if c is not None:
                h.text(ratios.index(c), j, "cliff", color="red", ha="center", va="center", fontsize=7,
                       fontweight="bold")
        h.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios], fontsize=6, rotation=90)
        h.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        h.set_title(f"{name}: block error", fontsize=8)
        h.set_xlabel("ratio", fontsize=7)
        if i == 0:
            h.set_ylabel("MoE layer", fontsize=7)
    fig.colorbar(img, ax=fig.axes[1:], fraction=0.03, pad=0.01, label="‖Z − Ẑ‖² / ‖Z‖²")
    return save_figure(fig, path)


def write(d: dict[str, Any], out: Path) -> Path:
    with atomic_dir(out) as tmp:
        plot(d, tmp / "sweep.png")
        d["files"] = {"json": "sweep.json", "tables": "sweep.md", "plot": "sweep.png", "ratios": "ratios.json"}
        (tmp / "ratios.json").write_text(json.dumps(d["recommended"], indent=1) + "\n")
        (tmp / "sweep.md").write_text(tables(d))
        (tmp / "sweep.json").write_text(json.dumps(d, indent=1, allow_nan=False))
    logger.info("sweep written to %s (sweep.json, sweep.md, sweep.png, ratios.json)", out)
    return out
