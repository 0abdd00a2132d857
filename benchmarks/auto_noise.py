"""Is auto's loss to the per-row best single criterion larger than the held-out evaluation's own noise?

    python benchmarks/auto_noise.py benchmarks/results/auto.json [--boot 2000]

For every row of a `benchmarks/auto.py` result where auto's plan differs from the per-row best single criterion's
(chosen by looking at held-out text), both plans are scored window by window on the same held-out windows, and

    excess = exp( mean_d  Σ_w (NLL_auto(w) − NLL_best(w)) / Σ_w n(w) ) − 1     (d: the row's domains; w: windows)
is bootstrapped by resampling each domain's windows (paired: the same windows for both plans). A 95 % interval that
contains 0 means this evaluation cannot tell the two plans apart. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys

import torch

from moeprune import api
from moeprune.calibration.data import build_sets
from moeprune.calibration.run import CalibrateOptions, load_tokenizer
from moeprune.eval.perplexity import score_batch
from moeprune.eval.run import EvalOptions
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.select.plan import PrunePlan
from moeprune.surgery.in_memory import apply_plan
from moeprune.testbed import build_testbed


def per_window(model, held, domains) -> dict[str, torch.Tensor]:
    """{domain: [W, 2] (NLL sum, counted tokens) per held-out window}."""
    out = {}
    for s in held:
        if s.name in domains:
            rows = [score_batch(model, s.input_ids[i : i + 1], s.attention_mask[i : i + 1])[::2]  # (NLL, counted)
                    for i in range(s.input_ids.shape[0])]
            out[s.name] = torch.tensor(rows, dtype=torch.float64)
    return out


def excess(diff: dict[str, torch.Tensor], n: dict[str, torch.Tensor], idx: dict[str, torch.Tensor]) -> float:
    """exp(mean over domains of the per-token NLL difference on the windows `idx`) − 1 (module docstring)."""
    return math.exp(sum(float(diff[d][idx[d]].sum() / n[d][idx[d]].sum()) for d in diff) / len(diff)) - 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", help="a benchmarks/auto.py JSON")
    ap.add_argument("--boot", type=int, default=2000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = json.load(open(args.result))
    tb = build_testbed(res["testbed"])
    calib = CalibrateOptions(tb.specs("calib"), samples=64, seq_len=tb.seq_len, held_out=0)
    tokenizer = load_tokenizer(tb.path, None)
    stats = api.calibrate(tb.path, calib)
    held = build_sets(EvalOptions(max_sequences=res["eval_sequences"]).for_model(tb.path).data_config(), tokenizer)
    original = load_model(tb.path, dtype="float32")
    adapter = get_adapter(original.config, model=original)
    g = torch.Generator().manual_seed(0)
    print("| ratio | calib | auto chose | best single | excess | 95 % interval | distinguishable |")
    print("|---:|---|---|---|---:|---|---|")
    for row in res["rows"]:
        key = "mean" if row["calib"] == "mixed" else row["calib"]
        best = min(res["criteria"], key=lambda c: row["single"][c][key])
        sec = row["auto_section"]
        if row["auto"][key] <= row["single"][best][key] + 1e-12:
            continue
        E = adapter.num_experts
        dropped = sec["candidates"][sec["chosen"]]["dropped"]
        auto_plan = PrunePlan({int(k): [j for j in range(E) if j not in set(v)] for k, v in dropped.items()}, E,
                              method=sec["chosen"], ratio=row["ratio"], model_type=adapter.model_type)
        best_plan = api.make_plan(stats, best, row["ratio"], calib_set=None if row["calib"] == "mixed" else
                                  [row["calib"]])
        domains = res["domains"] if row["calib"] == "mixed" else [row["calib"]]
        scores = []
        for plan in (auto_plan, best_plan):
            model = copy.deepcopy(original)
            apply_plan(model, adapter, plan)
            scores.append(per_window(model, held, domains))
        diff = {d: scores[0][d][:, 0] - scores[1][d][:, 0] for d in domains}  # [W] paired NLL differences
        n = {d: scores[0][d][:, 1] for d in domains}  # [W] counted tokens

        point = excess(diff, n, {d: torch.arange(len(diff[d])) for d in domains})
        boots = sorted(excess(diff, n, {d: torch.randint(0, len(v), (len(v),), generator=g) for d, v in diff.items()})
                       for _ in range(args.boot))
        lo, hi = boots[int(0.025 * args.boot)], boots[int(0.975 * args.boot) - 1]
        print(f"| {row['ratio']:.0%} | {row['calib']} | {sec['chosen']} | {best} | {point:+.2%} | "
              f"[{lo:+.2%}, {hi:+.2%}] | {'yes' if lo > 0 else 'no'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
