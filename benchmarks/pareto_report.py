"""What `pareto.py` writes from its points: the Pareto frontier, the verdicts at 30 % / 15 % of the original's
bytes, PMQ against CAMERA-Q at equal bytes, the markdown table and the plot (OUT.json, OUT.md, OUT.png)."""

from __future__ import annotations

import json
import math
from pathlib import Path

FAMILIES = {  # family -> (colour, marker) on the plot
    "expert removal": ("tab:red", "v"), "HEAPr": ("tab:orange", "<"), "uniform RTN": ("tab:gray", "s"),
    "uniform GPTQ": ("black", "s"), "mixed PMQ": ("tab:blue", "o"), "mixed CAMERA-Q": ("tab:green", "o"),
    "prune + quantize": ("tab:purple", "D"), "budget pick": ("tab:brown", "*"),
}


# ---------------------------------------------------------------------------------------------------- analysis
def frontier(rows: list[dict], key: str) -> list[dict]:
    """Points no other point beats on both bytes (`key`) and ratio, by increasing bytes."""
    out, best = [], math.inf
    for r in sorted(rows, key=lambda r: (r[key], r["geo_mean"])):
        if r["geo_mean"] < best:
            out.append(r)
            best = r["geo_mean"]
    return out


def winners(rows: list[dict], key: str, limit: float) -> list[dict]:
    return sorted((r for r in rows if r[key] <= limit), key=lambda r: r["geo_mean"])


def pmq_vs_camera(rows: list[dict]) -> list[dict]:
    """Pairs of points made alike but for the importance kind: the mixed allocations, and the budget picks where
    the two kinds picked different recipes (an identical recipe is the same model)."""
    by = {r["label"]: r for r in rows}
    pairs = []
    for label, p in by.items():
        for a, b in (("PMQ", "CAMERA-Q"), ("pmq", "camera")):
            c = by.get(label.replace(a, b)) if a in label else None
            if c is not None and c["recipe"] != p["recipe"]:
                pairs.append({"point": label.replace(a + " ", "").replace(a, "").replace("  ", " "),
                              "pmq": p["geo_mean"], "camera": c["geo_mean"], "pmq_bytes": p["bytes"],
                              "camera_bytes": c["bytes"]})
    return pairs


def verdicts(result: dict) -> list[str]:
    rows, lines = result["rows"], []
    for key, name in (("share", "bytes on disk, float32 base as stored"),
                      ("share_tensors", "tensor bytes (the budget's accounting), float32 base"),
                      ("share_bf16", "bytes on disk if bf16 base")):
        for limit in (0.30, 0.15):
            w = winners(rows, key, limit)
            if not w:
                lines.append(f"- **≤ {limit:.0%} of the original, {name}**: no point fits.")
                continue
            runner = f"; next: {w[1]['label']} ×{w[1]['geo_mean']:.4f} ({w[1][key]:.3f})" if len(w) > 1 else ""
            lines.append(f"- **≤ {limit:.0%} of the original, {name}**: {w[0]['label']} wins, ×{w[0]['geo_mean']:.4f} "
                         f"at {w[0][key]:.3f} of the original{runner} ({len(w)} points fit).")
    pairs = pmq_vs_camera(rows)
    if pairs:
        cam = sum(p["camera"] < p["pmq"] for p in pairs)
        pm = sum(p["pmq"] < p["camera"] for p in pairs)
        excess = {k: sum(p[k] - 1 for p in pairs) / len(pairs) for k in ("pmq", "camera")}
        gap = max(pairs, key=lambda p: abs(p["pmq"] - p["camera"]))
        lines.append(f"- **PMQ vs CAMERA-Q at equal bytes** ({len(pairs)} pairs, bytes equal within "
                     f"{max(abs(p['pmq_bytes'] - p['camera_bytes']) for p in pairs):,} bytes): CAMERA-Q lower in "
                     f"{cam}, PMQ lower in {pm}, tied {len(pairs) - cam - pm}; mean perplexity excess (ratio − 1) "
                     f"PMQ {excess['pmq']:.4f}, CAMERA-Q {excess['camera']:.4f}; largest gap at {gap['point']} "
                     f"(PMQ ×{gap['pmq']:.4f}, CAMERA-Q ×{gap['camera']:.4f}).")
        lines += [f"  - {p['point']}: PMQ ×{p['pmq']:.4f}, CAMERA-Q ×{p['camera']:.4f}" for p in pairs]
    return lines


