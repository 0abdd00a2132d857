"""Bytes against held-out quality on the testbed (issue 18): removal, neurons, bits, mixed precision and their
combinations on one plot, with the Pareto frontier.

    python benchmarks/pareto.py [--testbed DIR] [--calib-samples 32] [--eval-sequences 32] [--group-size 32]
                                [--out benchmarks/results/pareto]

Every point is one export made by moeprune's own pipeline (`api.prune` / `api.quantize`, calibration included, on
the testbed's calibration text), reloaded with `moeprune.load_model` and scored on the held-out text:

    ratio(domain) = perplexity(export, domain) / perplexity(original, domain),   y = geo-mean over the 4 domains
    bytes         = size on disk of the export's *.safetensors files (tensors + headers; config/tokenizer files
                    left out, they are the same few KB for every point)
    bytes_bf16    = bytes − (float32 tensor bytes) / 2: the same export had the base been bf16 (the testbed is
                    stored in float32 and only the routed experts are quantized, so the non-expert part and the
                    quantization scales are counted at 2 bytes instead of 4; packed integers are unchanged)
Shares are against the original's bytes in the same accounting.

Points: expert removal (tcess_top1: `auto` is slow here), HEAPr (uniform width), uniform int8/4/3/2 (RTN and
GPTQ), PMQ and CAMERA-Q mixed precision (per layer = servable, and per expert) at 2.5 / 3 / 3.5 average bits
(GPTQ; `quant/importance.py` tables from RTN errors, `quant/allocate.py` milp, bits passed to the quantize stage),
prune + quantize recipes (the mixed ones allocated on the pruned export), and the top recipe `moeprune budget`
(`moeprune.quant.budget`) prints at 30 % and 15 % of the original bytes, run as printed (RTN) and with GPTQ.
Writes OUT.json, OUT.md and OUT.png; prints the markdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from heldout import HeldOut

from moeprune import api
from moeprune.calibration.data import build_sets
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.pipeline.export import STATS_NAME
from moeprune.pipeline.recipe import parse_recipe
from moeprune.quant.allocate import AvgBits, ExpertCosts, allocate
from moeprune.quant.budget import BudgetOptions, budget
from moeprune.quant.importance import ImportanceInputs, loss_tables, model_errors, rtn_fake_quant
from moeprune.quant.model_sizes import model_sizes
from moeprune.quant.sizes import PackedFormat
from moeprune.stats.neurons import collect_neuron_stats

WIDTHS = (2, 3, 4, 8)  # widths the mixed allocations choose from (budget's default)
KINDS = ("pmq", "camera")
FAMILIES = {  # family -> (colour, marker) on the plot
    "expert removal": ("tab:red", "v"), "HEAPr": ("tab:orange", "<"), "uniform RTN": ("tab:gray", "s"),
    "uniform GPTQ": ("black", "s"), "mixed PMQ": ("tab:blue", "o"), "mixed CAMERA-Q": ("tab:green", "o"),
    "prune + quantize": ("tab:purple", "D"), "budget pick": ("tab:brown", "*"),
}


# ---------------------------------------------------------------------------------------------------- bytes
def safetensors_bytes(folder: Path) -> tuple[int, int, int]:
    """(file bytes, tensor bytes, float32 tensor bytes) of the model's *.safetensors files in `folder` (headers
    only; the statistics side file an export carries is left out)."""
    files = tensors = f32 = 0
    for f in sorted(folder.glob("*.safetensors")):
        if f.name == STATS_NAME:  # the calibration statistics an export carries along: not the model
            continue
        files += f.stat().st_size
        with f.open("rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, e in header.items():
            if name != "__metadata__":
                n = e["data_offsets"][1] - e["data_offsets"][0]
                tensors += n
                f32 += n if e["dtype"] == "F32" else 0
    return files, tensors, f32


# ---------------------------------------------------------------------------------------------------- allocation
def allocation_inputs(folder: Path, h: HeldOut, group_size: int) -> tuple[ExpertCosts, ImportanceInputs]:
    """The cost table (exact packed bytes and nominal bits per expert and width) and what PMQ / CAMERA-Q read,
    for the model in `folder`: routed statistics and neuron statistics on the calibration text, RTN errors."""
    sizes, _, _ = model_sizes(folder)
    stats = api.calibrate(folder, h.calib)
    model = load_model(folder, dtype="float32")
    adapter = get_adapter(model.config, model=model)
    neurons = collect_neuron_stats(model, adapter, build_sets(h.calib.calib_config(), h.tokenizer), gradients=False)
    errors = model_errors(model, adapter, WIDTHS, rtn_fake_quant(group_size))
    fmt = PackedFormat(group_size, True, scale_bytes=sizes.expert.stored_bytes)
    costs = ExpertCosts.from_shapes({layer: [sizes.expert] * sizes.num_experts for layer in sizes.layers}, WIDTHS,
                                    fmt)
    return costs, ImportanceInputs(errors, routed=stats.combined(), neurons=neurons)


def mixed_bits(costs: ExpertCosts, inputs: ImportanceInputs, kind: str, avg: float, granularity: str
               ) -> tuple[dict, dict]:
    """(the quantize stage's `bits` option, a summary) of the milp allocation at `avg` average bits."""
    alloc = allocate(costs.with_loss(loss_tables(kind, inputs)), AvgBits(avg), granularity)
    per_layer = alloc.per_layer()
    bits = ({layer: b for layer, b in per_layer.items()} if granularity == "layer" else
            {layer: dict(enumerate(bs)) for layer, bs in alloc.bits.items()})
    every = [b for bs in alloc.bits.values() for b in bs]
    summary = {"importance": kind, "granularity": granularity, "avg_bits_asked": avg,
               "avg_bits": round(alloc.average_bits(costs), 4), "predicted_loss": alloc.loss,
               "widths_used": {str(b): every.count(b) for b in sorted(set(every))},
               "layer_bits": {str(k): v for k, v in per_layer.items()} if per_layer else None}
    return bits, summary


# ---------------------------------------------------------------------------------------------------- points
class Bench:
    def __init__(self, h: HeldOut, group_size: int, work: Path):
        self.h, self.g, self.work = h, group_size, work
        self.rows: list[dict] = []
        self.orig = safetensors_bytes(h.tb.path)

    def quant(self, scheme: str, algorithm: str, bits=None) -> dict:
        stage = {"method": "quantize", "scheme": scheme, "algorithm": algorithm, "group_size": self.g}
        return {**stage, "bits": bits} if bits is not None else stage

    def calib_for(self, recipe: list[dict]):
        """The calibration options when a stage of `recipe` reads calibration text (the pipeline refuses them
        otherwise: RTN quantization and data-free criteria)."""
        specs = parse_recipe(copy.deepcopy(recipe), "")
        return self.h.calib if any(need.calibrated for s in specs for need in s.needs) else None

    def point(self, label: str, family: str, make: Callable[[Path], tuple[Path, dict]]) -> dict:
        """Run `make(tmp)` -> (export folder, extra info), measure bytes and held-out ratios, record a row."""
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=self.work) as tmp:
            folder, extra = make(Path(tmp))
            seconds = time.perf_counter() - t
            files, tensors, f32 = safetensors_bytes(folder)
            ratios, geo = self.h.score(folder)
        of, ot, of32 = self.orig
        row = {"label": label, "family": family, "ratios": ratios, "geo_mean": geo, "bytes": files,
               "share": files / of, "tensor_bytes": tensors, "share_tensors": tensors / ot,
               "bytes_bf16": files - f32 // 2,
               "share_bf16": (files - f32 // 2) / (of - of32 // 2), "seconds": round(seconds, 1), **extra}
        self.rows.append(row)
        print(f"  {label:<34} ppl ×{geo:.4f}  bytes {files:>10,} ({row['share']:.3f})  bf16 "
              f"{row['bytes_bf16']:>10,} ({row['share_bf16']:.3f})  {seconds:5.1f} s", flush=True)
        return row

    def prune(self, src: Path, recipe: list[dict]) -> Callable[[Path], tuple[Path, dict]]:
        def make(tmp: Path) -> tuple[Path, dict]:
            applied, _ = api.prune(src, tmp / "out", copy.deepcopy(recipe), calib=self.calib_for(recipe),
                                   run_verify=False)
            return applied.out, {"recipe": recipe}
        return make

    def mixed(self, src: Path, costs: ExpertCosts, inputs: ImportanceInputs, kind: str, avg: float,
              granularity: str, prefix: list[dict] | None = None) -> Callable[[Path], tuple[Path, dict]]:
        def make(tmp: Path) -> tuple[Path, dict]:
            bits, summary = mixed_bits(costs, inputs, kind, avg, granularity)
            common = max(summary["widths_used"], key=lambda b: summary["widths_used"][b])
            stage = self.quant(f"w{common}a16", "gptq", bits)
            applied, _ = api.prune(src, tmp / "out", [stage], calib=self.calib_for([stage]), run_verify=False)
            return applied.out, {"recipe": [*(prefix or []), stage], "allocation": summary}
        return make


def run_points(b: Bench, expert_method: str, budget_ratios: tuple[float, ...]) -> None:
    tb = b.h.tb.path
    for r in (0.25, 0.5, 0.75):
        b.point(f"experts −{r:.0%}", "expert removal", b.prune(tb, [{"method": expert_method, "ratio": r}]))
    for r in (0.25, 0.5):
        b.point(f"HEAPr −{r:.0%}", "HEAPr", b.prune(tb, [{"method": "heapr", "ratio": r, "budget": "expert"}]))
    for bits in (8, 4, 3, 2):
        for alg in ("rtn", "gptq"):
            b.point(f"int{bits} {alg.upper()}", f"uniform {alg.upper()}", b.prune(tb, [b.quant(f"w{bits}a16", alg)]))
    costs, inputs = allocation_inputs(tb, b.h, b.g)
    for granularity in ("layer", "expert"):
        for avg in (2.5, 3.0, 3.5):
            for kind in KINDS:
                name = {"pmq": "PMQ", "camera": "CAMERA-Q"}[kind]
                b.point(f"{name} {avg:g} b per-{granularity}", f"mixed {name}",
                        b.mixed(tb, costs, inputs, kind, avg, granularity))
    cut = lambda r: {"method": expert_method, "ratio": r}  # noqa: E731
    for label, recipe in (("experts −25% + int4", [cut(0.25), b.quant("w4a16", "gptq")]),
                          ("experts −50% + int4", [cut(0.5), b.quant("w4a16", "gptq")]),
                          ("experts −25% + int3", [cut(0.25), b.quant("w3a16", "gptq")]),
                          ("experts −50% + int2", [cut(0.5), b.quant("w2a16", "gptq")]),
                          ("experts −75% + int4", [cut(0.75), b.quant("w4a16", "gptq")]),
                          ("experts −75% + int2", [cut(0.75), b.quant("w2a16", "gptq")]),
                          ("HEAPr −25% + int4", [{"method": "heapr", "ratio": 0.25, "budget": "expert"},
                                                 b.quant("w4a16", "gptq")]),
                          ("experts −75% + HEAPr −50% + int2", [cut(0.75), {"method": "heapr", "ratio": 0.5,
                                                                           "budget": "expert"},
                                                                b.quant("w2a16", "gptq")])):
        b.point(label + " GPTQ", "prune + quantize", b.prune(tb, recipe))
    # experts −25 % then mixed 3 bits, allocated on the pruned export (its own statistics and errors)
    with tempfile.TemporaryDirectory(dir=b.work) as tmp:
        pruned, _ = api.prune(tb, Path(tmp) / "pruned", [cut(0.25)], calib=b.h.calib, run_verify=False)
        pcosts, pinputs = allocation_inputs(pruned.out, b.h, b.g)
        for kind in KINDS:
            name = {"pmq": "PMQ", "camera": "CAMERA-Q"}[kind]
            b.point(f"experts −25% + {name} 3 b per-layer", "prune + quantize",
                    b.mixed(pruned.out, pcosts, pinputs, kind, 3.0, "layer", prefix=[cut(0.25)]))
    # moeprune budget's top pick at each size, both importance kinds, run as printed (RTN) and with GPTQ
    with tempfile.TemporaryDirectory(dir=b.work) as tmp:
        stats = Path(tmp) / "stats.safetensors"
        api.calibrate(tb, b.h.calib, stats)
        for ratio in budget_ratios:
            for kind in KINDS:
                t = time.perf_counter()
                res = budget(tb, stats, BudgetOptions(ratio_of_original=ratio, importance=kind, group_size=b.g),
                             calib=b.h.calib if kind == "camera" else None)
                c = res.candidates[0]
                pick = {"budget_ratio": ratio, "importance": kind, "target": res.target,
                        "predicted": {"loss": c.loss, "removal": c.removal, "neurons": c.neurons, "quant": c.quant,
                                      "bytes": c.bytes}, "budget_seconds": round(time.perf_counter() - t, 1)}
                recipe = res.recipes()[0]["stages"]
                variants = [("as printed", recipe)]
                if recipe and recipe[-1]["method"] == "quantize":
                    variants.append(("GPTQ", [*recipe[:-1], {**recipe[-1], "algorithm": "gptq"}]))
                for how, rec in variants:
                    row = b.point(f"budget {ratio:.0%} {kind} ({how})", "budget pick", b.prune(tb, rec))
                    row["budget"] = pick


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", help="testbed folder (default: the cached one, built when missing)")
    ap.add_argument("--expert-method", default="tcess_top1", help="expert removal criterion (auto is slow here)")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--budget-ratios", type=float, nargs="+", default=[0.3, 0.15])
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows per domain")
    ap.add_argument("--eval-sequences", type=int, default=32, help="held-out windows per domain")
    ap.add_argument("--out", default="benchmarks/results/pareto", help="writes OUT.json, OUT.md and OUT.png")
    ap.add_argument("--render", action="store_true", help="only re-write OUT.md and OUT.png from OUT.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not out.parent.is_dir():
        sys.exit(f"--out {out}: folder {out.parent} does not exist")
    if args.render:
        return write(json.loads(out.with_suffix(".json").read_text()), out)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    h = HeldOut.build(args.testbed, args.calib_samples, args.eval_sequences)
    with tempfile.TemporaryDirectory() as work:
        b = Bench(h, args.group_size, Path(work))
        run_points(b, args.expert_method, tuple(args.budget_ratios))
    result = {"testbed": str(h.tb.path), "domains": h.domains, "calib_samples": args.calib_samples,
              "eval_sequences": args.eval_sequences, "group_size": args.group_size,
              "expert_method": args.expert_method, "original_bytes": list(b.orig),
              "seconds": round(time.perf_counter() - t0, 1), "rows": b.rows,
              "command": "python benchmarks/pareto.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    return write(result, out)


def write(result: dict, out: Path) -> int:
    result["verdicts"] = verdicts(result)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = to_markdown(result)
    out.with_suffix(".md").write_text(md)
    plot(result, out.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
