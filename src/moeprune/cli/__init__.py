"""moeprune makes Mixture-of-Experts language models smaller: it removes or merges routed experts, or removes
neurons inside them, and writes a checkpoint that stock transformers loads, checked against the original.

Start with `moeprune demo` (no download), `moeprune info MODEL`, `moeprune analyze MODEL --calib ...`, then
`moeprune prune MODEL --method ... --ratio ... --out DIR` or `--recipe FILE`. `moeprune COMMAND -h` shows each
command's flags, defaults and an example.
"""

from __future__ import annotations

import argparse
import os
import sys

from moeprune import __version__
from moeprune.cli import (
    analyze,
    apply,
    budget,
    calibrate,
    compare,
    criteria,
    demo,
    eval,
    export,
    gen_tasks,
    info,
    lm_eval,
    plan,
    prune,
    quantize,
    stats,
    steer,
    sweep,
    taskpack,
    testbed,
    verify,
)
from moeprune.cli.common import HelpFormatter
from moeprune.errors import MoePruneError
from moeprune.io.remote import FLAG, trust_remote_code
from moeprune.log import configure

# in the order `moeprune -h` lists them: the usual path first, then the tools around it
VERBS = (demo, info, analyze, calibrate, stats, criteria, plan, apply, prune, quantize, budget, verify, eval, compare,
         gen_tasks, lm_eval, export, steer, sweep, taskpack, testbed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeprune", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"moeprune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(FLAG, action="store_true",
                        help="load checkpoints whose config.json maps to Python code in their folder (auto_map); "
                             "this RUNS that code. Accepted anywhere on the command line.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do (`moeprune COMMAND -h` for its flags and an example)")
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = list(sys.argv[1:] if argv is None else argv)
    trust = FLAG in argv  # accepted after the command too: `moeprune prune MODEL ... --trust-remote-code`
    args = build_parser().parse_args([a for a in argv if a != FLAG])
    configure(args.verbose)
    try:
        with trust_remote_code(trust):
            return args.func(args)
    except MoePruneError as e:
        print(f"moeprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moeprune: interrupted; nothing was written (outputs are only renamed into place when complete)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
