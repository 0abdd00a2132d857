"""NAEE's token budget and beam width, measured: does searching on an evenly strided subset of the cached tokens
(`max_tokens`), or with a narrower beam, change the experts NAEE drops, and what does that cost in quality?

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/naee_tokens.py [--cases testbed25 testbed50 random32]
        [--caps 0 2048 1024 512] [--beams 4] [--ref-beam 16] [--samples 8]

Cases: the trained testbed (16 experts, top-2; `--samples` windows of 256 tokens per domain, 4 domains) at 25 %
(C(16, 4) = 1 820 subsets: exhaustive) and 50 % (C(16, 8) = 12 870: exhaustive for the reference, beam search for
the variants); the random 32-expert top-4 Qwen3-MoE of `naee_speed.py` at 25 % (8 of 32, beam search;
16·`--samples` random sequences of 64 tokens, a third with 16 padding tokens).

A. One progressive calibration pass per case along the reference choice (every token, exhaustive where possible,
   else beam `--ref-beam`). At each MoE layer, on that same cache, every variant (token cap × beam) runs its own
   precompute + search; reported per variant: layers where it drops the same set as the reference, the excess
   reconstruction error on every cached token, err_all(D_variant) / err_all(D_ref) − 1 (negative: it found a
   better set than a non-exhaustive reference), and its seconds per layer (precompute + search).
B. Testbed cases only: one real progressive NAEE run per variant (each layer searched with that cap and beam, on
   the outputs of the layers it already pruned), the plan applied to a copy of the testbed and scored on the
   held-out windows (`--eval-sequences` per domain): perplexity ratio to the original, geo-mean over domains.

`--checkpoint DIR --calib NAME=PATH` adds case "checkpoint": that model in its own dtype (e.g. the generated
128-expert checkpoint of `big_model.py`), `--calib-samples` windows of `--seq-len` tokens, its first `--max-layers`
MoE layers, part A only, with the reference `--ref-cap` tokens (0: all) and beam `--ref-beam` (not exhaustive).

Cap 0 = every token. torch runs on one thread.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch
from naee_speed import random_case, testbed_case  # same models and calibration (run from benchmarks/)

from moeprune.calibration.data import build_sets
from moeprune.calibration.run import load_tokenizer
from moeprune.calibration.session import collect
from moeprune.eval.perplexity import evaluate_sets
from moeprune.eval.run import EvalOptions
from moeprune.eval.table import ratio_table
from moeprune.models import get_adapter
from moeprune.select.naee_evaluator import fast_evaluator
from moeprune.select.naee_outputs import expert_outputs
from moeprune.select.plan import PrunePlan
from moeprune.select.reconstruction import search
from moeprune.select.uniform import drop_count
from moeprune.surgery.in_memory import apply_plan
from moeprune.testbed import build_testbed

ALL = 1 << 40  # max_bytes / max_tokens that never cap these small caches


@dataclass
class Variant:
    cap: int  # 0 = every token
    beam: int
    rows: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.cap or 'all'} tokens, beam {self.beam}"


def _search(evaluate, E, n_drop, groups, beam, max_exhaustive):
    return search(evaluate, E, n_drop, groups=groups, beam=beam, max_exhaustive=max_exhaustive)


class Sweep:
    """A `decide` hook: per layer the reference search on every token, then each variant on the same cache."""

    def __init__(self, ratio, routing, E, variants: list[Variant], ref_beam: int, ref_exhaustive: int,
                 ref_cap: int = 0, max_layers: int | None = None):
        self.n_drop = drop_count(ratio, E, routing)
        self.groups = routing.n_group if routing.group_limited else 1
        self.E, self.variants, self.ref_beam, self.ref_exhaustive = E, variants, ref_beam, ref_exhaustive
        self.ref_cap, self.max_layers = ref_cap, max_layers
        self.ref_rows: list[dict] = []

    def __call__(self, model, adapter, layer, stats, io) -> list[int]:
        if self.max_layers is not None and len(self.ref_rows) >= self.max_layers:
            raise Enough
        t0 = time.perf_counter()
        full = expert_outputs(model, adapter, layer, io.inputs, io.outputs, io.valid, max_bytes=ALL)
        t_pre = time.perf_counter() - t0
        ev_full = fast_evaluator(model, adapter, layer, full)
        ref_out = full if not self.ref_cap else expert_outputs(model, adapter, layer, io.inputs, io.outputs,
                                                               io.valid, max_tokens=self.ref_cap, max_bytes=ALL)
        ref = _search(ev_full if not self.ref_cap else fast_evaluator(model, adapter, layer, ref_out), self.E,
                      self.n_drop, self.groups, self.ref_beam, self.ref_exhaustive)
        if self.ref_cap:
            ref = dataclasses.replace(ref, error=ev_full(ref.dropped))  # excess errors are on every token
        self.ref_rows.append(dict(layer=layer, tokens=ref_out.tokens, dropped=ref.dropped, exhaustive=ref.exhaustive,
                                  seconds=time.perf_counter() - t0, evaluated=ref.evaluated))
        for v in self.variants:
            t0 = time.perf_counter()
            out = full if not v.cap else expert_outputs(model, adapter, layer, io.inputs, io.outputs, io.valid,
                                                        max_tokens=v.cap, max_bytes=ALL)
            r = _search(fast_evaluator(model, adapter, layer, out), self.E, self.n_drop, self.groups, v.beam, 5000)
            secs = time.perf_counter() - t0 + (t_pre if not v.cap else 0.0)
            same = r.dropped == ref.dropped
            excess = 0.0 if same else ev_full(r.dropped) / ref.error - 1
            v.rows.append(dict(layer=layer, tokens=out.tokens, same=same, dropped=r.dropped, excess=excess,
                               seconds=secs, evaluated=r.evaluated, exhaustive=r.exhaustive))
        return list(ref.dropped)


class Capped:
    """A `decide` hook: NAEE with one variant's cap and beam (what `reconstruction_decider` does)."""

    def __init__(self, ratio, routing, E, v: Variant):
        self.n_drop, self.E, self.v = drop_count(ratio, E, routing), E, v
        self.groups = routing.n_group if routing.group_limited else 1

    def __call__(self, model, adapter, layer, stats, io) -> list[int]:
        out = expert_outputs(model, adapter, layer, io.inputs, io.outputs, io.valid,
                             max_tokens=self.v.cap or None, max_bytes=ALL)
        r = _search(fast_evaluator(model, adapter, layer, out), self.E, self.n_drop, self.groups, self.v.beam, 5000)
        return list(r.dropped)


