"""`moeprune compare ORIGINAL EXPORT --data ... --out DIR`: before/after table, markdown report and plot."""

from __future__ import annotations

from moeprune.cli.common import add_eval_flags, add_verb, eval_options


def add_parser(sub) -> None:
    p = add_verb(sub, "compare", "before/after evaluation table, markdown report and plot",
                 "moeprune compare ./model ./pruned --data web=heldout.txt --out ./cmp")
    p.add_argument("original", help="the checkpoint before compression")
    p.add_argument("pruned", metavar="export", help="the compressed checkpoint")
    p.add_argument("--out", required=True, help="folder for compare.md, compare.json, compare.png")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is an earlier compare output")
    add_eval_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from moeprune.eval.compare import compare

    print(compare(args.original, args.pruned, eval_options(args), args.out, args.overwrite).markdown())
    return 0
