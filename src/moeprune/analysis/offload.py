"""The "Offloading" section of the analysis report (from analysis.json["offload"], `offload/run.py`) and its plot.

Table per cache size m and policy: hit rate, experts and bytes moved per token, predicted time per token and
slowdown against every expert resident; the predictor's accuracy per layer; the verdict against static pruning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeprune.analysis.plots import pyplot, save_figure

TITLES = {"lru": "LRU", "lfu": "LFU", "predictive": "predictive prefetch", "lookahead": "router look-ahead prefetch",
          "oracle": "oracle prefetch (bound)",
          "belady": "Belady (bound)"}


def offload_section(a: dict[str, Any], images: dict[str, str]) -> dict[str, Any] | None:
    o = a.get("offload")
    if o is None:
        return None
    t, pr = o["timing"], o["predictor"]
    sch = dict(zip(o["cache_sizes"], o["sch"]["values"], strict=True))
    rows = [[r["m"], TITLES[r["policy"]], round(r["hit_rate"], 4), round(r["loads_per_token"], 3),
             round(r["bytes_per_token"] / 2**20, 4), round(r["time_s"] * 1e6, 2), round(r["slowdown"], 3)]
            for r in o["rows"]]
    paras = [
        f"Simulated expert offloading: each MoE layer keeps m experts on the fast device, the rest on the host; the "
        f"stream is {o['tokens']:,} {'held-out' if o['heldout'] == 'heldout' else 'odd-numbered calibration'} tokens "
        f"in serving order, cold start. A miss moves one expert ({t['expert_bytes'] / 2**20:.3f} MiB) over a "
        f"{t['bandwidth_gbs']:g} GB/s link (β = {t['transfer_s'] * 1e6:.2f} µs) and stalls the layer; a prefetch for "
        f"layer ℓ runs on the link while layer ℓ−1 computes (c = {t['compute_s'] * 1e6:.3f} µs per layer at "
        f"{t['tflops']:g} TFLOP/s): time per layer = c + d·β + max(0, q·β − c) (d demand, q prefetch loads).",
        f"Predictive prefetch loads the transition predictor's {o['prefetch']} best guesses for layer ℓ from the "
        f"token's routing at layer ℓ−1 (trained on {o['train_tokens']:,} calibration tokens); recall of the true "
        f"top-k {pr['mean_recall']:.1%}, precision {pr['mean_precision']:.1%} (means over layers "
        f"{', '.join(str(la) for la in pr['layers'])}). "
        + (f"Router look-ahead prefetch loads the top-{o['prefetch']} of layer ℓ's router on layer ℓ−1's block input "
           f"(no training): recall {o['lookahead']['mean_recall']:.1%}, precision "
           f"{o['lookahead']['mean_precision']:.1%}. " if o.get("lookahead") else "")
        + "Belady (optimal offline eviction) bounds the bytes moved of every policy; oracle prefetch (perfect "
          "guesses) bounds what prefetching can hide.",
        "SCH(16, m) of the locality section on the same tokens, for comparison (a cache fixed per 16-token segment, "
        "chosen with look-ahead, with free changes between segments — not a bound of Belady's per-token hit rate "
        "either way): " + ", ".join(f"m = {m}: {v:.3f}" for m, v in sch.items() if v is not None) + ".",
        o["verdict"]["text"],
    ]
    tables = [{"caption": "policy × cache size (time per token in µs; slowdown against every expert resident)",
               "columns": ["m", "policy", "hit rate", "experts moved / token", "MiB moved / token", "time / token",
                           "slowdown"], "rows": rows},
              {"caption": "prefetch guesses on the test stream: recall of the true top-k, precision",
               "columns": ["layer", "transition recall", "transition precision"]
               + (["look-ahead recall", "look-ahead precision"] if o.get("lookahead") else []),
               "rows": [[la, round(pr["recall"][i], 4), round(pr["precision"][i], 4)]
                        + ([round(o["lookahead"]["recall"][i], 4), round(o["lookahead"]["precision"][i], 4)]
                           if o.get("lookahead") else []) for i, la in enumerate(pr["layers"])]}]
    imgs = [{"file": images["offload"], "caption": "hit rate, bytes moved and time per token over the cache size"}] \
        if "offload" in images else []
    return {"id": "offload", "title": "Offloading: an expert cache instead of pruning", "paragraphs": paras,
            "images": imgs, "tables": tables}


def plot_offload(a: dict[str, Any], path: Path) -> Path:
    """Hit rate, MiB moved per token and slowdown over the resident expert memory, one line per policy; static
    pruning's points (full speed, its perplexity ratio written next to it) on the last panel."""
    plt = pyplot()
    o = a["offload"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in o["policies"]:
        rows = [r for r in o["rows"] if r["policy"] == name]
        style = {"linestyle": "--"} if not rows[0]["realizable"] else {}
        ms = [r["m"] for r in rows]
        axes[0].plot(ms, [r["hit_rate"] for r in rows], marker="o", label=TITLES[name], **style)
        axes[1].plot(ms, [r["bytes_per_token"] / 2**20 for r in rows], marker="o", **style)
        axes[2].plot([r["memory_bytes"] / 2**20 for r in rows], [r["slowdown"] for r in rows], marker="o", **style)
    per_expert = o["rows"][0]["memory_bytes"] / o["rows"][0]["m"] / 2**20
    E = a["num_experts"]
    for r, q in o["static_quality"].items():
        x = (1 - float(r)) * E * per_expert
        axes[2].scatter([x], [1.0], color="black", marker="s", zorder=3)
        axes[2].annotate(f"prune {float(r):g}: ppl ×{q:.3g}", (x, 1.0), textcoords="offset points", xytext=(3, 6),
                         fontsize=7)
    axes[0].set_ylabel("hit rate")
    axes[1].set_ylabel("MiB moved per token")
    axes[2].set_ylabel("time per token / all resident")
    for ax in axes[:2]:
        ax.set_xlabel("cache size m (experts per layer)")
        ax.set_xticks(o["cache_sizes"])
    axes[2].set_xlabel("resident expert memory (MiB)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"offloading at {o['timing']['bandwidth_gbs']:g} GB/s, {o['timing']['tflops']:g} TFLOP/s "
                 "(dashed: bounds that need the future)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
