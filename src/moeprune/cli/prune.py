"""`moeprune prune MODEL --out DIR` with `--recipe FILE` or one stage's flags: calibrate, plan, apply, save, verify.

Single-method flags are a one-stage recipe (`--expert-method/--expert-ratio` put an expert stage first), so
`--method reap --ratio 0.25` and a recipe `[{method: reap, ratio: 0.25}]` give the same export."""

from __future__ import annotations

from moeprune.cli.common import (
    add_apply_flags,
    add_calib_flags,
    add_distill_flags,
    add_stage_flags,
    add_verb,
    calib_options,
    distill_options,
    stage_options,
    verify_exit,
)
from moeprune.errors import MoePruneError

EXAMPLE = """moeprune prune ./model --method reap --ratio 0.25 --calib web=web.txt --out ./pruned
  moeprune prune ./model --method tcess_top1 --ratio 0.5 --distill-steps 200 --calib web=web.txt --out ./pruned
  moeprune prune ./model --recipe recipe.yaml --calib web=web.txt --out ./pruned
      # recipe.yaml:  stages: [{method: tcess_top1, ratio: 0.25}, {method: heapr, ratio: 0.25}]"""


def add_parser(sub) -> None:
    p = add_verb(sub, "prune", "[calibrate +] plan + apply + save + verify, for one method or a recipe of stages",
                 EXAMPLE)
    p.add_argument("model", help="checkpoint folder (never modified)")
    p.add_argument("--recipe", help="YAML/JSON list of stages ({method, ratio, options}); each stage is calibrated "
                                    "on the model as the stages before it leave it")
    add_stage_flags(p, prune=True)
    p.add_argument("--repair", metavar="KIND", choices=["obs", "compensate", "router", "all"],
                   help="repair the cut in closed form on the calibration text (a repair stage after it): obs "
                        "(neuron removal), compensate (least-squares update of the kept experts' down projections), "
                        "router (re-fit the kept router rows) or all; each kept only where it lowers the measured "
                        "block error")
    add_distill_flags(p)
    p.add_argument("--no-verify", action="store_true", help="skip the final verification")
    p.add_argument("--verify-dtype", default="float32", help="dtype of the verification (float32, bfloat16, ...)")
    add_apply_flags(p)
    add_calib_flags(p, required=False)
    p.set_defaults(func=run)


def run(args) -> int:
    from moeprune import api

    options, distill = stage_options(args), distill_options(args)
    if args.recipe and (args.method or args.ratio is not None or options or args.expert_method or args.expert_ratio
                        or args.repair or distill):
        given = [f"--{k.replace('_', '-')}" for k in ("method", "ratio", "expert_method", "expert_ratio", "repair",
                                                       *options, *(["distill_steps"] if distill else []))
                 if getattr(args, k, None) not in (None, False, [])]
        raise MoePruneError(f"--recipe lists the stages and their options; drop {', '.join(given)} (or write them "
                            "into the recipe).")
    applied, result = api.prune(args.model, args.out, args.recipe, method=args.method, ratio=args.ratio,
                          calib=calib_options(args) if args.calib else None, streaming=args.streaming, lazy=args.lazy,
                          max_shard_size=args.max_shard_size, overwrite=args.overwrite, run_verify=not args.no_verify,
                          verify_dtype=args.verify_dtype, expert_method=args.expert_method,
                          expert_ratio=args.expert_ratio, repair=args.repair, distill=distill,
                          **({} if args.recipe else options))
    from moeprune.pipeline.quality import format_split
    from moeprune.select.auto import describe_choice

    for stage in applied.report.get("stages", []):
        if stage.get("auto"):
            print(describe_choice(stage["auto"]))
    split = format_split(applied.report.get("calibration_split") or {})
    if split:
        print(split)
    return verify_exit(result)
