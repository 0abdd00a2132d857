"""Generative scores next to perplexity ratios on the testbed: does likelihood see what generation sees?

    python benchmarks/generation_quality.py [--testbed DIR] [--items 64] [--out benchmarks/results/generation_quality]

Variants (each made by moeprune's own pipeline, `api.prune` / `api.quantize`, calibration included, on
`--calib-samples` calibration windows per domain): expert removal at 25 / 50 % with `--expert-method` (default
tcess_top1: the best single criterion at 50 % in benchmarks/results/quality.md and within 0.012 of the best at 25 %;
`auto` judges a dozen candidates per ratio and would not fit the time budget); every merge method (msmoe, hcsmoe,
submoe, dern, default options) at 25 / 50 %; HEAPr neuron removal at 50 % (expert budget, as neuron_quality.py /
repair.py); the 50 % expert removal followed by closed-form repair `all`; w4a16 GPTQ quantization.

Every model is scored in the same run on the same held-out windows (`--eval-sequences` per domain) and the same
generative items (`--items` per task, seed 0, built by `eval/gen_tasks.py` from the held-out text):

    ppl ratio(domain) = perplexity(variant, domain) / perplexity(original, domain)
    generative score(task) = mean over items of the task's primary metric (`eval/scorers.py`), greedy

Writes OUT.json (every row, every metric) and OUT.md; prints the markdown.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from heldout import HeldOut, results_path, save_results

from moeprune import api
from moeprune.eval.gen_tasks import TASKS, build_items
from moeprune.eval.generative import evaluate_generative
from moeprune.eval.perplexity import evaluate_sets
from moeprune.io.load import load_model

MERGES = ("msmoe", "hcsmoe", "submoe", "dern")
SHOWN = {"arithmetic": ("exact_match", "well_formed"), "records": ("strict", "json", "email"),
         "python": ("parses", "finished")}


def score(h: HeldOut, folder: Path, items: list[dict], batch_size: int) -> dict:
    model = load_model(folder, dtype="float32")
    ppl = evaluate_sets(model, h.held)
    gen = evaluate_generative(model, h.tokenizer, items, batch_size)
    ratios, geo = h.ratios(ppl)
    return {"ppl": {d: s.perplexity for d, s in ppl.items()}, "ratios": ratios, "geo_mean": geo,
            "generative": {t: g.to_dict() for t, g in gen.items()},
            "samples": {t: g.completions[:2] for t, g in gen.items()}}


def variants(tb: Path, h: HeldOut, expert_method: str) -> list[tuple[str, Callable[[Path], Path]]]:
    def prune(recipe: list[dict]) -> Callable[[Path], Path]:
        return lambda out: api.prune(tb, out, recipe, calib=h.calib, run_verify=False)[0].out

    out = [(f"experts −{r:.0%} ({expert_method})", prune([{"method": expert_method, "ratio": r}])) for r in (0.25, 0.5)]
    out += [(f"merge {m} −{r:.0%}", prune([{"method": m, "ratio": r}])) for m in MERGES for r in (0.25, 0.5)]
    out.append(("heapr neurons −50%", prune([{"method": "heapr", "ratio": 0.5, "budget": "expert"}])))
    out.append(("experts −50% + repair all", prune([{"method": expert_method, "ratio": 0.5},
                                                       {"method": "repair", "kind": "all"}])))
    out.append(("w4a16 gptq", lambda o: api.quantize(tb, o, scheme="w4a16", algorithm="gptq", calib=h.calib,
                                                      run_verify=False)[0].out))
    return out


def to_markdown(result: dict) -> str:
    tasks = list(SHOWN)
    base = result["rows"][0]
    head = ["variant", "ppl geo"] + [f"{t} ppl" for t in tasks] + [f"{t} {m}" for t in tasks for m in SHOWN[t]]
    lines = [f"Testbed `{Path(result['testbed']).name}`; {result['items']} items per task, "
             f"{result['eval_sequences']} held-out windows per domain, {result['calib_samples']} calibration windows "
             f"per domain; {result['seconds']:.0f} s in all. Generative scores are fractions of items (greedy); "
             "ppl columns are ratios to the original (its perplexities in the first row).", "",
             f"`python benchmarks/generation_quality.py {' '.join(result['argv'])}`", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in result["rows"]:
        first = row is base
        ppl = [f"{base['ppl'][t]:.2f}" if first else f"×{row['ratios'][t]:.3f}" for t in tasks]
        gen = [f"{row['generative'][t][m]:.3f}" for t in tasks for m in SHOWN[t]]
        geo = "" if first else f"×{row['geo_mean']:.3f}"
        lines.append(f"| {row['label']} | {geo} | " + " | ".join(ppl + gen) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", help="testbed folder (default: the cached one, built when missing)")
    ap.add_argument("--items", type=int, default=64, help="generative items per task")
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows per domain")
    ap.add_argument("--eval-sequences", type=int, default=64, help="held-out windows per domain")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    ap.add_argument("--expert-method", default="tcess_top1")
    ap.add_argument("--out", default="benchmarks/results/generation_quality", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    out = results_path(args.out)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    h = HeldOut.build(args.testbed, args.calib_samples, args.eval_sequences)
    tb = h.tb.path
    heldout = h.tb.data("heldout")
    items = [i for t in TASKS for i in build_items(t, heldout[t].read_text(encoding="utf-8"), args.items, 0)]
    rows = [{"label": "original", **score(h, tb, items, args.batch_size), "seconds": 0.0}]
    for label, make in variants(tb, h, args.expert_method):
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            folder = make(Path(tmp) / "out")
            rows.append({"label": label, **score(h, folder, items, args.batch_size)})
        rows[-1]["seconds"] = round(time.perf_counter() - t, 1)
        g = rows[-1]["generative"]
        print(f"  {label:<32} ppl ×{rows[-1]['geo_mean']:.3f}  " + "  ".join(
            f"{k} {g[k][g[k]['primary']]:.3f}" for k in g) + f"  {rows[-1]['seconds']:.0f} s", flush=True)
    result = {"testbed": str(tb), "items": args.items, "calib_samples": args.calib_samples,
              "eval_sequences": args.eval_sequences, "expert_method": args.expert_method, "argv": argv,
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    save_results(out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
