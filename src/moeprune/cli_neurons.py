"""CLI pieces of neuron pruning (`--method heapr|camera` in `plan` and `prune`)."""

from __future__ import annotations

import argparse
import json

from moeprune.cli_common import _calib_options, _ratio, _verify_exit
from moeprune.errors import MoePruneError
from moeprune.log import logger


def plan_neurons(args) -> int:
    from moeprune.neuron_api import make_neuron_plan

    if not args.calib:
        raise MoePruneError(f"--method {args.method} scores neurons from calibration text: pass --calib NAME=PATH "
                            "and the checkpoint folder as MODEL.")
    plan = make_neuron_plan(args.model, args.method, args.ratio, _calib_options(args), budget=args.budget or "expert",
                            min_width=args.min_width, rho=args.rho)
    if args.out:
        plan.save(args.out)
        logger.info("neuron plan written to %s", args.out)
    else:
        print(json.dumps(plan.to_dict(), indent=1))
    return 0


def prune_neurons(args) -> int:
    """--method heapr|camera: neuron statistics on --calib, budget, slice, save, verify."""
    from moeprune import api
    from moeprune.neuron_api import prune_neurons

    if not args.calib:
        raise MoePruneError(f"--method {args.method} scores neurons from calibration text: pass --calib NAME=PATH.")
    ignored = [flag for flag, on in (("--streaming", args.streaming), ("--as-you-go", args.as_you_go),
                                     ("--policy", args.policy != "uniform"), ("--protect", bool(args.protect)),
                                     ("--protect-super", args.protect_super), ("--floor", args.floor is not None))
               if on]
    if ignored:
        raise MoePruneError(f"{', '.join(ignored)} apply to expert removal; with --method {args.method} use "
                            "--budget/--min-width, and --expert-method/--expert-ratio to drop experts first.")
    if bool(args.expert_method) != bool(args.expert_ratio):
        raise MoePruneError("pass --expert-method and --expert-ratio together (experts first, then neurons).")
    calib = _calib_options(args)
    expert_plan = None
    if args.expert_method:
        from moeprune.criteria import CRITERIA

        needs = CRITERIA.get(args.expert_method).needs == "calibration"
        source = api.calibrate(args.model, calib) if needs else args.model
        expert_plan = api.make_plan(source, args.expert_method, args.expert_ratio)
    _, result = prune_neurons(args.model, args.out, method=args.method, ratio=args.ratio, calib=calib,
                              budget=args.budget or "expert", min_width=args.min_width, rho=args.rho,
                              expert_plan=expert_plan, overwrite=args.overwrite, run_verify=not args.no_verify)
    return _verify_exit(result)


def add_neuron_flags(p: argparse.ArgumentParser, combined: bool) -> None:
    g = p.add_argument_group("neuron pruning (--method heapr|camera; needs --calib) and merge budget")
    g.add_argument("--budget", default=None,
                   help="neurons: how the removed neurons are spread: expert (default; uniform width, stock-loadable), "
                        "layer or global (non-uniform widths: load the export with moeprune.load_model); merges: "
                        "uniform (default) or global (M-SMoE adaptive per-layer counts, lifted to one count)")
    g.add_argument("--min-width", type=int, default=1, help="neurons every expert keeps at least")
    g.add_argument("--rho", type=float, default=0.9, help="CAMERA-P: weight of the peak term")
    if combined:
        g.add_argument("--expert-method", help="first remove experts with this criterion ...")
        g.add_argument("--expert-ratio", type=_ratio, help="... at this ratio, then neurons inside the survivors")
