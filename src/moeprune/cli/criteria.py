"""`moeprune criteria STATS --ratio R`: how far the expert criteria agree on which experts to keep."""

from __future__ import annotations

from moeprune.cli.common import add_verb, ratio_type


def add_parser(sub) -> None:
    p = add_verb(sub, "criteria", "how far the criteria agree on which experts to keep",
                 "moeprune criteria stats.safetensors --ratio 0.5")
    p.add_argument("stats", help="statistics file from `moeprune calibrate`")
    p.add_argument("--ratio", type=ratio_type, required=True, help="fraction of routed experts dropped per layer")
    p.add_argument("--calib-set", action="append", help="use only these calibration sets (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random control")
    p.set_defaults(func=run)


def run(args) -> int:
    from moeprune.criteria.agreement import agreement
    from moeprune.stats.store import ExpertStats

    print(agreement(ExpertStats.load(args.stats), args.ratio, args.calib_set, seed=args.seed).format())
    return 0
