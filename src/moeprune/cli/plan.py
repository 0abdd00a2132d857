"""`moeprune plan SOURCE --method M --ratio R --out plan.json`: one stage's plan (JSON) without touching weights.

Expert criteria and merges plan from a statistics file (`moeprune calibrate`), data-free criteria from the
checkpoint folder, neuron methods from the checkpoint folder and --calib text."""

from __future__ import annotations

import json

from moeprune.cli.common import (
    add_calib_flags,
    add_stage_flags,
    add_verb,
    calib_options,
    check_new_file,
    stage_options,
)
from moeprune.errors import MoePruneError
from moeprune.log import logger


def add_parser(sub) -> None:
    p = add_verb(sub, "plan", "score experts or neurons and write a plan (JSON)",
                 "moeprune plan stats.safetensors --method reap --ratio 0.25 --out plan.json")
    p.add_argument("model", help="checkpoint folder (data-free and neuron methods) or statistics file "
                                 "(calibrated expert criteria and merges)")
    p.add_argument("--out", help="plan file to write (printed when omitted)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_stage_flags(p, prune=False)
    add_calib_flags(p, required=False)
    p.set_defaults(func=run)


def run(args) -> int:
    from moeprune import api
    from moeprune.pipeline.verify import as_chain
    from moeprune.stages import stage_for_method

    if args.method is None or (args.ratio is None and stage_for_method(args.method).takes_ratio):
        raise MoePruneError("plan needs --method and --ratio (routing policies: --method and their options).")
    check_new_file(args.out, args.overwrite)
    calib = calib_options(args) if args.calib else None
    plan = api.make_plan(args.model, args.method, args.ratio, calib=calib, **stage_options(args))
    stage = as_chain([plan])[0][0]
    if args.out:
        plan.save(args.out)
        logger.info("plan written to %s (%s)", args.out, stage.describe(plan))
    else:
        print(json.dumps({k: v for k, v in plan.to_dict().items() if k != "scores"}, indent=1))
    return 0

