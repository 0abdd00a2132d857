"""`moeprune testbed {build,info,path}`: the trained multi-domain Qwen3-MoE of the demo and the benchmarks."""

from __future__ import annotations

from moeprune.cli.common import add_verb


def cmd_testbed_build(args) -> int:
    from moeprune.testbed import TestbedConfig, build_testbed

    changes = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    build_testbed(args.out, force=args.force, cfg=TestbedConfig(**changes) if changes else None)
    return 0


def cmd_testbed_info(args) -> int:
    from moeprune.testbed import Testbed, default_dir, describe

    print(describe(Testbed.load(args.path or default_dir())))
    return 0


def cmd_testbed_path(args) -> int:
    from moeprune.testbed import Testbed, default_dir

    print(Testbed.load(default_dir()).path)  # errors (exit 2) when it is not built yet
    return 0


def add_parser(sub) -> None:
    tb = add_verb(sub, "testbed", "the trained multi-domain Qwen3-MoE used by the demo and the benchmarks",
                  "moeprune testbed build && moeprune testbed info")
    tbs = tb.add_subparsers(dest="testbed_command", required=True, metavar="ACTION",
                            help="build it, describe it, or print its folder (`moeprune testbed ACTION -h`)")
    p = add_verb(tbs, "build", "train it (about 7 min on one CPU core) or reuse the cached one",
                 "moeprune testbed build --out ./testbed")
    p.add_argument("--out", help="folder (default: the user cache, $MOEPRUNE_CACHE or ~/.cache/moeprune)")
    p.add_argument("--force", action="store_true", help="rebuild even when the folder holds a testbed")
    p.add_argument("--steps", type=int, help="training steps (default: the standard testbed's)")
    p.add_argument("--seed", type=int, help="training seed (default 0)")
    p.set_defaults(func=cmd_testbed_build)
    p = add_verb(tbs, "info", "held-out scores and routing per domain of a built testbed", "moeprune testbed info")
    p.add_argument("path", nargs="?", help="testbed folder (default: the cached one)")
    p.set_defaults(func=cmd_testbed_info)
    p = add_verb(tbs, "path", "print the cached testbed's folder", 'moeprune eval "$(moeprune testbed path)"')
    p.set_defaults(func=cmd_testbed_path)
