"""NAEE's beam search: every child scored whole (`FastEvaluator.many`, one router row per token and child) against
children scored from their parent on the tokens that selected the newly dropped expert (`naee_incremental`, one
router row per token and parent plus one per affected token), on the same precomputed outputs, in one run.

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src python naee_incremental.py \
        [--cases testbed50 random32 random128] [--beam 4] [--checkpoint DIR --calib NAME=PATH --max-layers 2]

Cases (one progressive calibration pass each, pruned along the incremental choice): the trained testbed at 50 %
(16 experts top-2, C(16, 8) = 12 870 > the exhaustive limit: beam); the random 32-expert top-4 Qwen3-MoE of
`naee_speed.py` at 25 %; a random 128-expert top-8 Qwen3-MoE (H = 256, expert width 64, 2 layers) at 25 % on 2 048
random tokens; a random DeepSeek-V3 of 128 experts in 8 groups (4 kept, top-8, `naee_reach`) at 25 %;
"checkpoint" (`--checkpoint`, e.g. the 128-expert checkpoint of `big_model.py`, its first `--max-layers` MoE
layers, in `--dtype`). Each layer keeps at most `DEFAULT_SEARCH_TOKENS` tokens, as `prune`
does. Per layer: the precompute with every expert and with each token's C candidates (`naee_candidates`, what
`prune` does: its first slots filled, the rest when a route reaches them, `naee_fill`; each search gets its own
copy, so each pays its own fills; expert rows per token after the precompute and after the incremental search),
seconds of each search, router rows, whether both
drop the same set, and the relative error difference of the two choices, scored whole and by the layer's own
block in float32 on every cached token (with bf16 logits, experts with tied scores swap places as masks change:
7 % of the tokens of the generated checkpoint have a tie at the k-th; the float32 block has none). torch runs on
one thread.
"""

from __future__ import annotations

import argparse
import time

import torch
from naee_speed import random_case, testbed_case  # same models and calibration (run from benchmarks/)
from naee_tokens import Enough, add_checkpoint_args, checkpoint_case

from moeprune.calibration.data import CalibSet
from moeprune.calibration.session import collect
from moeprune.models import get_adapter
from moeprune.select.naee_evaluator import fast_evaluator
from moeprune.select.naee_incremental import incremental_evaluator
from moeprune.select.naee_outputs import DEFAULT_SEARCH_TOKENS, expert_outputs
from moeprune.select.reconstruction import block_evaluator, search
from moeprune.select.uniform import drop_count
from moeprune.tiny import tiny_model


class Rows:
    """Counts the rows a router is called on."""

    def __init__(self, router):
        self.n = 0
        self.hook = router.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.n += args[0].reshape(-1, args[0].shape[-1]).shape[0]


class Compare:
    """A `decide` hook: per layer, the same search with both evaluators; returns the incremental choice."""

    def __init__(self, ratio, routing, E: int, beam: int, max_layers: int | None):
        self.n_drop, self.E, self.beam, self.max_layers = drop_count(ratio, E, routing), E, beam, max_layers
        self.groups = routing.n_group if routing.group_limited else 1
        self.rows: list[dict] = []

    def _search(self, evaluate, router) -> tuple:
        rows = Rows(router)
        t0 = time.perf_counter()
        try:
            r = search(evaluate, self.E, self.n_drop, groups=self.groups, beam=self.beam, max_exhaustive=5000)
        finally:
            rows.hook.remove()
        return r, time.perf_counter() - t0, rows.n

    def __call__(self, model, adapter, layer, stats, io) -> list[int]:
        if self.max_layers is not None and len(self.rows) >= self.max_layers:
            raise Enough
        t0 = time.perf_counter()
        every = expert_outputs(model, adapter, layer, io.inputs, io.outputs, io.valid, max_tokens=DEFAULT_SEARCH_TOKENS)
        t1 = time.perf_counter()
        out = self._candidates(model, adapter, layer, io)  # each token's candidates only, as the NAEE decider does
        pre_all, pre = t1 - t0, time.perf_counter() - t1
        initial = out.rows_computed
        del every
        router = adapter.router(adapter.block(model, layer))
        whole = fast_evaluator(model, adapter, layer, out)
        old, old_s, old_rows = self._search(whole, router)
        out = self._candidates(model, adapter, layer, io)  # its slots unfilled again: each search pays its fills
        inc = incremental_evaluator(model, adapter, layer, out)
        new, new_s, new_rows = self._search(inc, router)
        e_old, e_new = whole.many([old.dropped, new.dropped])  # both choices scored the same way
        f_old, f_new = _float32_errors(model, adapter, layer, io, [old.dropped, new.dropped])
        self.rows.append(dict(layer=layer, tokens=out.tokens, evaluated=new.evaluated, exhaustive=new.exhaustive,
                              pre=pre, pre_all=pre_all, slots=out.gram[0].shape[1], old_s=old_s, new_s=new_s,
                              filled=(initial / out.tokens, out.rows_computed / out.tokens),
                              old_rows=old_rows, new_rows=new_rows,
                              same=old.dropped == new.dropped, diff=e_new / e_old - 1, local=inc.local,
                              diff32=f_new / f_old - 1))
        return list(new.dropped)

    def _candidates(self, model, adapter, layer, io):
        return expert_outputs(model, adapter, layer, io.inputs, io.outputs, io.valid, max_tokens=DEFAULT_SEARCH_TOKENS,
                              max_dropped=self.n_drop)


