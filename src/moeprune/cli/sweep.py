"""`moeprune sweep`: UNCURL's per-task reduction sweep — block error and held-out perplexity per task and ratio,
the knee per task, and the ratios to build a task pack with."""

from __future__ import annotations

from moeprune.cli.common import add_calib_run_flags, add_verb, calib_options


def run(args) -> int:
    from moeprune.analysis.probe import PROBE_TOKENS
    from moeprune.errors import MoePruneError
    from moeprune.sweep.knee import parse_ratios
    from moeprune.sweep.options import SweepOptions
    from moeprune.sweep.report import tables
    from moeprune.sweep.run import sweep

    if not args.calib:
        raise MoePruneError("no tasks: pass at least one --calib NAME=PATH (one per task).")
    opts = SweepOptions(tuple(parse_ratios(args.ratios, args.step)), criterion=args.criterion,
                        heldout=tuple(args.heldout), heldout_sequences=args.heldout_sequences,
                        tolerance=args.tolerance, cliff=args.cliff,
                        probe_tokens=PROBE_TOKENS if args.probe_tokens is None else args.probe_tokens)
    named = {spec.partition("=")[0].strip() for spec in args.heldout}
    every = all(spec.partition("=")[0].strip() in named for spec in args.calib)
    if args.held_out is None:
        args.held_out = 0 if every else 8
    calib = calib_options(args)  # the model is loaded whole (lazy=False) with the default probe stride
    data = sweep(args.model, calib, opts, args.out, overwrite=args.overwrite)
    print(tables(data))
    print(f"written to {args.out} (sweep.json, sweep.md, sweep.png; ratios.json for `moeprune taskpack build`)")
    return 0


def add_parser(sub) -> None:
    p = add_verb(sub, "sweep", "UNCURL sweep: per task, block reconstruction error per layer and held-out perplexity "
                               "at each ratio, the knee, and recommended ratios for a task pack",
                 "moeprune sweep ./model --calib code=code.txt --calib chat=chat.jsonl --ratios 0.1..0.9 --step 0.1 "
                 "--out ./sweep")
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (written atomically; never inside the model)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--ratios", default="0.1..0.9", help="fractions of experts dropped per layer: a range LOW..HIGH "
                                                        "(with --step) or a comma-separated list")
    p.add_argument("--step", type=float, default=None, help="step of a --ratios range (default 0.1)")
    p.add_argument("--criterion", default="tcess", help="calibrated criterion that plans each task from its own "
                                                        "statistics")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="the knee: first ratio where held-out perplexity exceeds (1 + tolerance) x the original's")
    p.add_argument("--cliff", type=float, default=0.1,
                   help="block reconstruction error that marks a layer's cliff")
    p.add_argument("--probe-tokens", type=int, metavar="N",
                   help="real tokens per task and layer for the block error (evenly strided; default 1024, 0 = all)")
    g = p.add_argument_group("tasks and their held-out text")
    g.add_argument("--calib", action="append", default=[], metavar="NAME=PATH",
                   help="calibration text of one task, repeatable: .txt, a folder of .txt, or .jsonl")
    g.add_argument("--heldout", action="append", default=[], metavar="NAME=PATH",
                   help="held-out text of task NAME (disjoint from its --calib text), repeatable")
    g.add_argument("--heldout-sequences", type=int, default=64, help="windows per --heldout file (in order)")
    g.add_argument("--held-out", type=int, default=None, metavar="N",
                   help="for tasks without --heldout: calibration windows kept apart as held-out text (default 8)")
    add_calib_run_flags(g)
    p.set_defaults(func=run, lazy=False, probe_stride=None)
