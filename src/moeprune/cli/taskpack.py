"""`moeprune taskpack build|export`: per-task expert patterns of one checkpoint (PreMoe TAER), and a task's export.

A pack is used by `moeprune.load_for_task(PACK, prompt=..., ratio=...)` and by `moeprune eval|compare ...
--pack PACK --task auto|NAME --task-ratio R`.
"""

from __future__ import annotations

from moeprune.cli.common import add_calib_run_flags, add_lazy_flag, add_verb, verify_exit


def add_parser(sub) -> None:
    p = add_verb(sub, "taskpack", "task packs: per-task kept experts and retrieval keys of one checkpoint (PreMoe "
                                  "TAER); load only a task's experts with load_for_task or --pack/--task",
                 "moeprune taskpack build ./model --calib code=code.txt --calib chat=chat.jsonl --ratios 0.5,0.75 "
                 "--out pack")
    actions = p.add_subparsers(dest="taskpack_command", required=True, metavar="ACTION",
                               help="what to do (`moeprune taskpack ACTION -h` for its flags)")
    b = add_verb(actions, "build", "one calibration run over every task, then one plan per task and ratio and one "
                                   "retrieval key per task; the pack references the checkpoint (no weights copied)",
                 "moeprune taskpack build ./model --calib code=code.txt --calib chat=chat.jsonl --ratios 0.5,0.75 "
                 "--out pack")
    b.add_argument("model", help="checkpoint folder (unquantized safetensors)")
    b.add_argument("--calib", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="one task's calibration text, repeatable (at least two): .txt, a folder of .txt, or .jsonl")
    b.add_argument("--ratios", required=True,
                   help="shares of routed experts REMOVED per MoE layer: 0.5,0.75, a range 0.25..0.75 (step 0.1), "
                        "or the ratios.json of `moeprune sweep` (each task also records its recommended ratio)")
    b.add_argument("--criterion", default="tcess", help="calibrated expert criterion of the plans (`moeprune "
                                                         "criteria` lists them)")
    b.add_argument("--key-layers", type=int, default=2,
                   help="the first N MoE layers' mean router distributions make a task's retrieval key")
    b.add_argument("--margin", type=float, default=None,
                   help="default retrieval margin threshold stored in the pack (cosine difference; below it "
                        "load_for_task loads the full model); default 0.01")
    b.add_argument("--out", required=True, help="pack folder to write (atomically)")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it is an earlier pack")
    g = b.add_argument_group("calibration (one run for all tasks)")
    add_calib_run_flags(g)
    add_lazy_flag(g)
    b.set_defaults(func=run_build)
    e = add_verb(actions, "export", "export one task's pruned checkpoint as a stock folder (the apply/export "
                                    "pipeline, verified like any prune)",
                 "moeprune taskpack export pack --task code --ratio 0.5 --out code-50")
    e.add_argument("pack", help="task pack folder")
    e.add_argument("--task", required=True, help="task name in the pack")
    e.add_argument("--ratio", type=float, help="one of the pack's ratios (default: the task's recommended one, "
                                                "else the pack's first)")
    e.add_argument("--out", required=True, help="output folder (written atomically; never the input)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it is an earlier moeprune output")
    e.add_argument("--no-verify", action="store_true", help="skip the stock-reload check")
    e.set_defaults(func=run_export)


def run_build(args) -> int:
    from moeprune.calibration.run import CalibrateOptions
    from moeprune.taskpack.build import DEFAULT_MARGIN, BuildOptions, build_pack, parse_ratios

    ratios, recommended = parse_ratios(args.ratios)
    opts = BuildOptions(ratios, criterion=args.criterion, key_layers=args.key_layers, recommended=recommended,
                        margin=DEFAULT_MARGIN if args.margin is None else args.margin)
    calib = CalibrateOptions(tuple(args.calib), samples=args.samples, seq_len=args.seq_len, seed=args.calib_seed,
                             text_field=args.text_field, chat_template=args.chat_template, tokenizer=args.tokenizer,
                             batch_size=args.batch_size, device=args.device, dtype=args.dtype, lazy=args.lazy,
                             held_out=0)
    pack = build_pack(args.model, calib, opts, args.out, overwrite=args.overwrite)
    for name, t in pack.tasks.items():
        s = t.spread
        print(f"{name:<16} tokens {t.tokens:>8}  own-key cosine {s['self_cos_mean']:.3f} (min {s['self_cos_min']:.3f})"
              f"  window margin min {s['margin_min']:+.3f} p05 {s['margin_p05']:+.3f}")
    return 0


def run_export(args) -> int:
    from moeprune.taskpack.export import export_task

    _, result = export_task(args.pack, args.task, args.ratio, args.out, overwrite=args.overwrite,
                            run_verify=not args.no_verify)
    return verify_exit(result)