def perplexity_ratio(model, adapter, dropped: dict[int, list[int]], held, base) -> float:
    E = adapter.num_experts
    kept = {layer: [j for j in range(E) if j not in set(dropped.get(layer, []))] for layer in adapter.moe_layers()}
    pruned = copy.deepcopy(model)
    apply_plan(pruned, adapter, PrunePlan(kept, E, method="naee_reconstruction", model_type=adapter.model_type))
    return ratio_table(base, {"x": evaluate_sets(pruned, held)})["x"]["mean"]


class Enough(Exception):
    """Raised by the hook after `--max-layers` MoE layers."""


def checkpoint_case(args):
    from pathlib import Path

    from moeprune.calibration.data import CalibConfig, CalibSource
    from moeprune.io.load import load_model

    model = load_model(args.checkpoint).eval()
    cfg = CalibConfig((CalibSource.parse(args.calib),), samples=args.calib_samples, seq_len=args.seq_len,
                      held_out=0)
    return model, build_sets(cfg, load_tokenizer(Path(args.checkpoint), None))


def add_checkpoint_args(ap: argparse.ArgumentParser, max_layers: int) -> None:
    """The options of case "checkpoint" (`checkpoint_case`)."""
    ap.add_argument("--checkpoint", help="case checkpoint: model folder")
    ap.add_argument("--calib", help="case checkpoint: NAME=PATH calibration text")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-layers", type=int, default=max_layers, help="case checkpoint: MoE layers searched")


