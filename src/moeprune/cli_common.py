"""CLI pieces shared by the subcommand modules: argument types, flag groups, option builders, exit codes."""

from __future__ import annotations

import argparse


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratio must be a number like 0.25, got {text!r}") from None


def _calib_options(args):
    from moeprune.calibration.run import CalibrateOptions

    return CalibrateOptions(tuple(args.calib), samples=args.samples, seq_len=args.seq_len, seed=args.calib_seed,
                            text_field=args.text_field, chat_template=args.chat_template, tokenizer=args.tokenizer,
                            batch_size=args.batch_size, device=args.device, dtype=args.dtype, lazy=args.lazy,
                            probe_stride=args.probe_stride)


def _verify_exit(result) -> int:
    if result is None:
        return 0
    print(f"max abs logit difference: {result.max_abs_diff:.3e} (relative {result.relative:.3e}, "
          f"tolerance {result.tolerance:.1e} x max |logit| {result.max_abs_logit:.3g}) -> "
          f"{'PASS' if result.passed else 'FAIL'}")
    return 0 if result.passed else 1


def _add_apply_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (written atomically; never the input)")
    p.add_argument("--streaming", action="store_true",
                   help="edit the safetensors shards directly, without loading the model (for models > RAM)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _add_calib_flags(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", action="append", default=[], metavar="NAME=PATH",
                   help="calibration text, repeatable (one per domain): .txt, a folder of .txt, or .jsonl"
                   + ("" if required else "; needed by calibrated methods"))
    g.add_argument("--samples", type=int, default=128, help="sequences per calibration set")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    g.add_argument("--calib-seed", type=int, default=0, help="seed of the sequence sampling")
    g.add_argument("--text-field", default="text", help="field of .jsonl records that holds the text")
    g.add_argument("--chat-template", action="store_true", help="render .jsonl 'messages' with the chat template")
    g.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    g.add_argument("--device", default="cpu", help="where each decoder layer runs (cpu, cuda, cuda:1)")
    g.add_argument("--dtype", default="auto", help="calibration dtype (auto = the checkpoint's)")
    g.add_argument("--lazy", action="store_true",
                   help="load one decoder layer at a time from disk (models larger than host memory)")
    g.add_argument("--probe-stride", type=int, default=None, metavar="N",
                   help="record every expert's output on 1 real token in N, for merge grouping "
                        "(default ceil(8E/k): an eighth of the routed expert work)")


def _add_select_flags(p: argparse.ArgumentParser, progressive: bool) -> None:
    g = p.add_argument_group("selection")
    policies = "uniform (default), per_group, global"
    if progressive:
        policies += ", reconstruction (NAEE; needs --calib)"
    g.add_argument("--policy", default="uniform", help=f"selection policy: {policies}")
    g.add_argument("--floor", type=int, help="global policy: fewest experts any layer keeps")
    g.add_argument("--protect", action="append", default=[], metavar="LAYER:E[,E]",
                   help="experts that are never dropped, repeatable (e.g. --protect 3:5,7)")
    g.add_argument("--protect-super", action="store_true",
                   help="never drop super experts (max |f| above max(99.5th pct, max/10); needs statistics)")
    if progressive:
        g.add_argument("--as-you-go", action="store_true",
                       help="prune each layer during calibration, before the next layer is calibrated")


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="held-out text, repeatable (one per domain): .txt, a folder of .txt, or .jsonl "
                        "(default: the testbed's held-out domains)")
    g.add_argument("--seq-len", type=int, default=None, help="window length (default: the testbed's, else 512)")
    g.add_argument("--max-sequences", type=int, default=256, help="windows per domain (in order, no sampling)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--dtype", default="float32")
    g.add_argument("--device", default="cpu")
    g.add_argument("--prompt", action="append", default=[], help="greedy generation sample, repeatable")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
