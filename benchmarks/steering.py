"""Expert steering (MoTE) on the testbed: find the records experts, switch them off, force them on.

    python benchmarks/steering.py [--testbed DIR] [--top 8] [--seeds 5] [--out benchmarks/results/steering]

1. Contrast (`moeprune.steer`, the library behind `moeprune steer`): the testbed is calibrated on its calibration
   text (`data/<domain>.calib.txt`, every window); --with records, --without arithmetic, english, python; the
   `--top` experts of largest routing-frequency difference (z >= 3) across all layers form the plan.
2. Off: held-out perplexity (`data/<domain>.heldout.txt`, `--eval-sequences` windows per domain) with the plan's
   experts switched off, as a ratio to the original per domain, against two random controls of the same size,
   each averaged over `--seeds` seeds: `random` (any `--top` (layer, expert) pairs) and `random, same layers` (as
   many experts per layer as the plan, drawn at random in each layer).
3. On: greedy generation (`--new-tokens` tokens) from neutral prompts (English sentence starts, no digit, brace or
   quote; half of them short lines ending in a newline) with the plan's experts forced on at several strengths,
   and the same number of random experts forced on (mean over the seeds). Records-likeness of the generated text:
       json_lines = lines that parse as a JSON object / complete non-empty generated lines
       json_any   = fraction of prompts whose generation holds at least one such line
       brace      = fraction of non-empty generated lines (the last, unfinished one too) that start with '{"'
       keys       = distinct record keys ('"id":', '"email":', ... the 9 of the records domain) per generation
   ("generated lines": the completion split at newlines; the first piece continues the prompt's line and counts
   with the prompt in front of it.)

Writes OUT.json (every number, the plan and sample generations) and OUT.md; prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from heldout import HeldOut, results_path, save_results

from moeprune.calibration.data import build_sets
from moeprune.calibration.run import calibrate_model
from moeprune.eval.perplexity import evaluate_sets
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.steer.apply import steering
from moeprune.steer.plan import SteerEntry, SteerPlan
from moeprune.steer.run import plan_from_stats

BEHAVIOUR = "records"
STARTS = ("The", "In the", "This is", "It was", "We", "A new", "There are", "When")
LINES = tuple(p + ".\n" for p in ("Hello", "The end", "Thank you", "See below", "Here it is", "Done", "Next", "Yes"))
PROMPTS = STARTS + LINES  # sentence starts, and short lines ending in a newline (where a record line could begin)
SHOWN = (0, len(STARTS))  # sample generations kept in the results
RECORD_KEYS = ("id", "name", "email", "age", "born", "city", "dept", "salary", "monthly")
STRENGTHS = (1.0, 1.5, 2.0, 2.5, 4.0)


def json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def records_likeness(prompts: tuple[str, ...], completions: list[str]) -> dict:
    complete, parsed, any_json, starts, lines_all = 0, 0, 0, 0, 0
    for p, c in zip(prompts, completions, strict=True):
        pieces = (p + c).split("\n")
        finished = pieces[:-1]  # the last piece may be cut off by the token limit
        ok = [json_object(x.strip()) for x in finished if x.strip()]
        complete += len(ok)
        parsed += sum(ok)
        any_json += any(ok)
        nonempty = [x.strip() for x in pieces if x.strip()]
        lines_all += len(nonempty)
        starts += sum(x.startswith('{"') for x in nonempty)
    keys = sum(len({k for k in RECORD_KEYS if f'"{k}":' in c}) for c in completions) / len(prompts)
    return {"json_lines": parsed / complete if complete else 0.0, "json_any": any_json / len(prompts),
            "brace": starts / lines_all if lines_all else 0.0, "keys": keys, "complete_lines": complete}


@torch.no_grad()
def generate(model, tok, prompts: tuple[str, ...], new_tokens: int) -> list[str]:
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]  # [1, P]
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or 0)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def random_plans(plan: SteerPlan, seeds: int, same_layers: bool, action: str, strength: float | None = None
                 ) -> list[SteerPlan]:
    """`seeds` plans of as many random experts as `plan` (never the plan's own), per layer as the plan when
    `same_layers`, else anywhere."""
    chosen = {(e.layer, e.expert) for e in plan.steer}
    pool = [(la, j) for la in plan.layers for j in range(plan.num_experts) if (la, j) not in chosen]
    out = []
    for seed in range(seeds):
        rng = random.Random(seed)
        if same_layers:
            picks = []
            for la in plan.layers:
                n = sum(1 for e in plan.steer if e.layer == la)
                picks += rng.sample([p for p in pool if p[0] == la], n)
        else:
            picks = rng.sample(pool, len(plan.steer))
        entries = tuple(SteerEntry(la, j, action, strength if action == "on" else None) for la, j in sorted(picks))
        out.append(SteerPlan(plan.model_type, plan.num_experts, plan.top_k, plan.routing, plan.layers, entries))
    return out


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def to_markdown(r: dict) -> str:
    doms = r["domains"]
    others = [d for d in doms if d != BEHAVIOUR]
    lines = [f"Testbed `{Path(r['testbed']).name}` (E={r['num_experts']}, top-{r['top_k']}, {len(r['layers'])} MoE "
             f"layers = {r['num_experts'] * len(r['layers'])} experts); --with {BEHAVIOUR}, --without "
             f"{', '.join(others)}; {r['eval_sequences']} held-out windows per domain; {r['seconds']:.0f} s in all.",
             "", f"`{' '.join(['python benchmarks/steering.py', *r['argv']])}`", "",
             f"Plan: the top {len(r['plan']['steer'])} experts by Δ routing frequency (z >= {r['min_z']:g}):", "",
             "| layer | expert | f records | f others | Δf | Δ gate mass | z |", "|---:|---:|---:|---:|---:|---:|---:|"]
    rows = {(x["layer"], x["expert"]): x for x in r["plan"]["experts"]}
    for e in r["plan"]["steer"]:
        x = rows[(e["layer"], e["expert"])]
        lines.append(f"| {x['layer']} | {x['expert']} | {x['freq_with']:.3f} | {x['freq_without']:.3f} | "
                     f"{x['d_freq']:+.3f} | {x['d_mass']:+.3f} | {x['z']:.1f} |")
    lines += ["", f"Switched off: held-out perplexity ratio to the original (random controls: mean over "
                  f"{r['seeds']} seeds, [min, max]):", "",
              "| experts off | " + " | ".join(doms) + " | others (geo-mean) |", "|---|" + "---:|" * (len(doms) + 1)]
    lines.append("| none (original perplexity) | " + " | ".join(f"{r['base_ppl'][d]:.3f}" for d in doms) + " | |")
    for name, row in r["off"].items():
        cells = []
        for d in doms + ["others"]:
            v = row["mean"][d]
            rng = f" [{row['min'][d]:.2f}, {row['max'][d]:.2f}]" if "min" in row else ""
            cells.append(f"×{v:.3f}{rng}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Forced on: greedy generations ({r['new_tokens']} new tokens) from {len(r['prompts'])} neutral "
                  f"prompts; random control forced on at the same strength, mean over {r['seeds']} seeds:", "",
              "| experts on | strength | keys | json_lines | json_any | brace | complete lines |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["on"]:
        lines.append(f"| {row['experts']} | {row['strength']:g} | {row['keys']:.2f} | {row['json_lines']:.3f} | "
                     f"{row['json_any']:.3f} | {row['brace']:.3f} | {row['complete_lines']:.1f} |")
    lines += ["", "Sample generations (prompt → completion: the first sentence start and the first line prompt):", ""]
    for label, samples in r["samples"].items():
        lines.append(f"- {label}: " + "; ".join(f"`{p!r} → {c[:90]!r}`" for p, c in samples))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", help="testbed folder (default: the cached one, built when missing)")
    ap.add_argument("--top", type=int, default=8, help="experts in the plan, across layers")
    ap.add_argument("--min-z", type=float, default=3.0)
    ap.add_argument("--seeds", type=int, default=5, help="random controls")
    ap.add_argument("--calib-samples", type=int, default=128, help="calibration windows per domain (at most all)")
    ap.add_argument("--eval-sequences", type=int, default=32, help="held-out windows per domain")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--out", default="benchmarks/results/steering", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    out = results_path(args.out)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    h = HeldOut.build(args.testbed, args.calib_samples, args.eval_sequences)
    model = load_model(h.tb.path, dtype="float32")
    adapter = get_adapter(model.config, model=model)
    sets = build_sets(h.calib.calib_config(), h.tokenizer)
    stats = calibrate_model(model, sets, h.calib, source=h.tb.path)
    others = [d for d in h.domains if d != BEHAVIOUR]
    plan = plan_from_stats(stats, [BEHAVIOUR], others, top=args.top, min_z=args.min_z)
    print(f"plan: {plan.describe()}  ({time.perf_counter() - t0:.0f} s)")

    def off_ratios(p: SteerPlan) -> dict[str, float]:
        with steering(model, p, adapter):
            ratios, _ = h.ratios(evaluate_sets(model, h.held))
        ratios["others"] = math.exp(mean([math.log(ratios[d]) for d in others]))  # geo-mean of the other domains
        return ratios

    off = {f"the plan's {len(plan.steer)} experts": {"mean": off_ratios(plan)}}
    for label, same in ((f"random {len(plan.steer)}", False), (f"random {len(plan.steer)}, same layers", True)):
        runs = [off_ratios(p) for p in random_plans(plan, args.seeds, same, "off")]
        keys = list(runs[0])
        off[label] = {"mean": {k: mean([x[k] for x in runs]) for k in keys},
                      "min": {k: min(x[k] for x in runs) for k in keys},
                      "max": {k: max(x[k] for x in runs) for k in keys}, "runs": runs}
    print(f"off done ({time.perf_counter() - t0:.0f} s)")

    on, samples = [], {}
    base = generate(model, h.tokenizer, PROMPTS, args.new_tokens)
    on.append({"experts": "none (original)", "strength": 0.0, **records_likeness(PROMPTS, base)})
    samples["original"] = [(PROMPTS[i], base[i]) for i in SHOWN]
    for s in STRENGTHS:
        with steering(model, plan.with_action("on", s), adapter):
            gen = generate(model, h.tokenizer, PROMPTS, args.new_tokens)
        on.append({"experts": f"the plan's {len(plan.steer)}", "strength": s, **records_likeness(PROMPTS, gen)})
        samples[f"plan on, strength {s:g}"] = [(PROMPTS[i], gen[i]) for i in SHOWN]
        runs = []
        for p in random_plans(plan, args.seeds, False, "on", s):
            with steering(model, p, adapter):
                runs.append(records_likeness(PROMPTS, generate(model, h.tokenizer, PROMPTS, args.new_tokens)))
        on.append({"experts": f"random {len(plan.steer)}", "strength": s,
                   **{k: mean([x[k] for x in runs]) for k in runs[0]}})
        print(f"on {s:g} done ({time.perf_counter() - t0:.0f} s)")

    result = {"testbed": str(h.tb.path), "argv": argv, "domains": h.domains, "num_experts": plan.num_experts,
              "top_k": plan.top_k, "layers": list(plan.layers), "min_z": args.min_z, "seeds": args.seeds,
              "eval_sequences": args.eval_sequences, "new_tokens": args.new_tokens, "prompts": list(PROMPTS),
              "base_ppl": {d: s.perplexity for d, s in h.base.items()}, "plan": plan.to_dict(), "off": off,
              "on": on, "samples": samples, "seconds": time.perf_counter() - t0}
    save_results(out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
