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
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from heldout import HeldOut
from pareto_report import write

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


if __name__ == "__main__":
    sys.exit(main())
