"""`method: auto` against every single calibrated criterion (and NAEE) on a testbed's held-out text.

    python benchmarks/auto.py [--testbed DIR] [--ratios 0.25 0.5] [--oracle] [--out benchmarks/results/auto]

Rows: ratio × calibration {mixed (every domain), each single domain}. The single criteria are planned from one
calibration pass over all `--calib-samples` windows per domain (`mixed` = the sum of the per-domain statistics);
NAEE runs its own progressive pass on the same windows; auto gets the same windows and judges its candidates by
K-fold cross-fitting on them (each fold judged by candidates scored on the other folds) averaged with each export's
in-sample NLL, then exports the chosen
criterion's plan scored on every window (`same_plan` in the JSON: compared here with that criterion's own plan).
Nothing here looks at held-out text until the plans are made; each plan is then applied to an in-memory copy of
the testbed and scored on `data/<domain>.heldout.txt`:

    ratio(domain) = perplexity(pruned, domain) / perplexity(original, domain)
    geo = geometric mean of ratio(domain) over every domain;  own = ratio(calibration domain) (single-domain rows)
auto "wins" a row when its value ≤ the best single criterion's (NAEE is shown, not counted as a single criterion).
With --oracle, also the best held-out value among auto's own candidates (what a perfect judge would have picked).
Writes OUT.json (every row) and OUT.md (tables), prints the markdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

from moeprune import api
from moeprune.calibration.data import build_sets
from moeprune.calibration.run import CalibrateOptions, load_tokenizer
from moeprune.eval.perplexity import evaluate_sets
from moeprune.eval.run import EvalOptions
from moeprune.eval.table import ratio_table
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.pipeline.context import StageContext
from moeprune.select.auto import calibrated_criteria
from moeprune.select.plan import PrunePlan
from moeprune.stages.experts import EXPERTS
from moeprune.surgery.in_memory import apply_plan
from moeprune.testbed import build_testbed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", help="testbed folder (default: the cached one, built when missing)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration windows per domain")
    ap.add_argument("--eval-sequences", type=int, default=32, help="held-out windows per domain")
    ap.add_argument("--judge-folds", type=int, help="auto: folds of its judge (default 4)")
    ap.add_argument("--nll-candidates", type=int, help="auto: candidates whose NLL is measured (default: all)")
    ap.add_argument("--oracle", action="store_true",
                    help="also score each of auto's own candidates on held-out text (slower; diagnostic)")
    ap.add_argument("--calibs", nargs="+", help="calibration rows (default: mixed and every domain)")
    ap.add_argument("--out", default="benchmarks/results/auto", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not out.parent.is_dir():
        sys.exit(f"--out {out}: folder {out.parent} does not exist")
    t0 = time.perf_counter()
    tb = build_testbed(args.testbed)
    domains = list(tb.data("calib"))
    calib = CalibrateOptions(tb.specs("calib"), samples=args.calib_samples, seq_len=tb.seq_len, held_out=0)
    tokenizer = load_tokenizer(tb.path, None)
    sets = build_sets(calib.calib_config(), tokenizer)
    stats = api.calibrate(tb.path, calib)  # every domain's statistics from one pass; mixed = their sum
    eval_opts = EvalOptions(max_sequences=args.eval_sequences).for_model(tb.path)
    held = build_sets(eval_opts.data_config(), tokenizer)
    original = load_model(tb.path, dtype="float32")
    adapter = get_adapter(original.config, model=original)
    base = evaluate_sets(original, held)
    ckpt = Checkpoint.open(tb.path)
    seen: dict[str, dict] = {}

    def score(plan: PrunePlan) -> dict:
        """Held-out ratios per domain and their geo-mean ("mean"), once per distinct plan."""
        key = plan.sha256()
        if key not in seen:
            model = copy.deepcopy(original)
            apply_plan(model, adapter, plan)
            seen[key] = ratio_table(base, {"x": evaluate_sets(model, held)})["x"]
        return seen[key]

    def stage_plan(options: dict, subset: list):
        ctx = StageContext(ckpt, adapter, [], calib, subset)
        return EXPERTS.plan(EXPERTS.parse(options, "benchmark"), ctx)

    rows = []
    criteria = calibrated_criteria()
    for ratio in args.ratios:
        for name in args.calibs or ["mixed", *domains]:
            t = time.perf_counter()
            subset = sets if name == "mixed" else [s for s in sets if s.name == name]
            plans = {c: api.make_plan(stats, c, ratio, calib_set=None if name == "mixed" else [name])
                     for c in criteria}
            single = {c: score(p) for c, p in plans.items()}
            naee = score(stage_plan({"method": "naee", "ratio": ratio}, subset))
            options = {"method": "auto", "ratio": ratio}
            options |= {k: v for k, v in (("judge_folds", args.judge_folds),
                                          ("nll_candidates", args.nll_candidates)) if v}
            auto_plan = stage_plan(options, subset)
            section = auto_plan.auto
            candidates = {}
            for c, entry in section["candidates"].items():  # each distinct candidate of auto, scored on held-out
                if "same_as" in entry or "dropped" not in entry or not (args.oracle or c == section["chosen"]):
                    continue
                plan = _candidate_plan(auto_plan, c, entry["dropped"])
                candidates[c] = {"held_out": score(plan), "nll": entry["nll"],
                                 "mean_block_error": entry["mean_block_error"]}
            row = {"ratio": ratio, "calib": name, "single": single, "naee": naee, "auto": score(auto_plan),
                   "auto_choice": section["chosen"], "auto_section": section, "auto_candidates": candidates,
                   "same_plan": (auto_plan.kept_experts == plans[section["chosen"]].kept_experts
                                 if section["chosen"] in plans else None),
                   "seconds": round(time.perf_counter() - t, 1)}
            rows.append(row)
            key = "mean" if name == "mixed" else name
            best = min(criteria, key=lambda c, k=key: single[c][k])
            print(f"{ratio:4.0%} {name:<10} auto={section['chosen']:<20} ×{row['auto'][key]:.3f}  best single "
                  f"{best} ×{single[best][key]:.3f}  naee ×{naee[key]:.3f}  ({row['seconds']:.0f} s)", flush=True)
    result = {"testbed": str(tb.path), "testbed_config": tb.meta["config"], "domains": domains,
              "original": {d: s.to_dict() for d, s in base.items()}, "criteria": criteria,
              "calib_windows": {s.name: int(s.input_ids.shape[0]) for s in sets},
              "eval_sequences": args.eval_sequences, "judge_folds": args.judge_folds,
              "nll_candidates": args.nll_candidates, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = to_markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def _candidate_plan(auto_plan: PrunePlan, name: str, dropped: dict) -> PrunePlan:
    """Candidate `name` of auto as a plan, from the dropped experts its report lists."""
    E = auto_plan.num_experts
    kept = {int(k): [j for j in range(E) if j not in set(v)] for k, v in dropped.items()}
    return PrunePlan(kept, E, method=name, ratio=auto_plan.ratio, model_type=auto_plan.model_type)


def _value(scores: dict, row: dict, metric: str) -> float:
    """geo: geo-mean over every domain; own: the calibration domain's ratio (mixed rows: the geo-mean)."""
    return scores["mean"] if metric == "geo" or row["calib"] == "mixed" else scores[row["calib"]]


