"""`moeprune steer MODEL --with NAME=PATH --without NAME=PATH --out plan.json`: a behaviour's experts (MoTE)."""

from __future__ import annotations

from moeprune.cli.common import add_calib_run_flags, add_verb


def add_parser(sub) -> None:
    p = add_verb(sub, "steer", "find the experts a behaviour's text routes to more than matched text without it "
                               "(MoTE fTRI contrast); write a steering plan for --steer (docs/steering.md)",
                 "moeprune steer ./model --with refusal=refusals.txt --without normal=answers.txt --top 10 "
                 "--out steer.json")
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--with", dest="with_", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="text showing the behaviour, repeatable: .txt, a folder of .txt, or .jsonl")
    p.add_argument("--without", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="matched text without it, repeatable")
    p.add_argument("--out", required=True, help="steering plan to write (*.json)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--top", type=int, default=10, help="experts in the plan (across all layers, largest Δf first)")
    p.add_argument("--action", choices=["off", "on"], default="off",
                   help="off: the experts are never routed (less of the behaviour); on: their router score is "
                        "raised by --strength (more of it)")
    p.add_argument("--strength", type=float, help="with --action on: added to the router logits (sigmoid scores "
                                                  "for sigmoid_grouped routers); default 10")
    p.add_argument("--min-z", type=float, default=3.0,
                   help="least two-proportion z-score of the frequency difference for an expert to qualify")
    p.add_argument("--no-effect", action="store_true",
                   help="skip measuring the plan's perplexity effect on the held-apart calibration windows")
    g = p.add_argument_group("calibration (applies to every --with / --without set)")
    add_calib_run_flags(g)
    g.add_argument("--held-out", type=int, default=8, metavar="N",
                   help="windows per set kept apart from the contrast; the plan's effect is measured on them")
    p.set_defaults(func=run)


def run(args) -> int:
    from moeprune.calibration.run import CalibrateOptions
    from moeprune.steer.run import SteerOptions, format_plan, steer

    calib = CalibrateOptions((), samples=args.samples, seq_len=args.seq_len, seed=args.calib_seed,
                             text_field=args.text_field, chat_template=args.chat_template, tokenizer=args.tokenizer,
                             batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                             held_out=args.held_out)
    opts = SteerOptions(tuple(args.with_), tuple(args.without), top=args.top, action=args.action,
                        strength=args.strength, min_z=args.min_z, calib=calib, measure=not args.no_effect)
    print(format_plan(steer(args.model, opts, args.out, overwrite=args.overwrite)))
    return 0
