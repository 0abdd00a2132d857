"""`moeprune info MODEL`: MoE structure of a checkpoint, which methods its layout allows, and what removing experts
would save (headers only). `moeprune info --families`: every family this moeprune supports or refuses."""

from __future__ import annotations

import json

from moeprune.cli.common import add_verb
from moeprune.errors import MoePruneError


def add_parser(sub) -> None:
    p = add_verb(sub, "info", "MoE structure of a checkpoint and what pruning would save",
                 "moeprune info ./Qwen3-30B-A3B")
    p.add_argument("model", nargs="?", help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--families", action="store_true",
                   help="list the model types moeprune supports (and refuses, with the reason) instead")
    p.set_defaults(func=run)


def run(args) -> int:
    from moeprune import api
    from moeprune.models.summary import format_summary

    if args.families:
        if args.model:
            raise MoePruneError("give a model folder or --families, not both.")
        rows = family_rows()
        print(json.dumps(rows, indent=1) if args.json else format_families(rows))
        return 0
    if not args.model:
        raise MoePruneError("give a checkpoint folder (moeprune info MODEL), or --families.")
    summary = api.info(args.model)
    print(json.dumps(summary.to_dict(), indent=1) if args.json else format_summary(summary))
    return 0


def family_rows() -> list[dict]:
    """model_type -> family, how it is described (adapter or structure) or why it is refused."""
    from moeprune.models.families import REFUSED
    from moeprune.models.registry import ADAPTERS
    from moeprune.models.structural import StructuralAdapter

    rows = [{"model_type": mt, "family": cls.family,
             "adapter": "structure + data" if issubclass(cls, StructuralAdapter) else "hand-written",
             "refused": None} for mt, cls in ADAPTERS.items()]
    rows += [{"model_type": mt, "family": mt, "adapter": "-", "refused": why} for mt, why in REFUSED.items()]
    return sorted(rows, key=lambda r: r["model_type"])


def format_families(rows: list[dict]) -> str:
    lines = [f"{'model_type':<28}{'family':<22}adapter"]
    for r in rows:
        how = f"REFUSED: {r['refused']}" if r["refused"] else r["adapter"]
        lines.append(f"{r['model_type']:<28}{r['family']:<22}{how}")
    lines.append("")
    lines.append("Any other MoE model whose layout shows a router next to '.experts' goes through the structural "
                 "fallback. The verbs each family passes: README (benchmarks/families.py).")
    return "\n".join(lines)
