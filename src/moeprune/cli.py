"""Command line: `moeprune {info,calibrate,stats,criteria,plan,apply,prune,verify,eval,lm-eval,compare,demo,testbed}`.

Thin: every flag maps onto an `api` argument."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from moeprune import __version__
from moeprune.cli_analyze import add_analyze_parser
from moeprune.cli_common import (
    _add_apply_flags,
    _add_calib_flags,
    _add_eval_flags,
    _add_select_flags,
    _calib_options,
    _ratio,
    _verify_exit,
)
from moeprune.cli_merge import add_merge_flags, apply_merge, plan_merge, prune_merge, verify_merge
from moeprune.cli_neurons import add_neuron_flags, plan_neurons, prune_neurons
from moeprune.cli_testbed import add_testbed_parsers
from moeprune.errors import MoePruneError
from moeprune.log import configure, logger


def _methods() -> list[str]:
    from moeprune.criteria import CRITERIA

    return list(CRITERIA)


def cmd_info(args) -> int:
    from moeprune import api
    from moeprune.models.summary import format_summary

    summary = api.info(args.model)
    print(json.dumps(summary.to_dict(), indent=1) if args.json else format_summary(summary))
    return 0


def cmd_plan(args) -> int:
    from moeprune import api
    from moeprune.criteria.neurons import NEURON_CRITERIA
    from moeprune.merge.grouping import GROUPINGS
    from moeprune.select.plan import check_plan_path

    if args.out:
        check_plan_path(args.out)
    if args.method in NEURON_CRITERIA:
        return plan_neurons(args)
    if args.method in GROUPINGS:
        return plan_merge(args)
    if args.calib:
        raise MoePruneError("plan reads expert statistics from a file made by `moeprune calibrate`; --calib is for "
                            "the neuron methods (heapr, camera). Pass the statistics file as MODEL.")
    plan = api.make_plan(args.model, args.method, args.ratio, seed=args.seed, calib_set=args.calib_set,
                         policy=args.policy, floor=args.floor, protect=args.protect,
                         protect_super=args.protect_super)
    if args.out:
        plan.save(args.out)
        logger.info("plan written to %s (keeps %d of %d experts per layer)", args.out, plan.kept_count,
                    plan.num_experts)
    else:
        print(json.dumps({k: v for k, v in plan.to_dict().items() if k != "scores"}, indent=1))
    return 0


def cmd_apply(args) -> int:
    from moeprune import api
    from moeprune.merge.plan import MERGE_FORMAT
    from moeprune.select.neuron_plan import NEURON_FORMAT, NeuronPlan
    from moeprune.select.plan import PrunePlan

    if _plan_format(args.plan) == MERGE_FORMAT:
        return apply_merge(args)
    if _plan_format(args.plan) == NEURON_FORMAT:
        from moeprune.neuron_api import apply_neuron_plan_to

        if args.streaming:
            raise MoePruneError("neuron plans are applied in memory; drop --streaming.")
        apply_neuron_plan_to(args.model, NeuronPlan.load(args.plan), args.out, overwrite=args.overwrite)
        return 0
    plan = PrunePlan.load(args.plan)
    api.apply_plan(args.model, plan, args.out, streaming=args.streaming, max_shard_size=args.max_shard_size,
                   overwrite=args.overwrite)
    return 0


def _plan_format(path: str) -> str | None:
    try:
        return json.loads(Path(path).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None  # PrunePlan.load gives the precise error


def cmd_prune(args) -> int:
    from moeprune import api
    from moeprune.criteria.neurons import NEURON_CRITERIA
    from moeprune.merge.grouping import GROUPINGS

    if args.method in NEURON_CRITERIA:
        return prune_neurons(args)
    if args.method in GROUPINGS:
        return prune_merge(args)
    if args.expert_method or args.expert_ratio:
        raise MoePruneError("--expert-method/--expert-ratio combine expert removal with a neuron method "
                            "(--method heapr|camera).")
    _, result = api.prune(args.model, args.out, method=args.method, ratio=args.ratio, seed=args.seed,
                          streaming=args.streaming, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                          run_verify=not args.no_verify, verify_dtype=args.verify_dtype,
                          calib=_calib_options(args) if args.calib else None, policy=args.policy,
                          floor=args.floor, protect=args.protect, protect_super=args.protect_super,
                          as_you_go=args.as_you_go)
    return _verify_exit(result)


def cmd_calibrate(args) -> int:
    from moeprune.calibration.run import calibrate

    if not args.calib:
        raise MoePruneError("no calibration data: pass at least one --calib NAME=PATH.")
    try:
        calibrate(args.model, _calib_options(args), args.out, overwrite=args.overwrite)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def cmd_stats_merge(args) -> int:
    from moeprune.stats.store import ExpertStats, check_stats_output

    out = check_stats_output(args.out, args.overwrite)
    loaded = [ExpertStats.load(p) for p in args.files]
    merged = loaded[0]
    for other in loaded[1:]:
        merged = merged.merge(other)
    merged.save(out)
    logger.info("merged %d files into %s (sets: %s)", len(loaded), out, ", ".join(merged.sets))
    return 0


def cmd_criteria(args) -> int:
    from moeprune.criteria.agreement import agreement
    from moeprune.stats.store import ExpertStats

    print(agreement(ExpertStats.load(args.stats), args.ratio, args.calib_set, seed=args.seed).format())
    return 0


def _eval_options(args):
    from moeprune.eval.run import EvalOptions

    return EvalOptions(tuple(args.data), seq_len=args.seq_len, max_sequences=args.max_sequences,
                       batch_size=args.batch_size, dtype=args.dtype, device=args.device, prompts=tuple(args.prompt),
                       max_new_tokens=args.max_new_tokens, tokenizer=args.tokenizer)


def cmd_eval(args) -> int:
    from moeprune.eval.run import evaluate

    print(evaluate(args.model, _eval_options(args), args.json).format())
    return 0


def cmd_lm_eval(args) -> int:
    from pathlib import Path

    from moeprune.eval.lm_eval_adapter import run_lm_eval
    from moeprune.io.report import write_json_atomic

    out = Path(args.json).expanduser() if args.json else None
    if out is not None and not out.parent.resolve().is_dir():
        raise MoePruneError(f"--json {out}: folder {out.parent} does not exist; create it first.")
    result = run_lm_eval(args.model, args.tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                         limit=args.limit, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                         include_defaults=not args.no_builtin_tasks)
    print(result.format())
    if out is not None:
        write_json_atomic(out, dict(result))
        logger.info("lm-eval results written to %s", out)
    return 0


def cmd_compare(args) -> int:
    from moeprune.eval.compare import compare

    print(compare(args.original, args.pruned, _eval_options(args), args.out, args.overwrite).markdown())
    return 0


def cmd_verify(args) -> int:
    from moeprune import api
    from moeprune.merge.plan import MERGE_FORMAT
    from moeprune.merge_api import MERGE_PLAN_NAME
    from moeprune.select.plan import PrunePlan

    merged = (Path(args.pruned) / MERGE_PLAN_NAME).is_file() if not args.plan else None
    if merged or (args.plan and _plan_format(args.plan) == MERGE_FORMAT):
        return verify_merge(args)
    plan = PrunePlan.load(args.plan) if args.plan else None
    result = api.verify(args.original, args.pruned, plan, dtype=args.dtype, tol=args.tol, seed=args.seed)
    return _verify_exit(result)


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

    p = sub.add_parser("calibrate", help="run calibration text through the model; write expert statistics")
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--out", required=True, help="statistics file to write (*.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_calib_flags(p, required=True)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("stats", help="statistics files: merge")
    stats_sub = p.add_subparsers(dest="stats_command", required=True)
    m = stats_sub.add_parser("merge", help="add up statistics files of the same model")
    m.add_argument("files", nargs="+", help="statistics files (*.safetensors)")
    m.add_argument("--out", required=True)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=cmd_stats_merge)

    p = sub.add_parser("criteria", help="how far the criteria agree on which experts to keep")
    p.add_argument("stats", help="statistics file from `moeprune calibrate`")
    p.add_argument("--ratio", type=_ratio, required=True)
    p.add_argument("--calib-set", action="append", help="use only these calibration sets (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random control")
    p.set_defaults(func=cmd_criteria)

    p = sub.add_parser("plan", help="score experts and write a plan (JSON)")
    p.add_argument("model", help="checkpoint folder (data-free methods) or statistics file (calibrated methods)")
    p.add_argument("--method", required=True, help=f"criterion: {methods}; neuron methods: heapr, camera; merges: "
                                                   "msmoe, hcsmoe, submoe, dern")
    p.add_argument("--ratio", type=_ratio, required=True, help="fraction of routed experts to drop per layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-set", action="append", help="use only these calibration sets (repeatable)")
    p.add_argument("--out", help="plan file to write (printed when omitted)")
    _add_select_flags(p, progressive=False)
    add_neuron_flags(p, combined=False)
    add_merge_flags(p)
    _add_calib_flags(p, required=False)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="apply a plan to a checkpoint and save the smaller one")
    p.add_argument("model")
    p.add_argument("--plan", required=True)
    _add_apply_flags(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("prune", help="[calibrate +] plan + apply + save + verify")
    p.add_argument("model")
    p.add_argument("--method", help=f"criterion: {methods}; neuron methods: heapr, camera; merges: msmoe, hcsmoe, "
                                    "submoe, dern (not needed with --policy reconstruction)")
    p.add_argument("--ratio", type=_ratio, required=True,
                   help="fraction of experts removed; with heapr/camera: of routed-expert parameters (neurons)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-verify", action="store_true", help="skip the final verification")
    add_neuron_flags(p, combined=True)
    add_merge_flags(p)
    p.add_argument("--verify-dtype", default="float32", help="dtype for verification (float32, bfloat16, ...)")
    _add_apply_flags(p)
    _add_select_flags(p, progressive=True)
    _add_calib_flags(p, required=False)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("verify", help="stock reload of PRUNED == ORIGINAL with the removed experts masked (merges: "
                                      "== ORIGINAL merged in memory)")
    p.add_argument("original")
    p.add_argument("pruned")
    p.add_argument("--plan", help="plan file (default: PRUNED/moeprune_report.json, or moeprune_merge.json)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tol", type=float, default=None, help="relative tolerance (default 1e-4 in float32)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("eval", help="per-domain perplexity and next-token accuracy on held-out text")
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--json", help="write {domain: {perplexity, accuracy, tokens}} here")
    _add_eval_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on a checkpoint (needs moeprune[eval])")
    p.add_argument("model", help="checkpoint folder (with its tokenizer)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--no-builtin-tasks", action="store_true",
                   help="look tasks up only in --include-path (skips indexing lm-eval's built-in tasks)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--limit", type=float, help="documents per task (a fraction when < 1); for quick checks")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", help="write {task: {metric: value}} here")
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser("compare", help="before/after evaluation table, markdown report and plot")
    p.add_argument("original")
    p.add_argument("pruned")
    p.add_argument("--out", required=True, help="folder for compare.md, compare.json, compare.png")
    p.add_argument("--overwrite", action="store_true")
    _add_eval_flags(p)
    p.set_defaults(func=cmd_compare)

    add_analyze_parser(sub)
    add_testbed_parsers(sub, methods)
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
