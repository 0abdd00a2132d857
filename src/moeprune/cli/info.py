"""`moeprune info MODEL`: MoE structure of a checkpoint and what removing experts would save (headers only)."""

from __future__ import annotations

import json

from moeprune.cli.common import add_verb


def add_parser(sub) -> None:
    p = add_verb(sub, "info", "MoE structure of a checkpoint and what pruning would save",
                 "moeprune info ./Qwen3-30B-A3B")
    p.add_argument("model", help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from moeprune import api
    from moeprune.models.summary import format_summary

    summary = api.info(args.model)
    print(json.dumps(summary.to_dict(), indent=1) if args.json else format_summary(summary))
    return 0
