"""`moeprune analyze`: routing analysis before pruning, from a checkpoint + calibration text or a statistics file."""

from __future__ import annotations

from moeprune.cli.common import add_calib_flags, add_verb, calib_options
from moeprune.errors import MoePruneError
from moeprune.log import logger


def _numbers(text: str, flag: str, kind: type) -> list:
    """'0.1,0.25 0.5' -> [0.1, 0.25, 0.5]; a clear error for anything else."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        values = [kind(p) for p in parts]
    except ValueError:
        example = "0.1,0.25,0.5,0.75" if kind is float else "4,16,64,256"
        raise MoePruneError(f"{flag} {text!r}: give comma-separated {kind.__name__}s, e.g. {flag} {example}.") from None
    if not values:
        raise MoePruneError(f"{flag} is empty; give comma-separated values or leave the flag out.")
    return values


OFFLOAD_FLAGS = {"cache_sizes": "--cache-sizes", "bandwidth": "--bandwidth", "flops": "--flops",
                 "prefetch": "--prefetch", "heldout": "--heldout", "static_quality": "--static-quality",
                 "quality_target": "--quality-target"}


def offload_options(args):
    """--offload and its options -> OffloadOptions (None without --offload; its options alone are refused)."""
    from moeprune.calibration.data import CalibSource
    from moeprune.offload.options import DEFAULT_SIZES, OffloadOptions, parse_quality

    given = [flag for key, flag in OFFLOAD_FLAGS.items() if getattr(args, key) not in (None, [])]
    if not args.offload:
        if given:
            raise MoePruneError(f"{', '.join(given)} set{'s' * (len(given) == 1)} the offloading simulation; add "
                                "--offload (or drop them).")
        return None
    if args.stats:
        raise MoePruneError("--offload simulates a cache on per-token routing traces, which a statistics file does "
                            "not hold; run `moeprune analyze MODEL --calib NAME=PATH ... --offload`.")
    sizes = DEFAULT_SIZES if args.cache_sizes is None else tuple(args.cache_sizes.replace(",", " ").split())
    kw = {k: v for k, v in (("bandwidth", args.bandwidth), ("tflops", args.flops), ("prefetch", args.prefetch),
                            ("quality_target", args.quality_target)) if v is not None}
    heldout = tuple(args.heldout or ())
    for spec in heldout:
        CalibSource.parse(spec, "--heldout")
    return OffloadOptions(cache_sizes=sizes, heldout=heldout, static_quality=parse_quality(args.static_quality),
                          **kw)


def run(args) -> int:
    from moeprune.analysis.probe import PROBE_TOKENS
    from moeprune.analysis.run import analyze, analyze_stats

    ratios = _numbers(args.ratios, "--ratios", float)
    lengths = _numbers(args.lengths, "--lengths", int)
    criteria = args.criteria.replace(",", " ").split() if args.criteria else None
    offload = offload_options(args)
    if args.stats and args.model:
        raise MoePruneError("pass either MODEL with --calib NAME=PATH (full analysis) or --stats FILE (what a "
                            "statistics file supports), not both.")
    if args.stats:
        if args.calib:
            raise MoePruneError("--stats analyses a statistics file; --calib needs MODEL instead. Drop one of them.")
        if args.probe_tokens is not None:
            raise MoePruneError("--probe-tokens sets the measured probe, which needs MODEL with --calib; a "
                                "statistics file has no block inputs to probe. Drop --probe-tokens.")
        result = analyze_stats(args.stats, args.out, ratios=ratios, criteria=criteria, overwrite=args.overwrite,
                               results=args.results)
    else:
        if not args.model:
            raise MoePruneError("nothing to analyze: pass MODEL --calib NAME=PATH ... or --stats FILE.")
        if not args.calib:
            raise MoePruneError("no calibration data: pass at least one --calib NAME=PATH (one per domain), or "
                                "analyze a statistics file with --stats FILE.")
        result = analyze(args.model, calib_options(args), args.out, ratios=ratios, lengths=lengths,
                         criteria=criteria, cliff_threshold=args.cliff, overwrite=args.overwrite,
                         results=args.results,
                         probe_tokens=PROBE_TOKENS if args.probe_tokens is None else args.probe_tokens,
                         offload=offload)
    for para in result.sections()["sections"][0]["paragraphs"]:
        print(para)
    logger.info("open %s/report.html (or report.json / analysis.json)", result.out_dir)
    return 0


def add_parser(sub) -> None:
    p = add_verb(sub, "analyze", "routing analysis before pruning: usage, balance, specialisation, redundancy "
                                 "probe, local routing consistency (HTML/JSON/PNG report)",
                 "moeprune analyze ./model --calib web=web.txt --calib code=code.jsonl --out ./analysis\n"
                 "  moeprune analyze ./model --calib web=web.txt --out ./analysis --offload --heldout web=test.txt "
                 "--cache-sizes k,2k,4k --bandwidth 25 --flops 100 --static-quality 0.25=1.05,0.5=1.9")
    p.add_argument("model", nargs="?", help="checkpoint folder (with --calib); leave out with --stats")
    p.add_argument("--stats", metavar="FILE", help="analyze a statistics file from `moeprune calibrate` instead "
                                                   "(no measured probe, no local routing consistency)")
    p.add_argument("--out", required=True, help="output folder (written atomically; never inside the model)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--ratios", default="0.1,0.25,0.5,0.75", help="fractions of experts dropped by the probe and "
                                                                  "the criteria agreement (comma-separated)")
    p.add_argument("--lengths", default="4,16,64,256", help="segment lengths L of SRP/SCH (comma-separated)")
    p.add_argument("--criteria", help="criteria in the agreement matrix (comma-separated; default: every "
                                      "calibrated criterion and the random control)")
    p.add_argument("--probe-tokens", type=int, metavar="N",
                   help="real tokens per domain and layer the measured probe uses (an evenly strided subset; "
                        "default 1024, 0 = every token): each probed ratio costs one MoE-block forward over them")
    p.add_argument("--cliff", type=float, default=0.1,
                   help="measured relative output error that marks a layer's cliff (default 0.1)")
    p.add_argument("--results", action="append", default=[], metavar="DIR|PLAN",
                   help="add the outcome of a `moeprune compare --out` folder, a pruned/merged checkpoint folder or a "
                        "steering plan file (`moeprune steer --out`) to the report (repeatable)")
    o = p.add_argument_group("offloading simulation (ExpertFlow): an m-expert cache per MoE layer instead of pruning")
    o.add_argument("--offload", action="store_true",
                   help="simulate expert offloading on the routing traces (LRU, LFU, predictive prefetch, Belady): "
                        "hit rate, bytes moved and time per token per cache size, and a verdict against static "
                        "pruning, as an 'Offloading' section of the report")
    o.add_argument("--cache-sizes", metavar="LIST", help="experts resident per MoE layer: integers or multiples of "
                                                         "top-k (default k,2k,4k)")
    o.add_argument("--bandwidth", type=float, metavar="GB/S", help="host-to-device link bandwidth (default 25)")
    o.add_argument("--flops", type=float, metavar="TFLOP/S", help="device compute rate (default 100)")
    o.add_argument("--prefetch", type=int, metavar="N", help="experts the predictor prefetches per token and layer "
                                                            "(default top-k)")
    o.add_argument("--heldout", action="append", metavar="NAME=PATH",
                   help="text the cache is simulated on (the predictor trains on --calib); repeatable; default: "
                        "odd-numbered calibration sequences (even-numbered ones train)")
    o.add_argument("--static-quality", metavar="R=PPL,...",
                   help="held-out perplexity ratio of static pruning per ratio, e.g. 0.25=1.05,0.5=1.9 (from "
                        "`moeprune eval` / `compare`), for the verdict")
    o.add_argument("--quality-target", type=float, metavar="PPL_RATIO",
                   help="perplexity ratio the deployment accepts, for the verdict (default 1.05)")
    add_calib_flags(p, required=False)
    p.set_defaults(func=run)

