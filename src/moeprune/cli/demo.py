"""`moeprune demo`: testbed -> calibrate -> prune 25 % and 50 % -> verify -> evaluate -> report."""

from __future__ import annotations

from moeprune.cli.common import add_verb


def add_parser(sub) -> None:
    p = add_verb(sub, "demo", "testbed -> calibrate -> prune 25%% and 50%% -> verify -> evaluate -> report",
                 "moeprune demo --workdir ./moeprune-demo")
    p.add_argument("--workdir", default="moeprune-demo", help="folder for the demo's checkpoints and report")
    p.add_argument("--method", default=None, help="expert criterion (default: the demo's chosen default)")
    p.add_argument("--testbed", help="testbed folder (default: the user cache; built when missing)")
    p.set_defaults(func=run)


def run(args) -> int:
    from moeprune.demo import run_demo

    return run_demo(args.workdir, method=args.method, testbed=args.testbed)
