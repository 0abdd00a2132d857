"""`moeprune budget MODEL STATS --bytes X | --ratio-of-original R`: the best few recipes at one size, predicted from
the statistics (expert removal × neuron removal × bit widths; see quant/search.py for the prediction)."""

from __future__ import annotations

import argparse

from moeprune.cli.common import add_calib_flags, add_verb, calib_options


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of integers, got {text!r}") from None


def add_parser(sub) -> None:
    from moeprune.quant.budget import EXPERT_RATIOS, NEURON_RATIOS

    p = add_verb(sub, "budget", "recipes of least predicted loss at a size (expert removal x neurons x bits)",
                 "moeprune budget ./model stats.safetensors --ratio-of-original 0.3")
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("stats", help="statistics file of this model (`moeprune calibrate`)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--bytes", help="size of the whole checkpoint, e.g. 40GB or 500MiB (1GB = 10^9 bytes)")
    size.add_argument("--ratio-of-original", type=float, metavar="R", help="size as a fraction of the original")
    p.add_argument("--importance", default="pmq",
                   help="loss model: pmq (frequency x quantization error; the statistics file suffices) or camera "
                        "(micro-expert energy x error; needs --calib)")
    p.add_argument("--criterion", default="frequency", help="expert removal criterion of the recipes")
    p.add_argument("--neuron-method", default="camera", help="neuron removal method of the recipes")
    p.add_argument("--widths", type=_ints, default=(2, 3, 4, 8),
                   help="quantized bit widths allowed (recipes without quantization are always searched too)")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size (input columns)")
    p.add_argument("--asymmetric", action="store_true", help="quantize with zero points")
    p.add_argument("--granularity", default="layer",
                   help="layer: one width per MoE layer (vLLM serves it); expert: a width per expert")
    p.add_argument("--expert-ratios", type=_floats, default=EXPERT_RATIOS, help="expert removal ratios searched")
    p.add_argument("--neuron-ratios", type=_floats, default=NEURON_RATIOS, help="neuron removal ratios searched")
    p.add_argument("--top", type=int, default=3, help="recipes printed")
    p.add_argument("--rho", type=float, default=0.9, help="camera: weight of the peak term")
    p.add_argument("--calib-set", action="append", help="use only these sets of the statistics (repeatable)")
    p.add_argument("--measure", type=int, default=0, metavar="N",
                   help="run the top N recipes for real (into a temporary folder, needs --calib) and print their "
                        "held-out perplexity next to the prediction")
    g = p.add_argument_group("evaluation (--measure)")
    g.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="held-out text, repeatable (default: the testbed's held-out domains)")
    g.add_argument("--eval-seq-len", type=int, default=None, help="evaluation window length")
    g.add_argument("--eval-max-sequences", type=int, default=256, help="evaluation windows per domain")
    add_calib_flags(p, required=False)
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from moeprune.io.sizes import parse_size
    from moeprune.quant.budget import BudgetOptions, budget

    target = parse_size(args.bytes, "--bytes") if args.bytes is not None else None
    opts = BudgetOptions(bytes=target, ratio_of_original=args.ratio_of_original, importance=args.importance,
                         criterion=args.criterion, neuron_method=args.neuron_method, widths=tuple(args.widths),
                         group_size=args.group_size, symmetric=not args.asymmetric, granularity=args.granularity,
                         expert_ratios=tuple(args.expert_ratios), neuron_ratios=tuple(args.neuron_ratios),
                         top=args.top, rho=args.rho, calib_set=tuple(args.calib_set) if args.calib_set else None,
                         measure=args.measure)
    calib = calib_options(args) if args.calib else None
    if args.measure:
        from moeprune.eval.run import EvalOptions
        from moeprune.quant.measure import check_measure

        check_measure(args.measure, calib)
        eval_opts = EvalOptions(tuple(args.data), seq_len=args.eval_seq_len, max_sequences=args.eval_max_sequences,
                                batch_size=args.batch_size, device=args.device).for_model(args.model)
    from moeprune.quant.importance import IMPORTANCE

    neurons = IMPORTANCE.get(opts.importance).needs == "neurons"  # pmq: the statistics file suffices
    result = budget(args.model, args.stats, opts, calib=calib if neurons else None)
    print(f"# budget: {result.target:,} bytes = {result.target / result.original:.3f} of the original "
          f"({result.original:,}); predicted loss = share of the importance lost by removing every routed expert")
    for n, (cand, recipe) in enumerate(zip(result.candidates, result.recipes(), strict=True), 1):
        print(f"\n# recipe {n}: predicted loss {cand.loss:.5f} (experts removed {cand.removal:.5f}, neurons "
              f"{cand.neurons:.5f}, quantization {cand.quant:.5f}); {cand.bytes:,} bytes = "
              f"{cand.bytes / result.original:.3f} of the original; {_bits(cand)}")
        print(yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None).rstrip())
    if args.measure:
        _measure(args.model, result, args.measure, calib, eval_opts)
    return 0


def _measure(model, result, n: int, calib, eval_opts) -> None:
    from moeprune.quant.measure import measure

    cands = result.candidates[:n]
    original, rows = measure(model, result.recipes()[:n], [(c.loss, c.bytes) for c in cands], calib, eval_opts)
    domains = list(original)
    print(f"\n# measured (held-out perplexity; original {', '.join(f'{d} {original[d]:.6f}' for d in domains)})")
    print(f"{'recipe':>6} {'predicted loss':>15} {'measured ratio':>15} {'bytes predicted':>16} {'bytes written':>14}  "
          + "  ".join(f"ppl {d}" for d in domains))
    for k, m in enumerate(rows, 1):
        print(f"{k:>6} {m.predicted_loss:15.5f} {m.ratio:15.5f} {m.predicted_bytes:16,} {m.bytes_written:14,}  "
              + "  ".join(f"{m.perplexity[d]:.6f}" for d in domains))


def _bits(cand) -> str:
    """Average width over the kept experts (all alike in size), or 'unquantized'."""
    from moeprune.quant.sizes import STORED

    bits = [b for bs in cand.allocation.bits.values() for b in bs]
    if all(b >= STORED for b in bits):
        return "experts unquantized"
    return f"average bits {sum(bits) / max(1, len(bits)):.2f}"
