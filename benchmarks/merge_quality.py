"""Expert merging vs expert pruning on the testbed: per-domain perplexity ratio and greedy-generation checks.

    python benchmarks/merge_quality.py [--testbed DIR] [--ratios 0.25 0.5] [--out benchmarks/results/merge_quality]
    python benchmarks/merge_quality.py --dern-sweep [--testbed DIR] [--out benchmarks/results/dern_sweep]

One calibration pass over the four calibration domains (with every-expert probes for the output-based groupings);
mixed statistics for every plan. Rows per ratio:
- pruning references: tcess_top1 (the default criterion) and frequency, through the same expert-removal surgery;
- merges: msmoe, hcsmoe, submoe, dern, each with the dominant's router row and with the usage-weighted row;
  ablations: msmoe without neuron alignment, msmoe with the global (adaptive) budget, submoe at half rank,
  dern at thresholds 0.0 / 0.2 / 0.4.
`--dern-sweep` replaces the merge rows by DERN's threshold choices (`merge/dern_threshold.py`): the old fixed cosine
0.4; `auto` with recombined fraction ρ ∈ {0, ¼, ½, ¾, 1}, one cosine per layer; ρ ∈ {¼, ½, ¾} with one cosine pooled
over the layers; and `block-error`: per layer the ρ whose merged MoE block has the least squared error against the
original block on the calibration windows (the original model's block inputs, `--block-windows` per domain).
Each plan is applied to an in-memory copy (the surgery `apply` saves and `verify` checks) and scored on the same
held-out windows:

    ratio(domain) = perplexity(model, domain) / perplexity(original, domain),  geo-mean over the 4 domains;
    generation: the first `--prompt-tokens` tokens of `--gen-prompts` held-out windows per domain, 32 greedy tokens;
      agree = fraction of positions equal to the original model's greedy continuation, prefix = mean common
      prefix / 32, distinct-3 = distinct 3-grams / all (repetition loops drive it down; the original's is shown).

Writes OUT.json (every row, with one decoded sample per domain and model) and OUT.md, prints the markdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

from moeprune import api
from moeprune.calibration.data import build_sets
from moeprune.calibration.run import CalibrateOptions, load_tokenizer
from moeprune.eval.generate import agreement, distinct_ngrams, greedy_continuations
from moeprune.eval.perplexity import evaluate_sets
from moeprune.eval.run import EvalOptions
from moeprune.eval.table import ratio_table
from moeprune.io.load import load_model
from moeprune.merge.average import merge_average
from moeprune.merge.build import make_merge_plan
from moeprune.models import get_adapter
from moeprune.surgery.in_memory import apply_plan
from moeprune.surgery.merge import apply_merge_plan
from moeprune.testbed import build_testbed

MERGES = ("msmoe", "hcsmoe", "submoe", "dern")
RHOS = (0.0, 0.25, 0.5, 0.75, 1.0)
PRUNES = ("tcess_top1", "frequency")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", help="testbed folder (default: the cached one, built when missing)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration windows per domain")
    ap.add_argument("--eval-sequences", type=int, default=64, help="held-out windows per domain")
    ap.add_argument("--probe-stride", type=int, default=32,
                    help="probe tokens 1 in N (the results were measured with 32 = ⌈4E/k⌉; the default of "
                         "`calibrate` is ⌈8E/k⌉ = 64 on the testbed)")
    ap.add_argument("--gen-prompts", type=int, default=16, help="generation prompts per domain")
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="writes OUT.json and OUT.md (default benchmarks/results/"
                                                "merge_quality, or dern_sweep with --dern-sweep)")
    ap.add_argument("--dern-sweep", action="store_true", help="DERN threshold rows instead of the merge rows")
    ap.add_argument("--block-windows", type=int, default=16,
                    help="--dern-sweep: calibration windows per domain for the block-error choice of ρ")
    args = ap.parse_args(argv)
    args.out = args.out or f"benchmarks/results/{'dern_sweep' if args.dern_sweep else 'merge_quality'}"
    out = Path(args.out)
    if not out.parent.is_dir():
        sys.exit(f"--out {out}: folder {out.parent} does not exist")
    t0 = time.perf_counter()
    tb = build_testbed(args.testbed)
    domains = list(tb.data("calib"))
    stats = api.calibrate(tb.path, CalibrateOptions(tb.specs("calib"), samples=args.calib_samples,
                                                    seq_len=tb.seq_len, probe_stride=args.probe_stride))
    calib_seconds = time.perf_counter() - t0
    tok = load_tokenizer(tb.path, None)
    held = build_sets(EvalOptions(max_sequences=args.eval_sequences).for_model(tb.path).data_config(), tok)
    prompts = {s.name: s.input_ids[: args.gen_prompts, : args.prompt_tokens] for s in held}  # [n, P] no padding
    original = load_model(tb.path, dtype="float32")
    adapter = get_adapter(original.config, model=original)
    base = evaluate_sets(original, held)
    gen_base = {d: greedy_continuations(original, p, args.new_tokens) for d, p in prompts.items()}
    rows = []

    def add(label: str, kind: str, ratio: float, model, plan_seconds: float, extra: dict | None = None) -> None:
        scores = evaluate_sets(model, held)
        r = ratio_table(base, {"x": scores})["x"]
        gen = {d: greedy_continuations(model, p, args.new_tokens) for d, p in prompts.items()}
        agree = {d: agreement(gen_base[d], gen[d]) for d in domains}
        row = {"label": label, "kind": kind, "ratio": ratio, "geo_mean": r["mean"],
               "ratios": {d: r[d] for d in domains}, "perplexity": {d: s.perplexity for d, s in scores.items()},
               "agree": {d: a[0] for d, a in agree.items()}, "prefix": {d: a[1] for d, a in agree.items()},
               "distinct3": {d: distinct_ngrams(gen[d]) for d in domains},
               "sample": {d: tok.decode(gen[d][0]) for d in domains}, "plan_seconds": round(plan_seconds, 2),
               **(extra or {})}
        rows.append(row)
        print(f"  {label:<28} {ratio:4.0%} ppl ×{r['mean']:.3f} agree {_mean(row['agree']):.3f} "
              f"distinct3 {_mean(row['distinct3']):.3f}  " + " ".join(f"{d} ×{r[d]:.2f}" for d in domains),
              flush=True)

    add("original", "original", 0.0, original, 0.0)
    for ratio in args.ratios:
        for method in PRUNES:
            t = time.perf_counter()
            plan = api.make_plan(stats, method, ratio)
            model = copy.deepcopy(original)
            apply_plan(model, adapter, plan)
            add(f"prune {method}", "prune", ratio, model, time.perf_counter() - t)
        if args.dern_sweep:
            blocks = block_io(original, adapter, tb, args)
            for label, plan, extra in dern_sweep(stats, original, adapter, ratio, blocks):
                t = time.perf_counter()
                model = copy.deepcopy(original)
                apply_merge_plan(model, adapter, plan)
                n, of = (sum(x[i] for x in plan.recombined.values()) for i in (0, 1))
                add(label, "merge", ratio, model, time.perf_counter() - t,
                    {"method": "dern", "dern_recombined": n / of, "recombined": {str(k): v for k, v in
                                                                                 plan.recombined.items()},
                     "threshold": plan.to_dict()["threshold"], **extra})
            continue
        variants = [(m, dict(router=router), None) for m in MERGES for router in ("dominant", "weighted")]
        variants += [("msmoe", dict(budget="global"), None),
                     ("msmoe", {}, partial(merge_average, align=False)),
                     ("submoe", dict(rank=adapter.expert_width // 2), None),
                     ("dern", dict(threshold=0.2), None), ("dern", dict(threshold=0.0), None)]
        for method, kw, merge_fn in variants:
            t = time.perf_counter()
            plan = make_merge_plan(stats, method, ratio, **kw)
            model = copy.deepcopy(original)
            apply_merge_plan(model, adapter, plan, merge_fn)
            kept = len(plan.groups[plan.layers[0]])
            label = f"merge {method}" + "".join(f" {k}={v}" for k, v in kw.items()) + (" no-align" if merge_fn
                                                                                          else "")
            if kw.get("budget") == "global":
                label += f" (keeps {kept}/{plan.num_experts})"
            add(label, "merge", ratio, model, time.perf_counter() - t,
                {"method": method, "options": kw, "align": merge_fn is None, "note": plan.note, "kept": kept,
                 "dern_recombined": dern_share(original, adapter, plan) if plan.merge == "dern" else None})
    result = {"testbed": str(tb.path), "testbed_config": tb.meta["config"], "domains": domains,
              "calib_samples": args.calib_samples, "eval_sequences": args.eval_sequences,
              "gen": {"prompts": args.gen_prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens},
              "probe_stride": stats.meta["probe_stride"], "probe_tokens": int(stats.combined()[stats.layers[0]]
                                                                             .sums["probe_tokens"].item()),
              "calibration_seconds": round(calib_seconds, 1), "seconds": round(time.perf_counter() - t0, 1),
              "prompt_text": {d: tok.decode(p[0]) for d, p in prompts.items()}, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = to_markdown(result, args.ratios)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def layer_experts(model, adapter, layers):
    from moeprune.surgery.merge import expert_of

    for layer in layers:
        roles = adapter.expert_roles(adapter.block(model, layer))
        yield layer, [expert_of(roles, j) for j in range(adapter.num_experts)]


def block_io(model, adapter, tb, args) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (MoE block input [N, S, H], its output [N, S, H]) of the original on `--block-windows` calibration
    windows per domain (the first ones; the calibration statistics saw them, the held-out windows did not)."""
    from moeprune.calibration.run import prepare

    opts = CalibrateOptions(tb.specs("calib"), samples=args.block_windows, seq_len=tb.seq_len)
    ids = torch.cat([s.input_ids for s in prepare(tb.path, opts)[2]])  # [N, S] (full windows, no padding)
    seen: dict[int, list] = {}
    hooks = [adapter.block(model, layer).register_forward_hook(
        lambda mod, a, out, layer=layer: seen.setdefault(layer, []).append((a[0].detach(), _first(out).detach())))
        for layer in adapter.moe_layers()]
    try:
        with torch.no_grad():
            for b in range(0, len(ids), 16):
                model(input_ids=ids[b : b + 16])
    finally:
        for h in hooks:
            h.remove()
    return {layer: (torch.cat([x for x, _ in v]), torch.cat([y for _, y in v])) for layer, v in seen.items()}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def block_errors(original, adapter, plan, blocks) -> dict[int, float]:
    """Σ‖block_merged(X) − block_original(X)‖² per MoE layer on the recorded block inputs X."""
    model = apply_merge_plan(copy.deepcopy(original), adapter, plan)
    with torch.no_grad():
        return {layer: float((_first(adapter.block(model, layer)(x)) - y).double().square().sum())
                for layer, (x, y) in blocks.items()}


