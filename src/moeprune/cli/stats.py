"""`moeprune stats merge A B --out C`: statistics files of the same model add up (sums and counts)."""

from __future__ import annotations

from moeprune.cli.common import add_verb
from moeprune.log import logger


def add_parser(sub) -> None:
    p = add_verb(sub, "stats", "statistics files: merge",
                 "moeprune stats merge rank0.safetensors rank1.safetensors --out all.safetensors")
    stats_sub = p.add_subparsers(dest="stats_command", required=True, metavar="ACTION",
                                 help="what to do with the files (`moeprune stats ACTION -h` for its flags)")
    m = add_verb(stats_sub, "merge", "add up statistics files of the same model",
                 "moeprune stats merge rank0.safetensors rank1.safetensors --out all.safetensors")
    m.add_argument("files", nargs="+", help="statistics files (*.safetensors) from `moeprune calibrate`")
    m.add_argument("--out", required=True, help="statistics file to write")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    m.set_defaults(func=run)


def run(args) -> int:
    from moeprune.stats.store import ExpertStats, check_stats_output

    out = check_stats_output(args.out, args.overwrite)
    loaded = [ExpertStats.load(p) for p in args.files]
    merged = loaded[0]
    for other in loaded[1:]:
        merged = merged.merge(other)
    merged.save(out)
    logger.info("merged %d files into %s (sets: %s)", len(loaded), out, ", ".join(merged.sets))
    return 0
