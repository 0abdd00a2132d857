"""`moeprune verify ORIGINAL EXPORT`: the stock reload of EXPORT == ORIGINAL with every stage's reference."""

from __future__ import annotations

import argparse

from moeprune.cli.common import add_verb, verify_exit


def add_parser(sub) -> None:
    p = add_verb(sub, "verify", "check an export against its original (exit 1 beyond tolerance)",
                 "moeprune verify ./model ./pruned",
                 description="Reload EXPORT with stock from_pretrained and compare its logits with ORIGINAL under "
                             "the references of every stage it went through (removed experts masked in the "
                             "router, removed neurons zeroed, merged experts written into their dominant's slot).")
    p.add_argument("original", help="the checkpoint the export was made from")
    p.add_argument("pruned", metavar="export", help="the folder written by `moeprune prune` or `moeprune apply`")
    p.add_argument("--plan", help="plan or recipe file (default: EXPORT's moeprune_recipe.json, or its one plan)")
    p.add_argument("--dtype", default="float32", help="dtype both models run in")
    p.add_argument("--tol", type=float, default=None,
                   help="relative tolerance (default by dtype: 1e-4 float32, 1e-2 float16, 3e-2 bfloat16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input tokens")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=None,
                   help="layer by layer, one decoder layer in memory; names the layers that differ (default: when "
                        "the original does not fit in available memory)")
    p.add_argument("--device", default="cpu", help="where the models (or each decoder layer) run: cpu, cuda, cuda:1")
    p.set_defaults(func=run)


def run(args) -> int:
    from moeprune.pipeline.recipe import read_chain
    from moeprune.pipeline.verify import verify

    plans = read_chain(args.plan) if args.plan else None
    return verify_exit(verify(args.original, args.pruned, plans, dtype=args.dtype, tol=args.tol, seed=args.seed,
                              lazy=args.lazy, device=args.device))
