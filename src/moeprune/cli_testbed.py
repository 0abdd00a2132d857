"""CLI subcommands around the testbed: `moeprune demo` and `moeprune testbed {build,info,path}`."""

from __future__ import annotations


def cmd_demo(args) -> int:
    from moeprune.demo import run_demo

    return run_demo(args.workdir, method=args.method, testbed=args.testbed)


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


def add_testbed_parsers(sub, methods: str) -> None:
    p = sub.add_parser("demo", help="testbed -> calibrate -> prune 25%% and 50%% -> verify -> evaluate -> report")
    p.add_argument("--workdir", default="moeprune-demo", help="folder for the demo's checkpoints and report")
    p.add_argument("--method", default=None, help=f"criterion (default: the demo's chosen default): {methods}")
    p.add_argument("--testbed", help="testbed folder (default: the user cache; built when missing)")
    p.set_defaults(func=cmd_demo)

    tb = sub.add_parser("testbed", help="the trained multi-domain Qwen3-MoE used by the demo and the benchmarks")
    tbs = tb.add_subparsers(dest="testbed_command", required=True)
    p = tbs.add_parser("build", help="train it (about 7 min on one CPU core) or reuse the cached one")
    p.add_argument("--out", help="folder (default: the user cache, $MOEPRUNE_CACHE or ~/.cache/moeprune)")
    p.add_argument("--force", action="store_true", help="rebuild even when the folder holds a testbed")
    p.add_argument("--steps", type=int, help="training steps (default: the standard testbed's)")
    p.add_argument("--seed", type=int, help="training seed (default 0)")
    p.set_defaults(func=cmd_testbed_build)
    p = tbs.add_parser("info", help="held-out scores and routing per domain of a built testbed")
    p.add_argument("path", nargs="?", help="testbed folder (default: the cached one)")
    p.set_defaults(func=cmd_testbed_info)
    p = tbs.add_parser("path", help="print the cached testbed's folder (e.g. `moeprune eval $(moeprune testbed path)`)")
    p.set_defaults(func=cmd_testbed_path)