def dern_sweep(stats, original, adapter, ratio: float, blocks) -> list[tuple[str, object, dict]]:
    """(label, plan, extra) of every DERN threshold choice at `ratio` (module docstring); one similarity scan."""
    from moeprune.merge.dern_threshold import choose_thresholds, counts, layer_similarities

    base = make_merge_plan(stats, "dern", ratio)
    sims = {layer: layer_similarities(experts, base.groups[layer])
            for layer, experts in layer_experts(original, adapter, base.layers)}

    def plan_for(threshold, rho=None):
        plan = copy.deepcopy(base)
        plan.threshold, plan.recombine, plan.recombined = threshold, rho, counts(sims, threshold)
        return plan

    out = [("dern fixed 0.4", plan_for(0.4), {"rho": None})]
    per_layer = {rho: choose_thresholds(sims, rho, pooled=False) for rho in RHOS}
    out += [(f"dern auto ρ={rho:g} per-layer", plan_for(per_layer[rho], rho), {"rho": rho}) for rho in RHOS]
    out += [(f"dern auto ρ={rho:g} pooled", plan_for(choose_thresholds(sims, rho, pooled=True), rho), {"rho": rho})
            for rho in RHOS[1:-1]]
    errors = {rho: block_errors(original, adapter, plan_for(per_layer[rho], rho), blocks) for rho in RHOS}
    pick = {layer: min(RHOS, key=lambda r, layer=layer: errors[r][layer]) for layer in base.layers}
    out.append(("dern block-error ρ per layer", plan_for({layer: per_layer[pick[layer]][layer] for layer in pick}),
                {"rho": {str(k): v for k, v in pick.items()},
                 "block_error": {str(r): {str(k): v for k, v in e.items()} for r, e in errors.items()}}))
    return out


