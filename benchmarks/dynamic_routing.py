"""Quality vs active experts per token of the routing policies on the testbed (top-2 of 16, 4 MoE layers).

For each policy several points between 2 and 1 active experts per token:

- topk: k = 2 (the original) and k = 1 (a top-2 model has no point between);
- top_p: p per layer fitted on calibration text to target_active A (`routing/fit.py`, scope per_layer);
- naee_skip: NAEE's per-layer β (median w_(2)/w_(1)), and β scaled by one λ to target A (scope global);
- otp: MC# OTP selectors trained on calibration text for target A (`routing/otp.py`; cost per point reported);
- a 25 %-expert-pruned testbed (tcess_top1, ratio 0.25) with top_p on top (ratios against the *unpruned* original).

Per point: mean held-out perplexity ratio (geo-mean over the 4 domains) against the original, the measured average
active experts per token on the held-out windows (`routing_report`), routed-expert FLOPs per token, and the eager
wall time of one forward (transformers' eager expert loop, where weight-0 slots are skipped: median of 5, as a
ratio to the original's median measured next to it). Writes OUT.json, OUT.md and OUT.png, and says which policy is
best at 1.5 active experts per token (−25 %), each curve linearly interpolated at 1.5.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/dynamic_routing.py [--out benchmarks/results/dynamic_routing]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from heldout import HeldOut, results_path, save_results

from moeprune import api
from moeprune.calibration.data import build_sets
from moeprune.eval.perplexity import evaluate_sets
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.routing.apply import apply_routing, remove_routing, reset_counters, routing_report
from moeprune.routing.fit import capture_weights, fit_naee, fit_top_p
from moeprune.routing.otp import OTPConfig, train_otp
from moeprune.routing.plan import RoutingPlan

TARGETS = (1.9, 1.75, 1.5, 1.25, 1.1)
OTP_TARGETS = (1.75, 1.5, 1.25, 1.1)


def wall(model, ids, plan) -> float:
    """Median eager wall time of 5 forwards with `plan` (None: the model's own routing), as a ratio to the
    original's median measured interleaved with it."""
    def once() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids)
        return time.perf_counter() - start

    base, pol = [], []
    for _ in range(5):
        remove_routing(model)
        base.append(once())
        if plan is not None:
            apply_routing(model, plan)
        pol.append(once())
    remove_routing(model)
    return statistics.median(pol) / statistics.median(base)


def point(ho: HeldOut, model, ids, name: str, plan: RoutingPlan | None, **extra) -> dict:
    if plan is not None:
        apply_routing(model, plan)
        reset_counters(model)
    per, mean = ho.ratios(evaluate_sets(model, ho.held))
    rep = routing_report(model) if plan is not None else None
    active = rep["active_per_token"] if rep else 2.0
    out = {"policy": name, "active": active, "ratio": mean, "domains": per,
           "flops_ratio": rep["flops_ratio"] if rep else 1.0,
           "routed_flops_per_token": rep["routed_flops_per_token"] if rep else None,
           "computed": rep["computed_per_token"] if rep else 2.0, **extra}
    out["wall_ratio"] = wall(model, ids, plan)
    print(f"{name:<10} {str(extra.get('setting', '')):<16} active {active:5.3f}  ppl x{mean:6.4f}  "
          f"FLOPs x{out['flops_ratio']:5.3f}  wall x{out['wall_ratio']:5.3f}", flush=True)
    return out


def curve(model, adapter, ho, ids, sets, weights, otp_steps: int) -> list[dict]:
    layers = adapter.moe_layers()
    k = adapter.top_k
    pts = [point(ho, model, ids, "topk", None, setting="k=2 (original)")]
    pts.append(point(ho, model, ids, "topk", RoutingPlan("topk", k, layers, k=1), setting="k=1"))
    for a in TARGETS:
        plan = RoutingPlan("top_p", k, layers, thresholds=fit_top_p(weights, a, "per_layer", 1, k), k_min=1, k_max=k,
                           target_active=a, scope="per_layer")
        pts.append(point(ho, model, ids, "top_p", plan, setting=f"A={a}", target=a))
    th, beta, _ = fit_naee(weights, None, "global")
    pts.append(point(ho, model, ids, "naee_skip", RoutingPlan("naee_skip", k, layers, thresholds=th, beta=beta),
                     setting="median beta"))
    for a in TARGETS:
        th, beta, lam = fit_naee(weights, a, "global")
        plan = RoutingPlan("naee_skip", k, layers, thresholds=th, beta=beta, scale=lam, target_active=a,
                           scope="global")
        pts.append(point(ho, model, ids, "naee_skip", plan, setting=f"A={a} l={lam:.2f}", target=a))
    for a in OTP_TARGETS:
        remove_routing(model)
        res = train_otp(model, adapter, sets, OTPConfig(a, steps=otp_steps))
        plan = RoutingPlan("otp", k, layers, thresholds=dict.fromkeys(layers, 0.0), target_active=a)
        plan.selectors = res.selectors
        pts.append(point(ho, model, ids, "otp", plan, setting=f"A={a}", target=a, cost=res.cost, shift=res.shift))
    return pts


