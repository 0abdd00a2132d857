"""`moeprune calibrate MODEL --calib NAME=PATH ... --out stats.safetensors`: routed-expert statistics."""

from __future__ import annotations

from moeprune.cli.common import add_calib_flags, add_verb, calib_options
from moeprune.errors import MoePruneError


def add_parser(sub) -> None:
    p = add_verb(sub, "calibrate", "run calibration text through the model; write expert statistics",
                 "moeprune calibrate ./model --calib web=web.txt --calib code=code.jsonl --out stats.safetensors")
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--out", required=True, help="statistics file to write (*.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_calib_flags(p, required=True)
    p.set_defaults(func=run)


def run(args) -> int:
    from moeprune.calibration.run import calibrate

    if not args.calib:
        raise MoePruneError("no calibration data: pass at least one --calib NAME=PATH.")
    try:
        calibrate(args.model, calib_options(args), args.out, overwrite=args.overwrite)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
