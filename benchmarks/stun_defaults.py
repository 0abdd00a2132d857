"""STUN's clustering rules on the testbed: mix (router distance vs co-selection) × keep (usage | centroid), at 25 %
and 50 % of the experts removed — the measurement behind `select/stun.py`'s defaults.

One calibration pass; each plan is applied to a copy of the model in memory (`surgery.in_memory.apply_plan`, what
the export holds) and scored on the held-out windows (geo-mean perplexity ratio over the 4 domains).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/stun_defaults.py [--out benchmarks/results/stun_defaults]
"""

from __future__ import annotations

import argparse
import copy

import torch
from heldout import HeldOut, results_path, save_results

from moeprune import api
from moeprune.eval.perplexity import evaluate_sets
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.select.plan import PrunePlan
from moeprune.select.stun import KEEPS, stun_layer
from moeprune.surgery.in_memory import apply_plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--mixes", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--eval-sequences", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/stun_defaults")
    args = ap.parse_args(argv)
    out = results_path(args.out)
    torch.set_num_threads(1)
    hold = HeldOut.build(args.testbed, args.calib_samples, args.eval_sequences)
    stats = api.calibrate(hold.tb.path, hold.calib).combined()
    original = load_model(hold.tb.path, dtype="float32")
    adapter = get_adapter(original.config, model=original)
    E, routing = adapter.num_experts, adapter.routing()
    rows = []
    for ratio in args.ratios:
        for mix in args.mixes:
            for keep in KEEPS:
                kept = {}
                for layer in adapter.moe_layers():
                    block = adapter.block(original, layer)
                    kept[layer], _ = stun_layer(stats[layer], lambda j, b=block: adapter.expert_views(b, j), ratio,
                                                routing, E, mix, keep)
                model = copy.deepcopy(original)
                apply_plan(model, adapter, PrunePlan(kept, E, method="stun", ratio=ratio))
                per, mean = hold.ratios(evaluate_sets(model, hold.held))
                rows.append({"ratio": ratio, "mix": mix, "keep": keep, "domains": per, "mean": mean})
                print(f"  ratio {ratio} mix {mix} keep {keep}: ×{mean:.3f}", flush=True)
    md = [f"Testbed `{hold.tb.path.name}`, {args.calib_samples} calibration / {args.eval_sequences} held-out windows "
          "per domain; geo-mean held-out perplexity ratio of STUN's experts alone.\n",
          "| ratio | mix | keep | " + " | ".join(hold.domains) + " | geo-mean |",
          "|---:|---:|---|" + "---:|" * len(hold.domains) + "---:|"]
    md += [f"| {r['ratio']:.2f} | {r['mix']:g} | {r['keep']} | " + " | ".join(f"×{r['domains'][d]:.3f}"
                                                                          for d in hold.domains)
           + f" | **×{r['mean']:.3f}** |" for r in rows]
    save_results(out, {"rows": rows}, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
