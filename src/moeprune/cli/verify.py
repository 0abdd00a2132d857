"""`moeprune verify ORIGINAL EXPORT`: the stock reload of EXPORT == ORIGINAL with every stage's reference."""

from __future__ import annotations

import argparse

from moeprune.cli.common import add_verb, verify_exit
from moeprune.errors import MoePruneError

# flags that shape the real-text inputs: each needs --calib (default values apply then)
TEXT_FLAGS = {"samples": ("--samples", 8), "seq_len": ("--seq-len", 256), "calib_seed": ("--calib-seed", 0),
              "text_field": ("--text-field", "text"), "tokenizer": ("--tokenizer", None),
              "batch_size": ("--batch-size", 8)}


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
    p.add_argument("--seed", type=int, default=None, help="seed of the random input tokens (default 0; not with "
                                                           "--calib)")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=None,
                   help="layer by layer, one decoder layer in memory; names the layers that differ (default: when "
                        "the original does not fit in available memory)")
    p.add_argument("--device", default="cpu", help="where the models (or each decoder layer) run: cpu, cuda, cuda:1")
    g = p.add_argument_group("real text instead of random tokens (routing as in use: a changed expert that random "
                             "tokens rarely reach is still exercised)")
    g.add_argument("--calib", action="append", default=[], metavar="NAME=PATH",
                   help="text to verify on, repeatable: .txt, a folder of .txt, or .jsonl; windows are drawn as "
                        "`calibrate` draws them")
    g.add_argument("--samples", type=int, default=None, help="windows per --calib set (default 8)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 256)")
    g.add_argument("--calib-seed", type=int, default=None, help="seed of the window sampling (default 0)")
    g.add_argument("--text-field", default=None, help="field of .jsonl records that holds the text (default text)")
    g.add_argument("--tokenizer", help="tokenizer folder (default: ORIGINAL's folder)")
    g.add_argument("--batch-size", type=int, default=None, help="windows per forward (default 8)")
    p.set_defaults(func=run)


def text_sets(args):
    """--calib and its window flags -> (calibration sets of ORIGINAL's tokenizer, windows per forward); (None, 8)
    without --calib, where the window flags alone are refused, as is --seed with --calib."""
    given = [flag for key, (flag, _) in TEXT_FLAGS.items() if getattr(args, key) is not None]
    if not args.calib:
        if given:
            raise MoePruneError(f"{', '.join(given)} shape{'s' * (len(given) == 1)} the real-text inputs; add --calib "
                                "NAME=PATH (or drop them).")
        return None, 8
    if args.seed is not None:
        raise MoePruneError("--seed seeds the random input tokens, which --calib replaces; use --calib-seed to draw "
                            "other windows.")
    from moeprune.calibration.data import CalibConfig, CalibSource, build_sets
    from moeprune.calibration.run import load_tokenizer
    from moeprune.io.checkpoint import Checkpoint

    v = {key: default if getattr(args, key) is None else getattr(args, key) for key, (_, default) in TEXT_FLAGS.items()}
    cfg = CalibConfig(tuple(CalibSource.parse(c) for c in args.calib), samples=v["samples"], seq_len=v["seq_len"],
                      seed=v["calib_seed"], text_field=v["text_field"])
    return build_sets(cfg, load_tokenizer(Checkpoint.open(args.original).path, v["tokenizer"])), v["batch_size"]


def run(args) -> int:
    from moeprune.pipeline.recipe import read_chain
    from moeprune.pipeline.verify import verify

    sets, chunk = text_sets(args)
    plans = read_chain(args.plan) if args.plan else None
    return verify_exit(verify(args.original, args.pruned, plans, dtype=args.dtype, tol=args.tol,
                              seed=0 if args.seed is None else args.seed, lazy=args.lazy, device=args.device,
                              sets=sets, chunk=chunk))
