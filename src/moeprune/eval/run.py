"""`moeprune eval`: checkpoint + held-out text per domain -> perplexity / accuracy table, JSON and samples.

Every check runs before the model is loaded: data sources, options, the JSON output folder, the tokenizer, all
held-out text tokenised into windows. Without `--data`, the testbed's held-out domains are used, but only for the
testbed itself and the models made from it (folders holding its `testbed.json`, which every export copies along;
see `testbed.build.find_testbed`); any other model must name its data with `--data NAME=PATH`.

`generate=True` adds the generative tasks (`eval/gen_tasks.py`, `eval/generative.py`): the items of `generate_tasks`
(a JSONL file, e.g. written by `moeprune gen-tasks`) when given, else items built from every data set named after a
task (arithmetic, records, python: the testbed's held-out files, or `--data` text of the same shape), `gen_items`
per task, seeded. With no item at all, `--generate` is refused before any work.

`steer` (`--steer PLAN.json`, from `moeprune steer`): the plan runs inside the loaded model's routers for every
score and sample (`steer.apply`); it is read and checked against the model's config before the model loads.
`routing` (`--routing POLICY`): a routing policy — a plan JSON (`moeprune.routing/1`) or an export folder holding one —
is installed on the loaded model (`routing/apply.py`) without writing a checkpoint; an export's own
`moeprune_routing` block is applied by `load_model` anyway. Either way the result reports the active experts per
token (average, per layer) and the routed-expert FLOPs on the perplexity windows (the JSON's "routing" entry).
`pack` / `task` / `task_ratio` (`--pack PACK --task auto|NAME --task-ratio R`): the sets are scored by a task
pack's models, built from the kept experts only (`taskpack/evaluate.py`); the choice per set is reported ("task").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from moeprune.calibration.data import CalibConfig, CalibSource, build_sets, read_documents
from moeprune.calibration.run import load_tokenizer
from moeprune.errors import MoePruneError
from moeprune.eval.gen_tasks import DEFAULT_ITEMS, TASKS, build_items, read_items
from moeprune.eval.generate import greedy_samples
from moeprune.eval.generative import GenScore, evaluate_generative
from moeprune.eval.perplexity import DomainScore, evaluate_sets
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.load import load_model, parse_dtype
from moeprune.io.report import write_json_atomic
from moeprune.log import logger
from moeprune.steer.apply import apply_steering
from moeprune.testbed.build import Testbed, find_testbed

DEFAULT_SEQ_LEN = 512


@dataclass(frozen=True)
class EvalOptions:
    data: tuple[str, ...] = ()  # NAME=PATH; empty = the testbed's held-out domains (see `for_model`)
    seq_len: int | None = None  # None = the testbed's training length when it supplies the data, else 512
    max_sequences: int = 256
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    prompts: tuple[str, ...] = ()
    max_new_tokens: int = 32
    tokenizer: str | None = None
    generate: bool = False  # greedy generative tasks next to perplexity
    generate_tasks: str | None = None  # JSONL items (with generate); else items from the data sets named after tasks
    gen_items: int | None = None  # items per task built from data (None: DEFAULT_ITEMS)
    gen_seed: int = 0
    steer: str | None = None  # steering plan (JSON) applied inside the routers (`moeprune steer`; no checkpoint)
    routing: str | None = None  # a routing policy (plan JSON or an export holding one) applied after loading
    pack: str | None = None  # task pack (`moeprune taskpack build`) whose models score the sets
    task: str | None = None  # with pack: "auto" (retrieved per set; the default) or a task name
    task_ratio: float | None = None  # with pack: one of its ratios (default: its first)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise MoePruneError("--batch-size and --max-new-tokens must be >= 1.")
        if not self.generate and (self.generate_tasks is not None or self.gen_items is not None or self.gen_seed):
            raise MoePruneError("--generate-tasks, --gen-items and --gen-seed apply to the generative tasks only; "
                                "add --generate or drop them.")
        if self.generate_tasks is not None and (self.gen_items is not None or self.gen_seed):
            raise MoePruneError("--gen-items and --gen-seed draw items from --data; --generate-tasks gives the items "
                                "itself. Drop one of them.")
        if self.gen_items is not None and self.gen_items < 1:
            raise MoePruneError(f"--gen-items must be >= 1, got {self.gen_items}.")
        if self.seq_len is not None and self.seq_len < 2:
            raise MoePruneError("--seq-len must be >= 2.")
        parse_dtype(self.dtype)
        if self.pack is None and (self.task is not None or self.task_ratio is not None):
            raise MoePruneError("--task and --task-ratio choose a model of a task pack; add --pack PACK.")
        if self.pack is not None and (self.steer is not None or self.routing is not None):
            raise MoePruneError("--steer and --routing act on the full model's expert indices; a task pack's model "
                                "holds other ones. Drop --pack or them.")
        if self.pack is not None and self.task in (None, "auto") and (self.generate or self.prompts):
            raise MoePruneError("--task auto retrieves one model per data set; --generate and --prompt need one "
                                "model: name the task (--task NAME).")

    def pack_request(self):
        """The task-pack request of `pack` / `task` / `task_ratio` (None without a pack)."""
        if self.pack is None:
            return None
        from moeprune.taskpack.evaluate import PackRequest

        return PackRequest(self.pack, self.task or "auto", self.task_ratio)

    def for_model(self, *models: str | Path) -> EvalOptions:
        """Fill the defaults for `models` (one for eval, two for compare): no data -> the held-out domains of the
        testbed they all are or were made from, no seq_len -> its training length (else 512)."""
        if self.data:
            return replace(self, seq_len=self.seq_len or DEFAULT_SEQ_LEN)
        tb = default_testbed(models)
        return replace(self, data=tb.specs("heldout"), seq_len=self.seq_len or tb.seq_len)

    def data_config(self) -> CalibConfig:
        if not self.data or self.seq_len is None:
            raise MoePruneError("internal: EvalOptions.data_config() before for_model() filled the defaults.")
        return CalibConfig(tuple(CalibSource.parse(d, flag="--data") for d in self.data),
                           samples=self.max_sequences, seq_len=self.seq_len, warn_short=False)

    def gen_items_list(self) -> list[dict]:
        """The generative items (after `for_model`): those of `generate_tasks` when given, else built from each
        data set named after a task; [] without `generate`. Refuses `generate` with no item at all."""
        if not self.generate:
            return []
        if self.generate_tasks is not None:
            return read_items(self.generate_tasks)
        items = []
        for spec in self.data_config().sources:
            if spec.name in TASKS:
                docs, _ = read_documents(spec)
                found = build_items(spec.name, "\n\n".join(docs), self.gen_items or DEFAULT_ITEMS, self.gen_seed)
                if not found:
                    logger.warning("--data %s: no %s item in %s (its text does not have the task's shape)",
                                   spec.name, spec.name, spec.path)
                items += found
        if not items:
            names = ", ".join(s.name for s in self.data_config().sources)
            raise MoePruneError(f"--generate: no generative items. Items are built from --data sets named after a "
                                f"task ({', '.join(TASKS)}) whose text has that task's shape (the testbed's held-out "
                                f"files do); the data here are {names}. Name such a set after its task or pass "
                                "--generate-tasks FILE.jsonl (see `moeprune gen-tasks`).")
        return items


def steer_plan(steer: str | None, ckpt: Checkpoint):
    """The steering plan of `--steer` (None without one), read and checked against the model's config before the
    model loads."""
    if steer is None:
        return None
    from moeprune.models import get_adapter
    from moeprune.steer.plan import SteerPlan

    plan = SteerPlan.load(steer)
    plan.check_model(get_adapter(ckpt.config, weight_keys=ckpt.names()))
    return plan


def default_testbed(models: tuple[str | Path, ...]) -> Testbed:
    """The testbed whose held-out text is the default data for `models`: each must be that testbed or made from it
    (its `testbed.json`); otherwise a MoePruneError asks for `--data` (never the cached testbed's text for a model
    that has nothing to do with it)."""
    found = [(Path(m), find_testbed(m)) for m in models]
    for model, tb in found:
        if tb is None:
            raise MoePruneError(f"no evaluation data for {model}: without --data only the moeprune testbed and models "
                                "pruned from it (folders with its testbed.json) have default data. Pass --data "
                                "NAME=PATH (held-out text of the model's domains, repeatable).")
    homes = {str(tb.home) for _, tb in found}
    if len(homes) > 1:
        raise MoePruneError(f"{' and '.join(str(m) for m, _ in found)} come from different testbeds "
                            f"({', '.join(sorted(homes))}); pass --data NAME=PATH so both are scored on the same text.")
    return found[0][1]


@dataclass
class EvalResult:
    scores: dict[str, DomainScore]
    samples: dict[str, str] = field(default_factory=dict)
    generative: dict[str, GenScore] = field(default_factory=dict)
    routing: dict | None = None  # what a routing policy saved (`routing.apply.routing_report`), when one ran
    task: dict | None = None  # task pack: per set, the task whose model scored it (`taskpack/evaluate.py`)

    def to_dict(self) -> dict:
        """{domain: {perplexity, accuracy, tokens[, generate: {primary, items, metric: score}]}}; a task whose
        items came from a file and that has no --data set has only its `generate` entry."""
        out: dict[str, dict] = {name: s.to_dict() for name, s in self.scores.items()}
        for task, g in self.generative.items():
            out.setdefault(task, {})["generate"] = g.to_dict()
        return out

    def format(self) -> str:
        gen = bool(self.generative)
        rows = [f"{'domain':<16} {'perplexity':>11} {'accuracy':>9} {'tokens':>9}" + ("  generative (items)" * gen)]
        for n in list(self.scores) + [t for t in self.generative if t not in self.scores]:
            s, g = self.scores.get(n), self.generative.get(n)
            ppl = f"{s.perplexity:11.3f} {s.accuracy:9.3f} {s.tokens:9d}" if s else f"{'':11} {'':9} {'':9}"
            rows.append(f"{n:<16} {ppl}" + (f"  {g.short()} ({g.items})" if g else "  —" if gen else ""))
        rows += [f"\n> {p!r}\n  {c!r}" for p, c in self.samples.items()]
        if self.routing:
            r = self.routing
            rows.append(f"\nrouting {r['policy']}: {r['active_per_token']:.3f} of {r['selected_per_token']:.3g} "
                        f"experts per token active ({r['computed_per_token']:.3f} computed), routed-expert FLOPs "
                        f"x{r['flops_ratio']:.3f}; per layer: "
                        + ", ".join(f"{k}: {v['active']:.2f}" for k, v in r["layers"].items()))
        if self.task:
            from moeprune.taskpack.evaluate import format_choices

            rows.append(format_choices(self.task))
        return "\n".join(rows)


def evaluate(model: str | Path, opts: EvalOptions, json_out: str | Path | None = None) -> EvalResult:
    out = Path(json_out).expanduser() if json_out is not None else None
    if out is not None and not out.parent.resolve().is_dir():
        raise MoePruneError(f"--json {out}: folder {out.parent} does not exist; create it first.")
    ckpt = Checkpoint.open(model)
    opts = opts.for_model(ckpt.path)
    cfg = opts.data_config()
    tokenizer = load_tokenizer(ckpt.path, opts.tokenizer)
    items = opts.gen_items_list()
    policy = None
    if opts.routing is not None:
        from moeprune.routing.apply import read_routing

        policy = read_routing(opts.routing)  # read and checked before the model loads
    sets = build_sets(cfg, tokenizer)
    plan = steer_plan(opts.steer, ckpt)
    request = opts.pack_request()
    if request is not None:
        request.check(ckpt)  # before any weight is read
        return _finish(_evaluate_pack(request, ckpt, sets, opts, items, tokenizer), out)
    model_obj = load_model(ckpt.path, dtype=opts.dtype, device=opts.device)
    from moeprune.routing.apply import apply_routing, installed, reset_counters, routing_report

    if policy is not None:
        if installed(model_obj) is not None:
            logger.warning("--routing %s replaces the routing policy %s holds in its config.json", opts.routing,
                           ckpt.path)
        apply_routing(model_obj, policy)
    reset_counters(model_obj)
    if plan is not None:
        apply_steering(model_obj, plan)  # for the model's lifetime (it is dropped after this call)
    result = EvalResult(evaluate_sets(model_obj, sets, opts.batch_size))
    if installed(model_obj) is not None:  # counted on the perplexity windows only
        result.routing = routing_report(model_obj)
    _generate(result, model_obj, tokenizer, items, opts)
    return _finish(result, out)


def _evaluate_pack(request, ckpt: Checkpoint, sets, opts: EvalOptions, items, tokenizer) -> EvalResult:
    from moeprune.taskpack.evaluate import score_with_pack

    scores, choices, model_obj = score_with_pack(request, ckpt, sets, opts.dtype, opts.batch_size, opts.device)
    result = EvalResult(scores, task=choices)
    if model_obj is not None:  # one named task (auto with generation is refused up front)
        _generate(result, model_obj, tokenizer, items, opts)
    return result


def _generate(result: EvalResult, model_obj, tokenizer, items, opts: EvalOptions) -> None:
    if items:
        result.generative = evaluate_generative(model_obj, tokenizer, items, opts.batch_size)
    if opts.prompts:
        result.samples = greedy_samples(model_obj, tokenizer, list(opts.prompts), opts.max_new_tokens)


def _finish(result: EvalResult, out: Path | None) -> EvalResult:
    if out is not None:
        extra = {k: v for k, v in (("routing", result.routing), ("task", result.task)) if v}
        write_json_atomic(out, result.to_dict() | extra)
        logger.info("evaluation written to %s", out)
    return result