def dern_share(model, adapter, plan) -> float:
    """Fraction of the dropped experts' neuron segments that DERN recombined (cosine >= threshold)."""
    from moeprune.merge.dern import dern_assign
    from moeprune.surgery.merge import expert_of

    moved = total = 0
    for layer in plan.layers:
        roles = adapter.expert_roles(adapter.block(model, layer))
        experts = [expert_of(roles, j) for j in range(plan.num_experts)]
        dropped = [j for g in plan.groups[layer] for j in g[1:]]
        assign = dern_assign(experts, [g[0] for g in plan.groups[layer]], dropped, plan.threshold)
        moved += sum(k.numel() for k, _, _ in assign.values())
        total += len(dropped) * experts[0]["gate"].shape[0]
    return moved / max(total, 1)


def _mean(d: dict) -> float:
    return sum(d.values()) / len(d)


def to_markdown(result: dict, ratios: list[float]) -> str:
    domains, rows = result["domains"], result["rows"]
    orig = next(r for r in rows if r["kind"] == "original")
    lines = [f"Testbed `{Path(result['testbed']).name}`: {result['calib_samples']} calibration and "
             f"{result['eval_sequences']} held-out windows per domain; probes every {result['probe_stride']} "
             f"tokens ({result['probe_tokens']} probe tokens per layer); calibration {result['calibration_seconds']}"
             f" s, whole run {result['seconds']:.0f} s. Generation: {result['gen']['prompts']} prompts of "
             f"{result['gen']['prompt_tokens']} tokens per domain, {result['gen']['new_tokens']} greedy tokens; "
             f"the original's distinct-3 is {_mean(orig['distinct3']):.3f}.", ""]
    for ratio in ratios:
        sel = sorted((r for r in rows if r["ratio"] == ratio), key=lambda r: r["geo_mean"])
        lines += [f"### {ratio:.0%} fewer experts (perplexity ratio, lower is better; agree/prefix/distinct-3: "
                  "greedy generation, mean over domains)", "",
                  "| rank | model | " + " | ".join(domains) + " | geo-mean | agree | prefix | distinct-3 |",
                  "|---:|---|" + "---:|" * (len(domains) + 4)]
        for i, r in enumerate(sel, 1):
            lines.append(f"| {i} | {r['label']} | " + " | ".join(f"{r['ratios'][d]:.3f}" for d in domains)
                         + f" | **{r['geo_mean']:.3f}** | {_mean(r['agree']):.3f} | {_mean(r['prefix']):.3f} | "
                         f"{_mean(r['distinct3']):.3f} |")
        lines.append("")
        best = {d: min(sel, key=lambda r, d=d: r["ratios"][d]) for d in domains}
        lines.append("Best per domain: " + ", ".join(f"{d}: {best[d]['label']} ×{best[d]['ratios'][d]:.3f}"
                                                    for d in domains))
        lines.append("")
    sweep = [r for r in rows if "rho" in r]
    if sweep:
        labels = list(dict.fromkeys(r["label"] for r in sweep))
        at = {(r["label"], r["ratio"]): r for r in sweep}
        lines += ["### DERN threshold choices (geo-mean perplexity ratio; recombined share of the dropped segments)",
                  "", "| threshold | " + " | ".join(f"{x:.0%} ratio | {x:.0%} recombined" for x in ratios) + " |",
                  "|---|" + "---:|---:|" * len(ratios)]
        for label in labels:
            cells = [(f"{at[label, x]['geo_mean']:.3f} | {at[label, x]['dern_recombined']:.1%}" if (label, x) in at
                      else "– | –") for x in ratios]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        picks = [f"{r['ratio']:.0%}: {r['rho']}" for r in sweep if isinstance(r["rho"], dict)]
        lines += ["", "Block-error choice of ρ per layer: " + "; ".join(picks), ""]
    dern = [r for r in rows if r.get("dern_recombined") is not None]
    if dern:
        lines += ["DERN: share of the dropped experts' neuron segments recombined into survivors: "
                  + ", ".join(f"{r['ratio']:.0%} {r['label'].removeprefix('merge dern').strip() or 'default'} "
                              f"{r['dern_recombined']:.1%}" for r in dern), ""]
    lines += ["### Greedy samples (first prompt per domain)", ""]
    for d in domains:
        lines += [f"**{d}** — prompt: `{_clip(result['prompt_text'][d])}`", ""]
        for r in [orig] + [r for r in rows if r["ratio"] == max(ratios) and (r["kind"] == "prune" or (
                r["kind"] == "merge" and r.get("options") in ({"router": "dominant"},)))]:
            at = "" if r is orig else f" ({r['ratio']:.0%})"
            lines.append(f"- {r['label']}{at}: `{_clip(r['sample'][d])}`")
        lines.append("")
    return "\n".join(lines)


def _clip(text: str, n: int = 160) -> str:
    text = text.replace("\n", "⏎").replace("`", "'")
    return text if len(text) <= n else text[:n] + "…"


if __name__ == "__main__":
    raise SystemExit(main())
