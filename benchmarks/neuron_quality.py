"""Intra-expert pruning on the testbed at equal removed-parameter budgets: HEAPr vs CAMERA-P vs the best
expert-level criterion vs expert + neuron combined. Per-domain held-out perplexity ratio vs the original.

    python benchmarks/neuron_quality.py [--testbed DIR] [--ratios 0.25 0.5] [--expert-method frequency]

`ratio` = fraction of routed-expert parameters removed. Neuron budgets: `expert` (uniform width, aligned to 8,
the stock-exportable one) and `global` (HEAPr's default; non-uniform, evaluated with the removed neurons' down
columns zeroed, which is the function the sliced model computes — tested in tests/test_neuron_surgery.py).
Combined: remove ratio/2 of the experts with --expert-method, then neurons in the survivors (expert budget) so
that (1 − r_e)(1 − r_n) = 1 − ratio; the actual removed fraction is printed (widths are rounded to 8).
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from moeprune import api
from moeprune.calibration.data import build_sets
from moeprune.calibration.run import CalibrateOptions, load_tokenizer, prepare
from moeprune.criteria.neurons import neuron_scores
from moeprune.eval.perplexity import evaluate_sets
from moeprune.eval.run import EvalOptions
from moeprune.eval.table import markdown_table, ratio_table
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.select.neuron_plan import NeuronPlan
from moeprune.select.neurons import select_neurons
from moeprune.stats.neurons import collect_neuron_stats
from moeprune.surgery.in_memory import apply_plan
from moeprune.surgery.neurons import mask_neurons
from moeprune.testbed import build_testbed


def removed_fraction(model, original_routed: int, adapter) -> float:
    """1 − (non-zero routed-expert neurons × per-neuron params) / original — counts masked columns as removed."""
    kept = 0
    for layer in adapter.moe_layers():
        down = adapter.expert_roles(adapter.block(model, layer))["down"]  # [E, H, I]
        kept += int((down.abs().sum(dim=1) > 0).sum())
    return 1 - kept / original_routed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--expert-method", default="frequency", help="the best expert-level criterion (RESULTS.md)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--eval-sequences", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/neuron_quality")
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    tb = build_testbed(args.testbed)
    calib = CalibrateOptions(tb.specs("calib"), samples=args.calib_samples, seq_len=tb.seq_len)
    _, _, sets = prepare(tb.path, calib)
    held = build_sets(EvalOptions(max_sequences=args.eval_sequences).for_model(tb.path).data_config(),
                      load_tokenizer(tb.path, None))
    original = load_model(tb.path, dtype="float32")
    adapter = get_adapter(original.config, model=original)
    E, I = adapter.num_experts, adapter.expert_width
    routed = len(adapter.moe_layers()) * E * I
    stats = collect_neuron_stats(original, adapter, sets, gradients=True)
    scores = {m: neuron_scores(m, stats) for m in ("heapr", "camera")}
    expert_stats = api.calibrate(tb.path, calib)
    base = evaluate_sets(original, held)
    variants, removed = {}, {}

    def run(label, model):
        variants[label] = evaluate_sets(model, held)
        removed[label] = removed_fraction(model, routed, get_adapter(model.config, model=model))
        r = ratio_table(base, {label: variants[label]})[label]
        print(f"  {label:<34} removed {removed[label]:.3f}  geo-mean ×{r['mean']:.3f}", flush=True)

    for ratio in args.ratios:
        for method in ("heapr", "camera"):
            for budget in ("expert", "global"):
                kept = select_neurons(scores[method], ratio, budget, align=8 if budget == "expert" else 1)
                model = copy.deepcopy(original)
                mask_neurons(model, adapter, NeuronPlan(kept, I, method, ratio, budget))
                run(f"{method} {budget} {ratio:.0%}", model)
        model = copy.deepcopy(original)
        apply_plan(model, adapter, api.make_plan(expert_stats, args.expert_method, ratio))
        run(f"{args.expert_method} (experts) {ratio:.0%}", model)
        # combined: half the budget on experts, the rest on neurons inside the survivors
        r_e = ratio / 2
        r_n = 1 - (1 - ratio) / (1 - r_e)
        model = copy.deepcopy(original)
        apply_plan(model, adapter, api.make_plan(expert_stats, args.expert_method, r_e))
        sub = get_adapter(model.config, model=model)
        sub_stats = collect_neuron_stats(model, sub, sets, gradients=True)
        kept = select_neurons(neuron_scores("heapr", sub_stats), r_n, "expert", align=8)
        mask_neurons(model, sub, NeuronPlan(kept, I, "heapr", r_n, "expert"))
        run(f"{args.expert_method} {r_e:.1%} + heapr {ratio:.0%}", model)
    md = (f"Testbed `{tb.path.name}`; {args.calib_samples} calibration windows per domain (HEAPr: forward + "
          f"backward), {args.eval_sequences} held-out windows per domain; {time.perf_counter() - t0:.0f} s.\n\n"
          + markdown_table(base, variants) + "\nRouted-expert parameters removed: "
          + ", ".join(f"{k} {v:.3f}" for k, v in removed.items()) + "\n")
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(
        {"original": {d: s.to_dict() for d, s in base.items()},
         "variants": {k: {"scores": {d: s.to_dict() for d, s in v.items()}, "removed": removed[k],
                          "ratios": ratio_table(base, {k: v})[k]} for k, v in variants.items()}}, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
