"""Command line: `moeprune {info,plan,apply,prune,verify,demo}`. Thin: every flag maps onto an `api` argument."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from moeprune import __version__
from moeprune.errors import MoePruneError
from moeprune.log import configure, logger


def _methods() -> list[str]:
    from moeprune.criteria import CRITERIA

    return list(CRITERIA)


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratio must be a number like 0.25, got {text!r}") from None


def cmd_info(args) -> int:
    from moeprune import api
    from moeprune.models.summary import format_summary

    summary = api.info(args.model)
    print(json.dumps(summary.to_dict(), indent=1) if args.json else format_summary(summary))
    return 0


def cmd_plan(args) -> int:
    from moeprune import api
    from moeprune.select.plan import check_plan_path

    if args.out:
        check_plan_path(args.out)
    plan = api.make_plan(args.model, args.method, args.ratio, seed=args.seed)
    if args.out:
        plan.save(args.out)
        logger.info("plan written to %s (keeps %d of %d experts per layer)", args.out, plan.kept_count,
                    plan.num_experts)
    else:
        print(json.dumps({k: v for k, v in plan.to_dict().items() if k != "scores"}, indent=1))
    return 0


def cmd_apply(args) -> int:
    from moeprune import api
    from moeprune.select.plan import PrunePlan

    plan = PrunePlan.load(args.plan)
    api.apply_plan(args.model, plan, args.out, streaming=args.streaming, max_shard_size=args.max_shard_size,
                   overwrite=args.overwrite)
    return 0


def cmd_prune(args) -> int:
    from moeprune import api

    _, result = api.prune(args.model, args.out, method=args.method, ratio=args.ratio, seed=args.seed,
                          streaming=args.streaming, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                          run_verify=not args.no_verify, verify_dtype=args.verify_dtype)
    return _verify_exit(result)


def cmd_verify(args) -> int:
    from moeprune import api
    from moeprune.select.plan import PrunePlan

    plan = PrunePlan.load(args.plan) if args.plan else None
    result = api.verify(args.original, args.pruned, plan, dtype=args.dtype, tol=args.tol, seed=args.seed)
    return _verify_exit(result)


def _verify_exit(result) -> int:
    if result is None:
        return 0
    print(f"max abs logit difference: {result.max_abs_diff:.3e} (relative {result.relative:.3e}, "
          f"tolerance {result.tolerance:.1e} x max |logit| {result.max_abs_logit:.3g}) -> "
          f"{'PASS' if result.passed else 'FAIL'}")
    return 0 if result.passed else 1


def cmd_demo(args) -> int:
    from moeprune.demo import run_demo

    return run_demo(args.workdir, method=args.method)


def _add_apply_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (written atomically; never the input)")
    p.add_argument("--streaming", action="store_true",
                   help="edit the safetensors shards directly, without loading the model (for models > RAM)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeprune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"moeprune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    methods = ", ".join(_methods())

    p = sub.add_parser("info", help="MoE structure of a checkpoint and what pruning would save")
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plan", help="score experts and write a plan (JSON)")
    p.add_argument("model")
    p.add_argument("--method", required=True, help=f"criterion: {methods}")
    p.add_argument("--ratio", type=_ratio, required=True, help="fraction of routed experts to drop per layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="plan file to write (printed when omitted)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="apply a plan to a checkpoint and save the smaller one")
    p.add_argument("model")
    p.add_argument("--plan", required=True)
    _add_apply_flags(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("prune", help="plan + apply + save + verify")
    p.add_argument("model")
    p.add_argument("--method", required=True, help=f"criterion: {methods}")
    p.add_argument("--ratio", type=_ratio, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-verify", action="store_true", help="skip the final verification")
    p.add_argument("--verify-dtype", default="float32", help="dtype for verification (float32, bfloat16, ...)")
    _add_apply_flags(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("verify", help="stock reload of PRUNED == ORIGINAL with the removed experts masked")
    p.add_argument("original")
    p.add_argument("pruned")
    p.add_argument("--plan", help="plan file (default: PRUNED/moeprune_report.json)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tol", type=float, default=None, help="relative tolerance (default 1e-4 in float32)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="build a tiny MoE, prune it 25%% and 50%%, verify and show the result")
    p.add_argument("--workdir", default="moeprune-demo", help="folder for the demo's checkpoints")
    p.add_argument("--method", default="aimer", help=f"criterion: {methods}")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    configure(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except MoePruneError as e:
        print(f"moeprune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
