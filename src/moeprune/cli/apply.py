"""`moeprune apply MODEL --plan PLAN --out DIR` or `--recipe EXPORT`: replay plans onto a checkpoint."""

from __future__ import annotations

from moeprune.cli.common import add_apply_flags, add_lazy_flag, add_verb
from moeprune.errors import MoePruneError


def add_parser(sub) -> None:
    p = add_verb(sub, "apply", "apply a plan, or every plan of an export's recipe, and save the smaller checkpoint",
                 "moeprune apply ./model --recipe ./pruned --out ./pruned-again")
    p.add_argument("model", help="checkpoint folder the plans were made for (the original)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--plan", help="one plan file from `moeprune plan` (experts, merge or neurons)")
    g.add_argument("--recipe", help="an export folder (its moeprune_recipe.json and moeprune_plans/) or that "
                                    "recipe file: every stage's plan is applied in order")
    add_apply_flags(p)
    add_lazy_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from moeprune import api

    source = args.plan or args.recipe
    if args.plan and not str(args.plan).endswith(".json"):
        raise MoePruneError(f"--plan {args.plan}: give a plan .json file; for an export folder use --recipe.")
    api.apply_plan(args.model, source, args.out, streaming=args.streaming, lazy=args.lazy,
                   max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    return 0