def at(points: list[dict], policy: str, x: float) -> float | None:
    """The policy's ratio linearly interpolated at `x` active experts (None outside its measured range)."""
    pts = sorted((p["active"], p["ratio"]) for p in points if p["policy"] == policy)
    xs, ys = [a for a, _ in pts], [r for _, r in pts]
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def plot(points: list[dict], pruned: list[dict], out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, marker in (("topk", "s"), ("top_p", "o"), ("naee_skip", "^"), ("otp", "D")):
        pts = sorted((p["active"], p["ratio"]) for p in points if p["policy"] == policy)
        ax.plot([a for a, _ in pts], [r for _, r in pts], marker=marker, label=policy)
    pts = sorted((p["active"], p["ratio"]) for p in pruned)
    ax.plot([a for a, _ in pts], [r for _, r in pts], marker="x", linestyle="--", label="tcess_top1 25% + top_p")
    ax.axvline(1.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("active experts per token (held-out, mean over layers)")
    ax.set_ylabel("held-out perplexity ratio (geo-mean of 4 domains)")
    ax.set_title("testbed (top-2 of 16): quality vs active experts")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/dynamic_routing")
    ap.add_argument("--testbed", default=None)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-sequences", type=int, default=16)
    ap.add_argument("--otp-steps", type=int, default=150)
    args = ap.parse_args()
    out = results_path(args.out)
    torch.set_num_threads(1)
    start = time.perf_counter()
    ho = HeldOut.build(args.testbed, args.calib_samples, args.eval_sequences)
    sets = build_sets(ho.calib.calib_config(), ho.tokenizer)
    ids = ho.held[0].input_ids[:4]  # [4, S] for wall time

    model = load_model(ho.tb.path, dtype="float32")
    model.set_experts_implementation("eager")
    adapter = get_adapter(model.config, model=model)
    weights = capture_weights(model, adapter, sets, 8)
    points = curve(model, adapter, ho, ids, sets, weights, args.otp_steps)

    with tempfile.TemporaryDirectory() as tmp:
        api.prune(ho.tb.path, f"{tmp}/p25", method="tcess_top1", ratio=0.25, calib=ho.calib, run_verify=False)
        pm = load_model(f"{tmp}/p25", dtype="float32")
    pm.set_experts_implementation("eager")
    pad = get_adapter(pm.config, model=pm)
    pw = capture_weights(pm, pad, sets, 8)
    pruned = [point(ho, pm, ids, "p25+top_p", None, setting="pruned, k=2")]
    for a in (1.75, 1.5, 1.25):
        plan = RoutingPlan("top_p", 2, pad.moe_layers(), thresholds=fit_top_p(pw, a, "per_layer", 1, 2), k_min=1,
                           k_max=2, target_active=a, scope="per_layer")
        pruned.append(point(ho, pm, ids, "p25+top_p", plan, setting=f"A={a}", target=a))

    best = {p: at(points, p, 1.5) for p in ("top_p", "naee_skip", "otp", "topk")}
    ranked = sorted(((v, p) for p, v in best.items() if v is not None))
    plot(points, pruned, out)
    seconds = time.perf_counter() - start
    result = {"testbed": str(ho.tb.path), "calib_samples": args.calib_samples, "eval_sequences": args.eval_sequences,
              "otp_steps": args.otp_steps, "points": points, "pruned_25_top_p": pruned, "at_1.5": best,
              "best_at_1.5": ranked[0][1] if ranked else None, "seconds": seconds}
    rows = ["| policy | setting | active/token | ppl ratio | routed FLOPs | eager wall | python | english | arithmetic "
            "| records |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in points + pruned:
        d = p["domains"]
        rows.append(f"| {p['policy']} | {p.get('setting', '')} | {p['active']:.3f} | {p['ratio']:.4f} | "
                    f"x{p['flops_ratio']:.3f} | x{p['wall_ratio']:.3f} | "
                    + " | ".join(f"{d[k]:.4f}" for k in ho.domains) + " |")
    otp = [p for p in points if p["policy"] == "otp"]
    cost = "; ".join(f"A={p['target']}: {p['cost']['seconds']:.0f}s, {p['cost']['steps']} steps, "
                     f"{p['cost']['tokens']} tokens, shift {p['shift']:+.2f}" for p in otp)
    line = ", ".join(f"{p} x{v:.4f}" for v, p in ranked)
    md = (f"# Dynamic routing on the testbed: quality vs active experts\n\n"
          f"{ho.tb.path.name}, top-2 of 16, calibration {args.calib_samples} windows/domain, held-out "
          f"{args.eval_sequences} windows/domain; ratios vs the original (geo-mean over domains). Eager wall time: "
          f"4x{ids.shape[1]} tokens, one thread, median of 5 over the model's own median without the policy. "
          f"Pruned rows: tcess_top1 at ratio 0.25, then top_p (ratios vs the unpruned original).\n\n"
          + "\n".join(rows) + "\n\n"
          f"**At 1.5 active experts per token (-25 %), interpolated:** {line}; best: **{result['best_at_1.5']}**. "
          "(topk has only k=2 and k=1 on a top-2 model: its value at 1.5 is the line between them, not a policy.)\n\n"
          f"OTP training cost (AdamW, {args.otp_steps} steps of 8 windows, KL to the original): {cost}.\n\n"
          f"Total run: {seconds:.0f}s.\n")
    save_results(out, result, md)


if __name__ == "__main__":
    main()
