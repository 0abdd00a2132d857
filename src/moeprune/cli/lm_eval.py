"""`moeprune lm-eval MODEL --tasks T`: lm-evaluation-harness tasks on a checkpoint (needs moeprune[eval])."""

from __future__ import annotations

from pathlib import Path

from moeprune.cli.common import add_verb
from moeprune.errors import MoePruneError
from moeprune.log import logger


def add_parser(sub) -> None:
    p = add_verb(sub, "lm-eval", "lm-evaluation-harness tasks on a checkpoint (needs moeprune[eval])",
                 "moeprune lm-eval ./pruned --tasks mytask --include-path tasks/ --limit 50 --json lm.json")
    p.add_argument("model", help="checkpoint folder (with its tokenizer)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--no-builtin-tasks", action="store_true",
                   help="look tasks up only in --include-path (skips indexing lm-eval's built-in tasks)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--limit", type=float, help="documents per task (a fraction when < 1); for quick checks")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--dtype", default="float32", help="model dtype")
    p.add_argument("--json", help="write {task: {metric: value}} here")
    p.add_argument("--steer", metavar="PLAN.json", help="apply a steering plan from `moeprune steer` inside the "
                                                        "routers (no checkpoint is written)")
    p.add_argument("--routing", metavar="POLICY",
                   help="apply a routing policy first: a routing plan JSON or an export folder holding one")
    p.set_defaults(func=run)


def run(args) -> int:
    from moeprune.eval.lm_eval_adapter import run_lm_eval
    from moeprune.io.report import write_json_atomic

    out = Path(args.json).expanduser() if args.json else None
    if out is not None and not out.parent.resolve().is_dir():
        raise MoePruneError(f"--json {out}: folder {out.parent} does not exist; create it first.")
    result = run_lm_eval(args.model, args.tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                         limit=args.limit, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                         include_defaults=not args.no_builtin_tasks, steer=args.steer,
                         routing=args.routing)
    print(result.format())
    if out is not None:
        write_json_atomic(out, dict(result))
        logger.info("lm-eval results written to %s", out)
    return 0
