"""CLI pieces shared by the verb modules: help formatting, flag groups, option builders, exit codes.

Every verb module defines `add_parser(sub)` (flags, help, one example) and a `run(args) -> int`; library code
never sees an argparse Namespace: the builders here turn flags into typed options and recipe stages.
"""

from __future__ import annotations

import argparse

from moeprune.errors import MoePruneError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default and keeps the examples' line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in text or "default" in text:
            return text
        return super()._get_help_string(action)


def add_verb(sub, name: str, help: str, example: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser with the shared formatter and an `example:` epilog."""
    return sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter,
                          epilog=f"example:\n  {example}")


def ratio_type(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratio must be a number like 0.25, got {text!r}") from None


def calib_options(args):
    from moeprune.calibration.run import CalibrateOptions

    return CalibrateOptions(tuple(args.calib), samples=args.samples, seq_len=args.seq_len, seed=args.calib_seed,
                            text_field=args.text_field, chat_template=args.chat_template, tokenizer=args.tokenizer,
                            batch_size=args.batch_size, device=args.device, dtype=args.dtype, lazy=args.lazy,
                            probe_stride=args.probe_stride, held_out=args.held_out)


def verify_exit(result) -> int:
    """Exit status of a verification (None: not run): 0 pass, 1 fail; the result line goes to stdout once."""
    if result is None:
        return 0
    print(result.line())
    return 0 if result.passed else 1


def check_new_file(path: str | None, overwrite: bool) -> None:
    """Refuse to write a file over an existing one without --overwrite (checked before any work)."""
    if path is not None:
        from moeprune.io.atomic import check_output_file

        check_output_file(path, None, overwrite)


def add_apply_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (written atomically; never the input)")
    p.add_argument("--streaming", action="store_true",
                   help="edit the safetensors shards directly, without loading the model (expert removal only; "
                        "for models larger than memory)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest output shard, e.g. 5GB or 500MB (1KB = 1000 bytes), counted in tensor bytes as "
                        "transformers does: each file adds its small safetensors header")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is empty or an earlier moeprune output")


def add_lazy_flag(p) -> None:
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=None,
                   help="--lazy: one decoder layer in memory at a time (read from disk); --no-lazy: load the model "
                        "whole; default: layer by layer only when the model does not fit in available memory")


def add_calib_run_flags(g) -> None:
    """How calibration text becomes sequences and runs (shared by every verb that calibrates)."""
    g.add_argument("--samples", type=int, default=128, help="sequences per calibration set")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    g.add_argument("--calib-seed", type=int, default=0, help="seed of the sequence sampling")
    g.add_argument("--text-field", default="text", help="field of .jsonl records that holds the text")
    g.add_argument("--chat-template", action="store_true", help="render .jsonl 'messages' with the chat template")
    g.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    g.add_argument("--device", default="cpu", help="where each decoder layer runs (cpu, cuda, cuda:1)")
    g.add_argument("--dtype", default="auto",
                   help="calibration dtype: float32, bfloat16, float16, stored (the checkpoint's), or auto (the "
                   "checkpoint's, but float32 on a CPU without native bf16 matmul, where it is ~5x faster)")


def add_calib_flags(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", action="append", default=[], metavar="NAME=PATH",
                   help="calibration text, repeatable (one per domain): .txt, a folder of .txt, or .jsonl"
                   + ("" if required else "; needed by calibrated methods"))
    add_calib_run_flags(g)
    add_lazy_flag(g)
    g.add_argument("--probe-stride", type=int, default=None, metavar="N",
                   help="record every expert's output on 1 real token in N, for merge grouping "
                        "(default ceil(8E/k): an eighth of the routed expert work)")
    g.add_argument("--held-out", type=int, default=8, metavar="N",
                   help="windows per calibration set kept apart from scoring; `prune` reports the perplexity "
                        "change on them (0: no quality figure)")


# flag dest -> recipe option; None defaults mean "not given", so options a method does not take are refused
STAGE_FLAGS = ("seed", "policy", "floor", "protect", "protect_super", "as_you_go", "calib_set", "budget", "min_width",
               "rho", "merge", "router", "rank", "threshold", "recombine", "beam", "search_tokens", "auto_naee",
               "judge_folds", "nll_candidates", "k", "p", "target_active", "k_min", "k_max", "scope", "steps", "lr",
               "sparsity", "pattern", "owl", "owl_m", "owl_lambda", "mix", "keep")
TRISTATE = ("auto_naee",)  # flags whose False is a given value (--no-auto-naee), not "not given"


def add_stage_flags(p: argparse.ArgumentParser, prune: bool) -> None:
    """Options of every stage kind; each is refused when the chosen method's stage does not take it."""
    methods = _method_list()
    p.add_argument("--method", help=f"method: {methods}" + (" (default with --calib: auto, which judges the "
                                                            "calibrated criteria and NAEE on the calibration text; "
                                                            "or give a --recipe)" if prune else ""))
    p.add_argument("--ratio", type=ratio_type,
                   help="fraction removed: of the routed experts per layer (expert removal and merging), or of the "
                        "routed-expert parameters (neuron methods heapr, camera)")
    p.add_argument("--seed", type=int, help="random criterion only: its seed (default 0)")
    p.add_argument("--calib-set", action="append", help="calibrated methods: use only these calibration sets "
                                                        "(repeatable)")
    g = p.add_argument_group("expert removal (criteria)")
    g.add_argument("--policy", help="selection policy: uniform (default), per_group, global"
                   + (", reconstruction (NAEE; needs --calib)" if prune else ""))
    g.add_argument("--floor", type=int, help="global policy: fewest experts any layer keeps")
    g.add_argument("--protect", action="append", metavar="LAYER:E[,E]",
                   help="experts that are never dropped, repeatable (e.g. --protect 3:5,7)")
    g.add_argument("--mix", type=float,
                   help="stun: weight in [0, 1] of the router-logit distance against co-selection in its clustering "
                        "(default 1: router distance only; 0: co-selection only)")
    g.add_argument("--keep", choices=["usage", "centroid"],
                   help="stun: the member a cluster keeps: the most used (default) or the one nearest the cluster's "
                        "weight centroid (STUN's code)")
    g.add_argument("--protect-super", action="store_true",
                   help="never drop super experts (max |f| above max(99.5th pct, max/10); needs statistics)")
    if prune:
        g.add_argument("--as-you-go", action="store_true",
                       help="prune each layer during calibration, before the next layer is calibrated")
        g.add_argument("--beam", type=int, help="naee: beam width of the search above the exhaustive size (default "
                                                "4; 1 = greedy); costs about (b+1)·n_drop·E router evaluations")
        g.add_argument("--search-tokens", type=int, metavar="N",
                       help="naee: real tokens its search keeps per layer, evenly strided (default 2048; 0 = every "
                            "token); the search costs tokens x evaluations")
        g = p.add_argument_group("method auto (chooses among the calibrated criteria and NAEE; needs --calib)")
        g.add_argument("--auto-naee", action=argparse.BooleanOptionalAction, default=None,
                       help="--auto-naee: NAEE is always a candidate; --no-auto-naee: never; default: when its "
                            "search is affordable")
        g.add_argument("--judge-folds", type=int, metavar="K",
                       help="folds of the judge (default 4): each candidate is scored without a fold and judged "
                            "on it, so no judged window fed the statistics; the export is scored on every window")
        g.add_argument("--nll-candidates", type=int, metavar="N",
                       help="measure the masked model's NLL for only the N candidates of lowest block error "
                            "(default: every candidate; fewer whole-model forwards on large models)")
    g = p.add_argument_group("neuron removal (heapr, camera; needs --calib) and merge budgets")
    g.add_argument("--budget", help="neurons: expert (default; uniform width, stock-loadable), layer or global "
                                    "(non-uniform widths: load the export with moeprune.load_model); merges: "
                                    "uniform (default) or global (M-SMoE adaptive counts, lifted to one count)")
    g.add_argument("--min-width", type=int, help="neurons every expert keeps at least (default 1)")
    g.add_argument("--rho", type=float, help="CAMERA-P: weight of the peak term (default 0.9)")
    if prune:
        g.add_argument("--expert-method", help="first remove experts with this criterion ...")
        g.add_argument("--expert-ratio", type=ratio_type, help="... at this ratio, then neurons inside the survivors")
    g = p.add_argument_group("routing policies (topk, top_p, naee_skip, otp: fewer experts per token at run time; no "
                             "--ratio; docs/routing.md)")
    g.add_argument("--k", type=int, help="topk: experts per token (a stock config change)")
    g.add_argument("--p", type=float, help="top_p: probability mass kept within the model's top-k, e.g. 0.7")
    g.add_argument("--target-active", type=float, metavar="A",
                   help="top_p, naee_skip, otp: calibrate the threshold (p, a scale on NAEE's β, the selectors' "
                        "shift) so that A experts per token are active on average on --calib text")
    g.add_argument("--k-min", type=int, help="top_p: fewest experts per token (default 1)")
    g.add_argument("--k-max", type=int, help="top_p: most experts per token (default: the model's k)")
    g.add_argument("--scope", choices=["global", "per_layer"],
                   help="with --target-active: one threshold per layer (per_layer, default: every layer averages "
                        "A; measured better on the testbed) or one for the whole model (global)")
    g.add_argument("--steps", type=int, help="otp: optimiser steps training the selectors (default 200)")
    g.add_argument("--lr", type=float, help="otp: AdamW learning rate of the selectors (default 1e-2)")
    g = p.add_argument_group("sparsity inside the routed experts (wanda; needs --calib; no --ratio)")
    g.add_argument("--sparsity", type=float, help="wanda: fraction of the routed-expert weights zeroed (default 0.5)")
    g.add_argument("--pattern", choices=["unstructured", "2:4"],
                   help="wanda: per-row unstructured (default) or 2 of every 4 consecutive inputs kept")
    g.add_argument("--owl", action="store_true", default=None,
                   help="wanda: OWL per-layer sparsities (layers with more outlier scores keep more weights)")
    g.add_argument("--owl-m", type=float, help="OWL: an outlier is a score above M × the layer mean (default 5)")
    g.add_argument("--owl-lambda", type=float, help="OWL: the layer sparsities span 2λ around --sparsity (0.08)")
    g = p.add_argument_group("expert merging (msmoe, hcsmoe, submoe, dern; statistics with probes)")
    g.add_argument("--merge", choices=["average", "svd", "dern"],
                   help="how a group becomes one expert (default: the method's own: msmoe/hcsmoe average, "
                        "submoe svd, dern dern)")
    g.add_argument("--router", choices=["dominant", "weighted"],
                   help="router row of a merged expert: the dominant's row (default), or the usage-weighted mean")
    g.add_argument("--rank", type=int, help="svd merge: shared singular directions kept per role (default: full)")
    g.add_argument("--threshold", type=cosine_or_auto,
                   help="dern: least cosine for a dropped neuron to be recombined into a survivor, or auto "
                        "(default: chosen per layer from the weights so that --recombine of them are)")
    g.add_argument("--recombine", type=float, metavar="FRACTION",
                   help="dern with --threshold auto: fraction of the dropped experts' neuron segments recombined "
                        "(default 0: measured best on the testbed, i.e. plain pruning of the dropped experts)")


def cosine_or_auto(text: str) -> float | str:
    """--threshold: 'auto' or a number."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a cosine (e.g. 0.2) nor 'auto'") from None


def add_distill_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation from the original (a distill stage after the others; needs --calib)")
    g.add_argument("--distill-steps", type=int, metavar="N", help="append a distill stage of N optimizer steps")
    g.add_argument("--distill-lr", type=float, help="its AdamW learning rate (default 1e-4)")
    g.add_argument("--distill-train", action="append", choices=["routers", "experts", "lora"],
                   help="what it trains, repeatable (default: experts and routers)")
    g.add_argument("--distill-checkpoint-dir", metavar="DIR",
                   help="resumable training state: written there every 50 steps, resumed from when present")


def distill_options(args) -> dict | None:
    """The appended distill stage's options (None: no --distill-steps); other --distill-* flags need it."""
    given = {k: getattr(args, f"distill_{k}", None) for k in ("lr", "train", "checkpoint_dir")}
    given = {k: v for k, v in given.items() if v is not None}
    if getattr(args, "distill_steps", None) is None:
        if given:
            raise MoePruneError(f"{', '.join('--distill-' + k.replace('_', '-') for k in given)} set up a distill "
                                "stage: give its length with --distill-steps N.")
        return None
    return {"steps": args.distill_steps, **given}


def stage_options(args) -> dict:
    """The stage options the user gave on the command line (flags left at None/False/[] are not given)."""
    out = {}
    for name in STAGE_FLAGS:
        value = getattr(args, name, None)
        if value is None or (value is False and name not in TRISTATE) or value == []:
            continue
        out[name] = list(value) if isinstance(value, list) else value
    return out


def _method_list() -> str:
    from moeprune.stages import STAGES

    return "; ".join(f"{kind}: {', '.join(stage.methods())}" for kind, stage in STAGES.items())


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="held-out text, repeatable (one per domain): .txt, a folder of .txt, or .jsonl "
                        "(required, except for the testbed and exports made from it)")
    g.add_argument("--seq-len", type=int, default=None, help="window length (default: the testbed's, else 512)")
    g.add_argument("--max-sequences", type=int, default=256, help="windows per domain (in order, no sampling)")
    g.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    g.add_argument("--dtype", default="float32", help="evaluation dtype")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--prompt", action="append", default=[], help="greedy generation sample, repeatable")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per --prompt")
    g.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    g.add_argument("--generate", action="store_true",
                   help="also run the generative tasks (greedy, exact checks; docs/generation.md): items from the "
                        "--data sets named arithmetic, records or python (the testbed's held-out files by default)")
    g.add_argument("--generate-tasks", metavar="FILE.jsonl",
                   help="with --generate: the items {domain, prompt, ...} of this file instead of items built from "
                        "--data (see `moeprune gen-tasks`)")
    g.add_argument("--gen-items", type=int, default=None, help="with --generate: items per task built from --data "
                                                               "(default 64)")
    g.add_argument("--gen-seed", type=int, default=0, help="with --generate: seed of the item draw")
    g.add_argument("--steer", metavar="PLAN.json",
                   help="apply a steering plan from `moeprune steer` inside the routers (no checkpoint is written); "
                        "with compare: to the second model only")
    g.add_argument("--routing", metavar="POLICY",
                   help="apply a routing policy without writing a checkpoint: a routing plan JSON (a "
                        "moeprune_plans/N-routing.json) or an export folder holding one; reports the active experts "
                        "per token and routed-expert FLOPs (docs/routing.md)")
    t = p.add_argument_group("task pack (`moeprune taskpack build`; MODEL must be the pack's checkpoint; with "
                             "compare: the second model only)")
    t.add_argument("--pack", metavar="PACK", help="score with the pack's models: only a task's kept experts are read")
    t.add_argument("--task", metavar="auto|NAME", help="with --pack: a task of the pack, or auto (default): each data "
                   "set is scored by the model its first window retrieves (the full model below the pack's margin)")
    t.add_argument("--task-ratio", type=float, metavar="R",
                   help="with --pack: one of the pack's ratios (share of experts removed; default: the task's "
                        "recommended one, else the pack's first)")


def eval_options(args):
    from moeprune.eval.run import EvalOptions

    return EvalOptions(tuple(args.data), seq_len=args.seq_len, max_sequences=args.max_sequences,
                       batch_size=args.batch_size, dtype=args.dtype, device=args.device, prompts=tuple(args.prompt),
                       max_new_tokens=args.max_new_tokens, tokenizer=args.tokenizer, generate=args.generate,
                       generate_tasks=args.generate_tasks, gen_items=args.gen_items, gen_seed=args.gen_seed,
                       steer=args.steer, routing=args.routing, pack=args.pack, task=args.task,
                       task_ratio=args.task_ratio)
