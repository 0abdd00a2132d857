"""`moeprune quantize MODEL --scheme w4a16 --algorithm rtn|gptq [--calib NAME=PATH] --out DIR`: a one-stage recipe
`{method: quantize, ...}` run by the same pipeline as `prune` (checks first, export, stock-reload verification)."""

from __future__ import annotations

from moeprune.cli.common import add_apply_flags, add_calib_flags, add_verb, calib_options, verify_exit
from moeprune.quant.scheme import SCHEMES

EXAMPLE = """moeprune quantize ./model --scheme w4a16 --algorithm gptq --calib web=web.txt --out ./model-w4
  moeprune quantize ./model --scheme w8a16 --out ./model-w8            # RTN: no calibration text
  moeprune quantize ./model --avg-bits 3 --calib web=web.txt --out ./model-mixed
      # one width per MoE layer (2/3/4/8) chosen by the milp under 3 average bits (--max-bytes 40GB: a size)
  moeprune prune ./model --recipe r.yaml --calib web=web.txt --out ./small
      # r.yaml: stages: [{method: reap, ratio: 0.25}, {method: quantize, scheme: w4a16, algorithm: gptq}]"""

# flag dest -> recipe option of the quantize stage (None / unset flags are not passed on)
OPTIONS = ("scheme", "algorithm", "group_size", "parts", "min_tokens", "damp", "act_order", "avg_bits", "max_bytes",
           "allocate", "granularity", "widths")


def add_parser(sub) -> None:
    p = add_verb(sub, "quantize", "weight-only integer quantization of the routed experts (RTN or GPTQ per expert), "
                 "saved as a compressed-tensors checkpoint that transformers and vLLM load", EXAMPLE)
    p.add_argument("model", help="checkpoint folder (never modified; must not be quantized already)")
    p.add_argument("--scheme", default="w4a16", choices=list(SCHEMES),
                   help="wNa16: N-bit integer weights, 16-bit activations (vLLM serves 4 and 8 bits)")
    p.add_argument("--algorithm", default="rtn", choices=["rtn", "gptq"],
                   help="rtn: round to nearest (no data); gptq: GPTQ per expert on its routed calibration tokens")
    p.add_argument("--group-size", type=int, default=None, help="weights per scale along the input (default 128)")
    p.add_argument("--asymmetric", action="store_true", help="store a zero point per group too")
    p.add_argument("--parts", nargs="+", choices=["shared_experts", "attention"], default=None,
                   help="also quantize these (the routed experts always are)")
    p.add_argument("--min-tokens", type=int, default=None,
                   help="GPTQ: experts with fewer routed calibration tokens fall back to RTN (default 16)")
    p.add_argument("--damp", type=float, default=None, help="GPTQ: relative damping of the Hessian (default 0.01)")
    p.add_argument("--act-order", action="store_true", default=None,
                   help="GPTQ: quantize columns by decreasing Hessian diagonal (static groups)")
    mixed = p.add_mutually_exclusive_group()
    mixed.add_argument("--avg-bits", type=float, default=None, metavar="B",
                       help="mixed precision: widths chosen per layer (or expert) so the routed experts average B bits")
    mixed.add_argument("--max-bytes", default=None, metavar="SIZE",
                       help="mixed precision: the whole checkpoint at most SIZE (40GB, 500MiB)")
    p.add_argument("--allocate", default=None, choices=["pmq", "camera"],
                   help="importance of the allocation: camera (micro-expert energy x error; default, measured "
                        "in benchmarks/RESULTS.md 'Pareto') or pmq (frequency x error); both need --calib")
    p.add_argument("--granularity", default=None, choices=["layer", "expert"],
                   help="layer: one width per MoE layer (default; vLLM serves it); expert: a width per expert "
                        "(moeprune loads it; the report gives the predicted loss of lifting to per layer)")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="widths the allocation may use (2 3 4 8)")
    p.add_argument("--no-verify", action="store_true", help="skip the final verification")
    p.add_argument("--verify-dtype", default="float32", help="dtype of the verification (float32, bfloat16, ...)")
    add_apply_flags(p)
    add_calib_flags(p, required=False)
    p.set_defaults(func=run)


def stage(args) -> dict:
    out = {"method": "quantize"}
    for name in OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    if args.asymmetric:
        out["symmetric"] = False
    return out


def run(args) -> int:
    from moeprune import api

    options = {k: v for k, v in stage(args).items() if k != "method"}
    applied, result = api.quantize(args.model, args.out, calib=calib_options(args) if args.calib else None,
                                   lazy=args.lazy, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                   run_verify=not args.no_verify, verify_dtype=args.verify_dtype, **options)
    report = applied.report
    print(f"quantized ({report.get('algorithm')}, bits {report.get('bit_widths')}): "
          f"{report['weight_bytes_before']:,} -> {report['weight_bytes_after']:,} bytes; "
          f"RTN fallbacks: {sum(len(v) for v in (report.get('rtn_fallbacks') or {}).values())}")
    alloc = report.get("allocation")
    if alloc:
        bits = alloc["layer_bits"] if alloc["layer_bits"] is not None else alloc["expert_bits"]
        print(f"allocation ({alloc['budget']}, {alloc['importance']}, per {alloc['granularity']}): bits {bits}, "
              f"average {alloc['average_bits']:.3f}, predicted loss {alloc['predicted_loss']:.6g}, "
              f"{alloc['bytes_written']:,} bytes written; servable by {alloc['servable_by']}")
        if "lift_per_layer" in alloc:
            print(f"lifting to one width per layer would add {alloc['lift_per_layer']['loss_of_lifting']:.6g} to "
                  "the predicted loss")
    return verify_exit(result)