def _float32_errors(model, adapter, layer, io, drops) -> list[float]:
    """err(D) on every cached token by the layer's own block in float32 (`block_evaluator`), so that no bf16 tie
    among router logits decides which expert a token keeps (the block is converted back afterwards: bf16 -> float32
    -> bf16 is exact)."""
    block = adapter.block(model, layer)
    dtype = next(block.parameters()).dtype
    block.float()
    try:
        ev = block_evaluator(model, adapter, layer, [x.float() for x in io.inputs], [z.float() for z in io.outputs],
                             io.valid)
        return [ev(D) for D in drops]
    finally:
        block.to(dtype)


def random128_case(args):
    """Random Qwen3-MoE, 128 experts top-8, H = 256, expert width 64, 2 layers; 32 random sequences of 64 tokens."""
    model = tiny_model("qwen3_moe", seed=0, num_experts=128, num_experts_per_tok=8, hidden_size=256,
                       moe_intermediate_size=64, num_attention_heads=4, head_dim=64, num_hidden_layers=2)
    ids = torch.randint(3, model.config.vocab_size, (32, 64), generator=torch.Generator().manual_seed(0))  # [N, L]
    mask = torch.ones_like(ids)
    return model, [CalibSet("random", ids, mask, "", "random tokens", 32, int(mask.sum()))]


def grouped128_case(args):
    """Random DeepSeek-V3, 128 experts in 8 groups, 4 kept, top-8, H = 256, expert width 64, 2 MoE layers; 32 random
    sequences of 64 tokens."""
    model = tiny_model("deepseek_v3", seed=0, n_routed_experts=128, num_experts_per_tok=8, n_group=8, topk_group=4,
                       hidden_size=256, moe_intermediate_size=64, first_k_dense_replace=0, num_hidden_layers=2)
    ids = torch.randint(3, model.config.vocab_size, (32, 64), generator=torch.Generator().manual_seed(0))  # [N, L]
    mask = torch.ones_like(ids)
    return model, [CalibSet("random", ids, mask, "", "random tokens", 32, int(mask.sum()))]


def run_case(case: str, args) -> list[str]:
    if case == "checkpoint":
        model, sets = checkpoint_case(args)
        model = model.to(getattr(torch, args.dtype)) if args.dtype != "own" else model
    else:
        make = {"testbed50": testbed_case, "random32": random_case, "random128": random128_case,
                "grouped128": grouped128_case}[case]
        model, sets = make(argparse.Namespace(samples=args.samples, testbed=args.testbed))
    adapter = get_adapter(model.config, model=model)
    ratio = 0.5 if case == "testbed50" else 0.25
    cmp = Compare(ratio, adapter.routing(), adapter.num_experts, args.beam,
                  args.max_layers if case == "checkpoint" else None)
    try:
        collect(model, adapter, sets, decide=cmp)
    except Enough:
        pass
    lines = []
    for r in cmp.rows:
        kind = "exhaustive" if r["exhaustive"] else f"beam {args.beam}"
        lines.append(f"| {case} | {r['layer']} | {r['tokens']} | {kind}, {r['evaluated']} | {r['pre_all']:.2f} | "
                     f"{r['pre']:.2f} ({r['slots']}: {r['filled'][0]:.1f} → {r['filled'][1]:.1f}) | "
                     f"{r['old_s']:.2f} | {r['new_s']:.2f} | ×{r['old_s'] / r['new_s']:.1f} | "
                     f"{r['old_rows'] / max(r['new_rows'], 1):.1f} | {'yes' if r['same'] else 'no'} | "
                     f"{r['diff']:+.1e} | {r['diff32']:+.1e} |" + ("" if r["local"] else " (not local: scored whole)"))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["testbed50", "random32", "random128"],
                    choices=["testbed50", "random32", "random128", "grouped128", "checkpoint"])
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8, help="windows per testbed domain (random32: 8x as many)")
    ap.add_argument("--testbed", help="testbed folder (default: the cached one, built when missing)")
    add_checkpoint_args(ap, max_layers=2)
    ap.add_argument("--dtype", default="own", choices=["own", "float32", "bfloat16"],
                    help="case checkpoint: compute dtype (own: as stored; `prune --dtype auto` is float32 on CPUs "
                         "without native bf16)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| case | layer | tokens | search, evaluations | precompute s, every expert | precompute s, candidates "
          "(C: expert rows per token, precompute → after the incremental search) | whole s "
          "| incremental s (both with their fills) | speed-up | "
          "router rows whole / incremental | same set | error, incremental choice vs whole | same, by the float32 "
          "block on every token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        for line in run_case(case, args):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