def run_case(case: str, args) -> list[str]:
    ratio = 0.5 if case == "testbed50" else 0.25
    if case == "random32":
        model, sets = random_case(argparse.Namespace(samples=2 * args.samples))  # 16·samples sequences
    elif case == "checkpoint":
        model, sets = checkpoint_case(args)
    else:
        model, sets = testbed_case(args)
    adapter = get_adapter(model.config, model=model)
    E, routing = adapter.num_experts, adapter.routing()
    variants = [Variant(cap, beam) for cap in args.caps for beam in args.beams]
    sweep = Sweep(ratio, routing, E, variants, args.ref_beam, 20000 if case.startswith("testbed") else 5000,
                  args.ref_cap if case == "checkpoint" else 0, args.max_layers if case == "checkpoint" else None)
    try:
        collect(model, adapter, sets, decide=sweep)
    except Enough:
        pass
    ref_kind = "exhaustive" if all(r["exhaustive"] for r in sweep.ref_rows) else f"beam {args.ref_beam}"
    tokens = sweep.ref_rows[0]["tokens"]
    lines = [f"| {case} | reference: {tokens} tokens, {ref_kind} | {len(sweep.ref_rows)} layers | 0 | "
             f"{sum(r['seconds'] for r in sweep.ref_rows) / len(sweep.ref_rows):.2f} | "
             f"{sum(r['evaluated'] for r in sweep.ref_rows) // len(sweep.ref_rows)} | "]
    ppl = {}
    if case.startswith("testbed"):
        tb = build_testbed(args.testbed)
        held = build_sets(EvalOptions(max_sequences=args.eval_sequences).for_model(tb.path).data_config(),
                          load_tokenizer(tb.path, None))
        base = evaluate_sets(model, held)
        ref_drop = {r["layer"]: list(r["dropped"]) for r in sweep.ref_rows}
        ppl["ref"] = perplexity_ratio(model, adapter, ref_drop, held, base)
        lines[0] += f"{ppl['ref']:.4f} |"
        for v in variants:
            dropped = collect(model, adapter, sets, decide=Capped(ratio, routing, E, v)).dropped
            ppl[v.name] = perplexity_ratio(model, adapter, dropped, held, base), dropped == ref_drop
    else:
        lines[0] += " — |"
    for v in variants:
        n = len(v.rows)
        same = sum(r["same"] for r in v.rows)
        worst = max(v.rows, key=lambda r: abs(r["excess"]))["excess"]
        mean = sum(r["excess"] for r in v.rows) / n
        p = ppl.get(v.name)
        lines.append(f"| {case} | {v.name} ({v.rows[0]['tokens']} kept) | {same}/{n} same | "
                     f"{mean:+.3f} / {worst:+.3f} | {sum(r['seconds'] for r in v.rows) / n:.2f} | "
                     f"{sum(r['evaluated'] for r in v.rows) // n} | "
                     + (f"{p[0]:.4f}{'' if p[1] else ' (other plan)'} |" if p else " — |"))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["testbed25", "testbed50", "random32"],
                    choices=["testbed25", "testbed50", "random32", "checkpoint"])
    ap.add_argument("--caps", type=int, nargs="+", default=[0, 2048, 1024, 512], help="0 = every token")
    ap.add_argument("--beams", type=int, nargs="+", default=[4])
    ap.add_argument("--ref-beam", type=int, default=16, help="reference beam where exhaustive is out of reach")
    ap.add_argument("--samples", type=int, default=8, help="windows per testbed domain (random32: 16x as many)")
    ap.add_argument("--eval-sequences", type=int, default=64, help="held-out windows per domain (testbed)")
    ap.add_argument("--testbed", help="testbed folder (default: the cached one, built when missing)")
    add_checkpoint_args(ap, max_layers=1)
    ap.add_argument("--ref-cap", type=int, default=0, help="case checkpoint: the reference's token cap (0: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("moeprune").setLevel(logging.ERROR)  # the capped precomputes warn about their subsets
    print("| case | variant | same set as reference (layers) | excess error on all tokens, mean / worst | s/layer "
          "| evaluations/layer | held-out perplexity ratio |")
    print("|---|---|---|---|---|---|---|")
    for case in args.cases:
        for line in run_case(case, args):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
