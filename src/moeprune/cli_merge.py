"""CLI pieces of expert merging (`--method msmoe|hcsmoe|submoe|dern` in `plan` and `prune`, merge plans in `apply`
and `verify`)."""

from __future__ import annotations

import argparse
import json

from moeprune.cli_common import _calib_options, _verify_exit
from moeprune.errors import MoePruneError
from moeprune.log import logger


def _merge_options(args) -> dict:
    return {"budget": args.budget or "uniform", "merge": args.merge, "router": args.router, "rank": args.rank,
            "threshold": args.threshold}


def _refuse_pruning_flags(args) -> None:
    ignored = [flag for flag, on in (("--policy", args.policy != "uniform"), ("--protect", bool(args.protect)),
                                     ("--protect-super", args.protect_super), ("--floor", args.floor is not None),
                                     ("--streaming", getattr(args, "streaming", False)),
                                     ("--as-you-go", getattr(args, "as_you_go", False)),
                                     ("--expert-method", bool(getattr(args, "expert_method", None))))
               if on]
    if ignored:
        raise MoePruneError(f"{', '.join(ignored)} apply to expert removal; with --method {args.method} use "
                            "--budget uniform|global, --merge, --router, --rank, --threshold.")


def plan_merge(args) -> int:
    from moeprune.merge_api import make_merge_plan

    _refuse_pruning_flags(args)
    if args.calib:
        raise MoePruneError(f"--method {args.method} groups experts from a statistics file made by `moeprune "
                            "calibrate`; pass that file as MODEL (or use `moeprune prune --calib ...`).")
    plan = make_merge_plan(args.model, args.method, args.ratio, calib_set=args.calib_set, **_merge_options(args))
    if args.out:
        plan.save(args.out)
        logger.info("merge plan written to %s (%d experts -> %d per layer)", args.out, plan.num_experts,
                    len(next(iter(plan.groups.values()))))
    else:
        print(json.dumps(plan.to_dict(), indent=1))
    return 0


def prune_merge(args) -> int:
    from moeprune.merge_api import prune_merge

    _refuse_pruning_flags(args)
    if not args.calib:
        raise MoePruneError(f"--method {args.method} groups experts by calibration statistics: pass --calib NAME=PATH.")
    _, result = prune_merge(args.model, args.out, method=args.method, ratio=args.ratio, calib=_calib_options(args),
                            overwrite=args.overwrite, run_verify=not args.no_verify, verify_dtype=args.verify_dtype,
                            **_merge_options(args))
    return _verify_exit(result)


def apply_merge(args) -> int:
    from moeprune.merge.plan import MergePlan
    from moeprune.merge_api import apply_merge_plan_to

    if args.streaming:
        raise MoePruneError("merge plans are applied in memory; drop --streaming.")
    apply_merge_plan_to(args.model, MergePlan.load(args.plan), args.out, overwrite=args.overwrite)
    return 0


def verify_merge(args) -> int:
    from moeprune.api import DEFAULT_TOL
    from moeprune.merge.plan import MergePlan
    from moeprune.merge_api import verify_merge

    plan = MergePlan.load(args.plan) if args.plan else None
    tol = DEFAULT_TOL.get(args.dtype, 1e-2) if args.tol is None else args.tol
    return _verify_exit(verify_merge(args.original, args.pruned, plan, dtype=args.dtype, tol=tol, seed=args.seed))


def add_merge_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert merging (--method msmoe|hcsmoe|submoe|dern; statistics with probes)")
    g.add_argument("--merge", choices=["average", "svd", "dern"],
                   help="how a group becomes one expert (default: the method's own: msmoe/hcsmoe average, "
                        "submoe svd, dern dern)")
    g.add_argument("--router", default="dominant", choices=["dominant", "weighted"],
                   help="router row of a merged expert: the dominant's row, or the usage-weighted mean of the rows")
    g.add_argument("--rank", type=int, help="svd merge: shared singular directions kept per role (default: full)")
    g.add_argument("--threshold", type=float, default=0.4,
                   help="dern: least cosine for a dropped neuron to be recombined into a survivor (default 0.4)")
