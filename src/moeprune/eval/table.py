"""Quality tables across several pruned variants of one original: perplexity ratio per domain, markdown and plot.

    ratio(variant, domain) = perplexity(variant, domain) / perplexity(original, domain)   (1.00 = no loss)
"""

from __future__ import annotations

import math
from pathlib import Path

from moeprune.eval.perplexity import DomainScore


def ratio_table(original: dict[str, DomainScore], variants: dict[str, dict[str, DomainScore]]) -> dict[str, dict]:
    """{variant: {domain: ratio, ..., "mean": geometric mean of the domain ratios}}."""
    out = {}
    for label, scores in variants.items():
        row = {d: scores[d].perplexity / o.perplexity for d, o in original.items()}
        row["mean"] = math.exp(sum(math.log(r) for r in row.values()) / len(row))
        out[label] = row
    return out


def markdown_table(original: dict[str, DomainScore], variants: dict[str, dict[str, DomainScore]]) -> str:
    """One row per variant: perplexity ratio per domain and the geometric mean; first row the original perplexity."""
    domains = list(original)
    lines = ["| variant | " + " | ".join(domains) + " | geo-mean |", "|---|" + "---:|" * (len(domains) + 1),
             "| original (perplexity) | " + " | ".join(f"{original[d].perplexity:.3f}" for d in domains) + " | |"]
    for label, row in ratio_table(original, variants).items():
        lines.append(f"| {label} | " + " | ".join(f"×{row[d]:.3f}" for d in domains) + f" | ×{row['mean']:.3f} |")
    return "\n".join(lines) + "\n"


# y ticks of `plot_ratios`, as ratios (the axis is log(ratio − 1))
RATIO_TICKS = (1.001, 1.003, 1.01, 1.03, 1.1, 1.3, 2, 4, 11, 31, 101, 301, 1001)


def plot_ratios(original: dict[str, DomainScore], variants: dict[str, dict[str, DomainScore]], path: Path,
                title: str) -> Path:
    """`ratio_figure` saved as a PNG."""
    fig = ratio_figure(original, variants, title)  # selects the Agg backend before pyplot is imported here
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def ratio_figure(original: dict[str, DomainScore], variants: dict[str, dict[str, DomainScore]], title: str):
    """Grouped bars: domains on x, one bar per variant, each labelled with its perplexity ratio (×1.074).

    The y axis is logarithmic in the perplexity *increase* (ratio − 1), its ticks labelled as ratios, so a ×1.02
    bar next to a ×4.7 bar is still readable (on a log axis of the ratio itself it would be a few pixels high). A
    ratio ≤ 1 (no loss) has no height on this axis: it sits on the floor, with its label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = ratio_table(original, variants)
    domains = list(original)
    floor = _excess_floor([row[d] for row in table.values() for d in domains])
    width = 0.8 / max(1, len(table))
    fig, ax = plt.subplots(figsize=(1.6 * len(domains) + 3, 3.6))
    ax.set_yscale("log")
    for i, (label, row) in enumerate(table.items()):
        xs = [j + (i - (len(table) - 1) / 2) * width for j in range(len(domains))]
        heights = [max(row[d] - 1, floor) - floor for d in domains]  # bar from the floor up to ratio − 1
        bars = ax.bar(xs, heights, width, bottom=floor, label=label)
        ax.bar_label(bars, [f"×{row[d]:.3f}" for d in domains], fontsize=7, padding=1)
    top = 4 * max([floor * 10] + [row[d] - 1 for row in table.values() for d in domains])  # room for the labels
    ax.set_ylim(floor, top)
    ticks = [t for t in RATIO_TICKS if floor * 0.999 <= t - 1 <= top]  # 0.999: 1.001 − 1 < 0.001 in floats
    ax.set_yticks([t - 1 for t in ticks], [f"×{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("perplexity ratio (pruned / original)\nlog scale of ratio − 1", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def _excess_floor(ratios: list[float]) -> float:
    """Bottom of the log(ratio − 1) axis: the decade below the smallest increase, at most 0.01 (×1.01)."""
    excess = [r - 1 for r in ratios if r > 1]
    return 10 ** math.floor(math.log10(min(excess + [0.01])))
