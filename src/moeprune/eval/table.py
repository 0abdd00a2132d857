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


def plot_ratios(original: dict[str, DomainScore], variants: dict[str, dict[str, DomainScore]], path: Path,
                title: str) -> Path:
    """Grouped bars: domains on x, one bar per variant, height = perplexity ratio (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = ratio_table(original, variants)
    domains = list(original)
    width = 0.8 / max(1, len(table))
    fig, ax = plt.subplots(figsize=(1.6 * len(domains) + 3, 3.6))
    for i, (label, row) in enumerate(table.items()):
        xs = [j + (i - (len(table) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, [row[d] for d in domains], width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))  # plain ratios, not 4×10⁰
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    ax.set_ylabel("perplexity ratio (pruned / original)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