METRICS = {"geo": "geometric mean over every held-out domain",
           "own": "the calibration domain's own held-out text (mixed rows: geometric mean over every domain)"}


def summary(result: dict, metric: str) -> tuple[int, int]:
    """(rows where auto ≤ the best single criterion, rows)."""
    wins = 0
    for row in result["rows"]:
        best = min(_value(row["single"][c], row, metric) for c in result["criteria"])
        wins += _value(row["auto"], row, metric) <= best + 1e-12
    return wins, len(result["rows"])


def to_markdown(result: dict) -> str:
    cfg, criteria = result["testbed_config"], result["criteria"]
    windows = ", ".join(f"{d} {n}" for d, n in result["calib_windows"].items())
    lines = [f"Testbed `{Path(result['testbed']).name}` ({cfg['num_experts']} experts, top-{cfg['top_k']}, "
             f"{cfg['num_layers']} layers); calibration windows of {cfg['seq_len']} tokens per domain: {windows} "
             f"(auto judges its candidates by {result.get('judge_folds') or 4}-fold cross-fitting on them and exports "
             f"the chosen criterion's plan on every window); {result['eval_sequences']} "
             f"held-out windows per domain; {result['seconds']:.0f} s in all.", ""]
    oracle = any(len(row["auto_candidates"]) > 1 for row in result["rows"])  # --oracle
    head = ("| ratio | calib | " + " | ".join(criteria) + " | naee | **auto** | auto chose | best single | "
            "auto ≤ best |" + (" best of auto's candidates |" if oracle else ""))
    rule = "|---:|---|" + "---:|" * len(criteria) + "---:|---:|---|---|---|" + ("---:|" if oracle else "")
    for metric, what in METRICS.items():
        wins, n = summary(result, metric)
        lines += [f"### Held-out perplexity ratio, {what}: auto ≤ best single criterion on {wins}/{n} rows", "",
                  head, rule]
        for row in result["rows"]:
            vals = {c: _value(row["single"][c], row, metric) for c in criteria}
            best = min(vals, key=vals.get)
            auto = _value(row["auto"], row, metric)
            best_candidate = min(_value(c["held_out"], row, metric) for c in row["auto_candidates"].values())
            cells = " | ".join(f"**{v:.3f}**" if c == best else f"{v:.3f}" for c, v in vals.items())
            lines.append(f"| {row['ratio']:.0%} | {row['calib']} | {cells} | {_value(row['naee'], row, metric):.3f} "
                         f"| **{auto:.3f}** | {row['auto_choice']} | {best} | "
                         f"{'yes' if auto <= vals[best] + 1e-12 else f'no (+{auto / vals[best] - 1:.2%})'} | "
                         + (f" {best_candidate:.3f} |" if oracle else ""))
        lines.append("")
    lines += ["### Every method against the per-row best single criterion (a choice that looks at held-out text), "
              f"{METRICS['own']}", "", "| method | rows where it is the best single or better | within 0.5 % | "
              "mean excess | worst excess |", "|---|---:|---:|---:|---:|"]
    for name in [*criteria, "naee", "auto"]:
        excess = []
        for row in result["rows"]:
            best = min(_value(row["single"][c], row, "own") for c in criteria)
            got = row["single"][name] if name in criteria else row[name]
            excess.append(math.log(_value(got, row, "own") / best))
        n = len(excess)
        lines.append(f"| {'**auto**' if name == 'auto' else name} | {sum(e <= 1e-12 for e in excess)}/{n} | "
                     f"{sum(e <= math.log(1.005) for e in excess)}/{n} | {math.exp(sum(excess) / n) - 1:+.2%} | "
                     f"{math.exp(max(excess)) - 1:+.2%} |")
    lines.append("")
    lines += ["### What auto's judge saw (perplexity ratio = exp(NLL − NLL of the original), NLL = mean of the "
              "cross-fitted and the in-sample NLL, mean over sets) against the held-out value of the same candidate",
              ""]
    for row in result["rows"]:
        sec = row["auto_section"]
        naee = "NAEE included" if sec["naee"]["included"] else f"NAEE skipped ({sec['naee']['reason']})"
        held = {c: f" → {_value(v['held_out'], row, 'own'):.3f}" for c, v in row["auto_candidates"].items()}
        ranked = "; ".join(f"{r['candidate']} ×{math.exp(r['nll'] - sec['original_nll']):.4f}"
                           + held.get(r["candidate"], "") for r in sec["ranking"])
        pl = sec["per_layer"]
        if "nll_second_half" in pl:
            h = pl["nll_second_half"]
            verdict = "chosen" if sec["chosen"] == "auto:per_layer" else "not chosen"
            single = next(c for c in h if c != "auto:per_layer")
            ranked += (f"; per-layer composition on the B folds {h['auto:per_layer'] - h[single]:+.4f} "
                       f"nats/token against {single} ({verdict})")
        same = {True: "; exported plan = that criterion's own", False: "; exported plan DIFFERS from that criterion's",
                None: ""}[row.get("same_plan")]
        lines.append(f"- {row['ratio']:.0%} {row['calib']}: {ranked} ({naee}; {sec['judge']['tokens']} judged tokens;"
                     f" auto took {sec['seconds']['total']:.0f} s{same})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
