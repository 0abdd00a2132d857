"""NAEE search speed: the block-forward evaluator (`reconstruction.block_evaluator`, one MoE-block forward over the
cache per evaluated subset) against the precomputed-outputs evaluator (`naee_evaluator.fast_evaluator`, every expert's
output once per layer, then a router forward + gather per subset), inside one prune-as-you-go calibration pass.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/naee_speed.py [--samples 2] [--ratio 0.25] [--beam 4]

Cases: (a) the trained testbed (16 experts, top-2; 25 %: C(16, 4) = 1820 subsets per layer, exhaustive), calibrated
on `--samples` windows per domain; (b) a random Qwen3-MoE from `moeprune.tiny` with 32 experts, top-4, H = 128
(25 %: 8 of 32, beyond the exhaustive limit: beam search of width `--beam`, the same search for both evaluators),
on random tokens with some padding. Per MoE layer both evaluators search the same cached X / Z / real-token mask
(the same error: padding excluded); the layer is then pruned with the fast choice. Prints seconds per layer for
each (new = precompute + search; the precompute alone in brackets), the speed-up measured in this run, and whether
the chosen subsets are identical. torch runs on one thread.
"""

from __future__ import annotations

import argparse
import time

import torch

from moeprune.calibration.data import CalibConfig, CalibSet, CalibSource, build_sets
from moeprune.calibration.run import load_tokenizer
from moeprune.calibration.session import collect
from moeprune.models import get_adapter
from moeprune.select.naee_evaluator import fast_evaluator
from moeprune.select.naee_outputs import expert_outputs
from moeprune.select.reconstruction import block_evaluator, search
from moeprune.select.uniform import drop_count
from moeprune.testbed import build_testbed
from moeprune.tiny import tiny_model


class Compare:
    """A `decide` hook: per layer, both evaluators under the same search; returns the fast choice."""

    def __init__(self, ratio: float, routing, num_experts: int, beam: int, max_exhaustive: int):
        self.n_drop = drop_count(ratio, num_experts, routing)
        self.groups = routing.n_group if routing.group_limited else 1
        self.E, self.beam, self.max_exhaustive = num_experts, beam, max_exhaustive
        self.rows: list[dict] = []

    def _search(self, evaluate):
        return search(evaluate, self.E, self.n_drop, groups=self.groups, beam=self.beam,
                      max_exhaustive=self.max_exhaustive)

    def __call__(self, model, adapter, layer, stats, io) -> list[int]:
        t0 = time.perf_counter()
        old = self._search(block_evaluator(model, adapter, layer, io.inputs, io.outputs, io.valid))
        t1 = time.perf_counter()
        outputs = expert_outputs(model, adapter, layer, io.inputs, io.outputs, io.valid)
        t2 = time.perf_counter()
        new = self._search(fast_evaluator(model, adapter, layer, outputs))
        t3 = time.perf_counter()
        self.rows.append(dict(layer=layer, tokens=outputs.tokens, evaluated=new.evaluated, exhaustive=new.exhaustive,
                              old_s=t1 - t0, pre_s=t2 - t1, new_s=t3 - t1, same=old.dropped == new.dropped,
                              old=old.dropped, new=new.dropped, old_err=old.error, new_err=new.error))
        return list(new.dropped)


def run_case(name: str, model, sets: list[CalibSet], args) -> list[str]:
    adapter = get_adapter(model.config)
    cmp = Compare(args.ratio, adapter.routing(), adapter.num_experts, args.beam, args.max_exhaustive)
    collect(model, adapter, sets, decide=cmp)
    lines = []
    for r in cmp.rows:
        search_kind = "exhaustive" if r["exhaustive"] else f"beam {args.beam}"
        lines.append(f"| {name} | {r['layer']} | {r['tokens']} | {search_kind}, {r['evaluated']} | {r['old_s']:.2f} | "
                     f"{r['new_s']:.2f} ({r['pre_s']:.2f}) | ×{r['old_s'] / r['new_s']:.1f} | "
                     f"{'yes' if r['same'] else 'NO'} {list(r['new'])}"
                     + ("" if r["same"] else f" vs {list(r['old'])} (err {r['new_err']:.6g} vs {r['old_err']:.6g})")
                     + " |")
    old, new = sum(r["old_s"] for r in cmp.rows), sum(r["new_s"] for r in cmp.rows)
    lines.append(f"| {name} | all | | | {old / len(cmp.rows):.2f}/layer | {new / len(cmp.rows):.2f}/layer | "
                 f"×{old / new:.1f} | {sum(r['same'] for r in cmp.rows)}/{len(cmp.rows)} identical |")
    return lines


def testbed_case(args):
    from transformers import AutoModelForCausalLM

    tb = build_testbed(args.testbed)
    model = AutoModelForCausalLM.from_pretrained(str(tb.path), dtype=torch.float32).eval()
    sources = tuple(CalibSource.parse(s) for s in tb.specs("calib"))
    cfg = CalibConfig(sources, samples=args.samples, seq_len=tb.seq_len, warn_short=False)
    return model, build_sets(cfg, load_tokenizer(tb.path, None))


def random_case(args):
    """Random Qwen3-MoE, 32 experts top-4, at the testbed's width (H = 128) with expert width 64."""
    model = tiny_model("qwen3_moe", seed=0, num_experts=32, num_experts_per_tok=4, hidden_size=128,
                       moe_intermediate_size=64, num_attention_heads=4, head_dim=32)
    g = torch.Generator().manual_seed(0)
    n, L = 8 * args.samples, 64
    ids = torch.randint(3, model.config.vocab_size, (n, L), generator=g)  # [N, L]
    mask = torch.ones(n, L, dtype=torch.long)
    mask[::3, L - 16:] = 0  # some right padding, excluded from the error
    return model, [CalibSet("random", ids, mask, "", "random tokens", n, int(mask.sum()))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", help="testbed folder (default: the cached one, built when missing)")
    ap.add_argument("--samples", type=int, default=2, help="windows per testbed domain (random: 8× as many)")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--beam", type=int, default=4, help="beam width beyond the exhaustive limit")
    ap.add_argument("--max-exhaustive", type=int, default=5000)
    ap.add_argument("--cases", nargs="+", default=["testbed", "random32"], choices=["testbed", "random32"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| case | layer | tokens | search, evaluations | old s | new s (precompute) | speed-up | same subset |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        model, sets = (testbed_case if case == "testbed" else random_case)(args)
        for line in run_case(case, model, sets, args):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
