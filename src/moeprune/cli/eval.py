"""`moeprune eval MODEL --data NAME=PATH`: per-domain perplexity and next-token accuracy on held-out text."""

from __future__ import annotations

from moeprune.cli.common import add_eval_flags, add_verb, eval_options


def add_parser(sub) -> None:
    p = add_verb(sub, "eval", "per-domain perplexity and next-token accuracy on held-out text",
                 "moeprune eval ./pruned --data web=heldout.txt --data code=code_test/ --json eval.json")
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--json", help="write {domain: {perplexity, accuracy, tokens}} here")
    add_eval_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from moeprune.eval.run import evaluate

    print(evaluate(args.model, eval_options(args), args.json).format())
    return 0