# ---------------------------------------------------------------------------------------------------- output
def to_markdown(result: dict) -> str:
    rows, domains = result["rows"], result["domains"]
    on = {k: {id(r) for r in frontier(rows, k)} for k in ("share", "share_bf16")}
    ob = result["original_bytes"]
    lines = [f"Testbed `{Path(result['testbed']).name}` (float32, {ob[0]:,} bytes of safetensors on disk; "
             f"{ob[0] - ob[2] // 2:,} had it been bf16); {result['calib_samples']} calibration windows per domain, "
             f"{result['eval_sequences']} held-out windows per domain; group size {result['group_size']}; expert "
             f"removal by {result['expert_method']}; {result['seconds']:.0f} s in all (one thread).", "",
             f"`{result['command']}`", "",
             "ratio = held-out perplexity / original's, geo-mean over " + ", ".join(domains) + ". bytes = the "
             "export's safetensors files on disk (tensors + headers); *tensor share* = tensor bytes only, as "
             "`moeprune budget` and `--max-shard-size` count them; *bytes if bf16 base* = the same export with "
             "every float32 tensor (everything but the packed integer weights: attention, embeddings, norms, "
             "routers, unquantized experts, quantization scales) at 2 bytes, against the original at bf16. "
             "★ = on the Pareto frontier of that accounting.", "",
             "| point | family | ppl ratio | " + " | ".join(domains) + " | bytes on disk (share) | tensor share | "
             "bytes if bf16 base (share) | avg bits | time |",
             "|---|---|---:|" + "---:|" * len(domains) + "---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["bytes"]):
        alloc = r.get("allocation")
        lines.append(f"| {r['label']} | {r['family']} | **×{r['geo_mean']:.4f}** | "
                     + " | ".join(f"{r['ratios'][d]:.3f}" for d in domains)
                     + f" | {r['bytes']:,} ({r['share']:.3f}){' ★' if id(r) in on['share'] else ''} | "
                       f"{r['share_tensors']:.4f} | {r['bytes_bf16']:,} ({r['share_bf16']:.3f})"
                       f"{' ★' if id(r) in on['share_bf16'] else ''} | "
                     + (f"{alloc['avg_bits']:.2f}" if alloc else "") + f" | {r['seconds']:.0f} s |")
    lines += ["", "Mixed allocations (widths used: count of experts; per-layer bits):", ""]
    for r in rows:
        if r.get("allocation"):
            a = r["allocation"]
            layers = f", layers {a['layer_bits']}" if a["layer_bits"] else ""
            lines.append(f"- {r['label']}: {a['widths_used']}{layers}, predicted loss {a['predicted_loss']:.4g}")
    lines += ["", "Budget picks (`moeprune.quant.budget`, top candidate):", ""]
    for r in rows:
        if r.get("budget"):
            p = r["budget"]
            lines.append(f"- {r['label']}: `{json.dumps(r['recipe'])}`; predicted bytes {p['predicted']['bytes']:,} "
                         f"(target {p['target']:,}), predicted loss {p['predicted']['loss']:.4g}")
    return "\n".join(lines + ["", "Verdicts:", "", *verdicts(result)]) + "\n"


RATIO_TICKS = (1.0003, 1.001, 1.003, 1.01, 1.03, 1.1, 1.3, 2, 4, 11)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    floor = 1e-4
    y = lambda r: max(r["geo_mean"] - 1, floor)  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(17, 7.5), sharey=True)
    for ax, key, title in ((axes[0], "share", "bytes as stored (float32 testbed)"),
                           (axes[1], "share_bf16", "bytes if the non-expert part were bf16")):
        for fam, (colour, marker) in FAMILIES.items():
            pts = [r for r in rows if r["family"] == fam]
            if pts:
                ax.scatter([r[key] for r in pts], [y(r) for r in pts], c=colour, marker=marker,
                           s=140 if marker == "*" else 55, label=fam,
                           zorder=3, edgecolors="white", linewidths=0.5)
        f = frontier(rows, key)
        ax.step([r[key] for r in f], [y(r) for r in f], where="post", c="k", lw=1, alpha=0.6, zorder=2,
                label="Pareto frontier")
        for n, r in enumerate(f):  # labels alternate below right / above left of the frontier's corners
            left = n % 2 == 1
            ax.annotate(r["label"], (r[key], y(r)), fontsize=7, xytext=(-6, 5) if left else (6, -9),
                        textcoords="offset points", ha="right" if left else "left")
        for limit in (0.15, 0.30):
            ax.axvline(limit, ls="--", c="tab:gray", lw=0.8)
            ax.text(limit, 0.97, f" {limit:.0%}", transform=ax.get_xaxis_transform(), fontsize=8, va="top")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = (0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8)
        ax.set_xticks(ticks, [f"{t:.0%}" for t in ticks])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("share of the original's bytes (log)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_yticks([t - 1 for t in RATIO_TICKS], [f"×{t:g}" for t in RATIO_TICKS])
    axes[0].set_ylim(floor * 0.8, max(y(r) for r in rows) * 1.5)
    axes[0].set_ylabel(f"held-out perplexity ratio (geo-mean; axis log(ratio − 1), ≤ ×{1 + floor:g} at the floor)")
    axes[1].legend(fontsize=8, loc="upper right")
    fig.suptitle("moeprune on the testbed: bytes against held-out perplexity (issue 18)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out: Path) -> int:
    result["verdicts"] = verdicts(result)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = to_markdown(result)
    out.with_suffix(".md").write_text(md)
    plot(result, out.with_suffix(".png"))
    print(md)
    return 0
