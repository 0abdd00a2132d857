"""`moeprune gen-tasks MODEL --out DIR`: the generative task items of a model's evaluation data, as a folder that
serves both paths: `moeprune eval --generate --generate-tasks DIR/tasks.jsonl` and `moeprune lm-eval MODEL --tasks
moeprune_arithmetic,... --include-path DIR --no-builtin-tasks` (docs/generation.md)."""

from __future__ import annotations

from moeprune.cli.common import add_verb


def add_parser(sub) -> None:
    p = add_verb(sub, "gen-tasks", "write the generative tasks (items, lm-eval YAMLs) of a model's evaluation data",
                 "moeprune gen-tasks ./pruned --out ./gen-tasks && moeprune lm-eval ./pruned --tasks "
                 "moeprune_arithmetic,moeprune_records,moeprune_python --include-path ./gen-tasks --no-builtin-tasks")
    p.add_argument("model", help="checkpoint folder (the testbed or an export of it supplies the data by default)")
    p.add_argument("--out", required=True, help="folder for <task>.jsonl, moeprune_<task>.yaml, utils.py, tasks.jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is an earlier moeprune output")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="text to build items from, named after its task (arithmetic, records, python); default: "
                        "the testbed's held-out files")
    p.add_argument("--gen-items", type=int, default=None, help="items per task (default 64)")
    p.add_argument("--gen-seed", type=int, default=0, help="seed of the item draw")
    p.set_defaults(func=run)


def run(args) -> int:
    from moeprune.eval.lm_eval_tasks import write_task_folder
    from moeprune.eval.run import EvalOptions
    from moeprune.io.checkpoint import Checkpoint

    opts = EvalOptions(tuple(args.data), generate=True, gen_items=args.gen_items, gen_seed=args.gen_seed)
    items = opts.for_model(Checkpoint.open(args.model).path).gen_items_list()
    out, names = write_task_folder(args.out, items, args.overwrite)
    print(f"{len(items)} items of {len(names)} tasks written to {out}\n"
          f"  moeprune eval {args.model} --generate --generate-tasks {out / 'tasks.jsonl'}\n"
          f"  moeprune lm-eval {args.model} --tasks {','.join(names)} --include-path {out} --no-builtin-tasks")
    return 0
