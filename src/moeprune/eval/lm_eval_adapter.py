"""`moeprune lm-eval`: score a model with EleutherAI lm-evaluation-harness tasks (optional extra `moeprune[eval]`).

`run_lm_eval(model, tasks, ...)` takes either an in-memory `transformers` model (plus its tokenizer) or a local
checkpoint folder, wraps it in lm-eval's `HFLM` and runs `lm_eval.simple_evaluate`. The result is compacted to
`{task: {metric: value}}`: lm-eval's `,none` filter suffix is stripped (other filters stay as `metric/filter`),
standard errors keep their `<metric>_stderr` names and the `alias` entry is dropped; lm-eval's full output stays
available as `.raw` on the returned dict.

Local tasks come from `include_path` (a folder of lm-eval task YAMLs). Everything runs offline: `HF_HUB_OFFLINE`
and `HF_DATASETS_OFFLINE` are set (and the already-imported `huggingface_hub` / `datasets` switches flipped) for
the duration of the call and restored afterwards, so hub tasks only work when their datasets are already cached.
All cheap checks (task names, include path, checkpoint folder, tokenizer, dtype) run before a model is loaded.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from moeprune.calibration.run import load_tokenizer
from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.load import load_model, parse_dtype
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.steer.apply import steering
from moeprune.steer.plan import as_plan

INSTALL_HINT = "pip install 'moeprune[eval]'"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class LmEvalResults(dict):
    """`{task: {metric: value}}`; `.raw` holds lm-eval's full `simple_evaluate` output (configs, versions,
    sample counts, and per-sample records under `raw["samples"]` when `log_samples=True`)."""

    raw: dict

    def __init__(self, metrics: dict[str, dict[str, float | None]], raw: dict) -> None:
        super().__init__(metrics)
        self.raw = raw

    def format(self) -> str:
        rows = [(task, metric, value) for task, metrics in self.items() for metric, value in metrics.items()]
        width = max([len("task")] + [len(t) for t, _, _ in rows])
        mwidth = max([len("metric")] + [len(m) for _, m, _ in rows])
        lines = [f"{'task':<{width}} {'metric':<{mwidth}} {'value':>10}"]
        for task, metric, value in rows:
            shown = "n/a" if value is None else f"{value:10.4f}"
            lines.append(f"{task:<{width}} {metric:<{mwidth}} {shown:>10}")
        return "\n".join(lines)


def compact_results(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """lm-eval's `results` block -> `{task: {metric: value}}`.

    `"acc,none"` -> `"acc"`, `"acc_stderr,none"` -> `"acc_stderr"`, `"exact_match,strict-match"` ->
    `"exact_match/strict-match"`; `alias` and other non-metric entries are dropped; a non-numeric value
    (lm-eval writes "N/A" for an undefined standard error) becomes None."""
    out: dict[str, dict[str, float | None]] = {}
    for task, entries in results.items():
        metrics: dict[str, float | None] = {}
        for key, value in entries.items():
            if "," not in key:  # alias, sample_len and other bookkeeping
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}/{filt}"
            if isinstance(value, bool) or not isinstance(value, int | float):
                metrics[name] = None
            else:
                metrics[name] = None if math.isnan(value) else float(value)
        out[task] = metrics
    return out


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hub and datasets offline for the duration; every switch restored afterwards.

    The environment variables cover modules imported inside the block; `huggingface_hub` and `datasets` read
    them once at import, so their module-level switches are flipped too when they are already imported."""
    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    switches = [("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                ("datasets.config", "HF_DATASETS_OFFLINE")]
    saved_mod = [(m, a, getattr(sys.modules[m], a)) for m, a in switches
                 if m in sys.modules and hasattr(sys.modules[m], a)]
    for k in OFFLINE_ENV:
        os.environ[k] = "1"
    for m, a, _ in saved_mod:
        setattr(sys.modules[m], a, True)
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for m, a, v in saved_mod:
            setattr(sys.modules[m], a, v)


def _check_tasks(tasks: Sequence[str] | str) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",")]
    names = [t.strip() for t in tasks]
    if not names or any(not t for t in names):
        raise MoePruneError("no lm-eval tasks: pass at least one task name (e.g. --tasks hellaswag,arc_easy), "
                            "without empty entries.")
    return names


def _check_include_path(include_path: str | Path | None) -> Path | None:
    if include_path is None:
        return None
    path = Path(include_path).expanduser()
    if not path.is_dir():
        raise MoePruneError(f"--include-path {path} is not an existing folder; pass the folder that holds your "
                            "lm-eval task YAML files.")
    return path.resolve()


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise MoePruneError(f"lm-evaluation-harness is not installed ({e}); install it with: {INSTALL_HINT}") from e
    return lm_eval, HFLM, TaskManager


def _check_task_names(task_manager, names: list[str], include_path: Path | None) -> None:
    known = set(task_manager.all_tasks)
    unknown = [t for t in names if t not in known]
    if not unknown:
        return
    hints = []
    for t in unknown:
        close = difflib.get_close_matches(t, known, n=3)
        hints.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    where = f"lm-eval's built-in tasks or {include_path}" if include_path else "lm-eval's built-in tasks"
    raise MoePruneError(f"unknown lm-eval task(s) {', '.join(hints)}: not found in {where}. Pass the folder of "
                        "your task YAMLs with --include-path.")


def run_lm_eval(model, tasks: Sequence[str] | str, *, tokenizer=None, include_path: str | Path | None = None,
                num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 8,
                device: str = "cpu", dtype: str = "float32", include_defaults: bool = True,
                log_samples: bool = False, steer=None, routing: str | Path | None = None) -> LmEvalResults:
    """Evaluate `model` on lm-eval `tasks`; returns `{task: {metric: value}}` (see `compact_results`).

    model: an in-memory `transformers` model (then `tokenizer`, a tokenizer object or folder, is required; the
        model is used as it is: `device` and `dtype` do not move or cast it) or a local checkpoint folder (loaded
        with stock transformers in `dtype` on `device`; the tokenizer from `tokenizer` or else the folder).
    tasks: task names (or one comma-separated string), built-in or defined by YAMLs under `include_path`.
    include_defaults: index lm-eval's built-in tasks too (~6 s); False looks only in `include_path`.
    num_fewshot, limit, batch_size, log_samples: passed to `lm_eval.simple_evaluate` (limit: docs per task,
        or a fraction when < 1; log_samples keeps per-sample records in `.raw["samples"]`).
    steer: a steering plan (SteerPlan, file or dict; `moeprune steer`) applied inside the routers for the run
        (an in-memory model gets its routers back afterwards).
    routing: a routing policy (plan JSON or an export holding one) installed on the model first (`routing/`).
    Note: `simple_evaluate` reseeds Python's, numpy's and torch's global random generators.
    """
    names = _check_tasks(tasks)
    inc = _check_include_path(include_path)
    policy = None
    if routing is not None:
        from moeprune.routing.apply import read_routing

        policy = read_routing(routing)
    if not include_defaults and inc is None:
        raise MoePruneError("include_defaults=False needs an include_path holding the task YAMLs.")
    if batch_size < 1:
        raise MoePruneError(f"batch size must be >= 1, got {batch_size}.")
    if num_fewshot is not None and num_fewshot < 0:
        raise MoePruneError(f"num_fewshot must be >= 0, got {num_fewshot}.")
    if limit is not None and limit <= 0:
        raise MoePruneError(f"limit must be > 0, got {limit}.")

    in_memory = not isinstance(model, str | Path)
    ckpt_path: Path | None = None
    if in_memory:
        if not hasattr(model, "config") or not callable(model):
            raise MoePruneError(f"model must be a checkpoint folder or a transformers model, "
                                f"got {type(model).__name__}.")
        if tokenizer is None:
            raise MoePruneError("an in-memory model needs its tokenizer: pass tokenizer=<tokenizer or folder>.")
    else:
        parse_dtype(dtype)
        ckpt_path = Checkpoint.open(model).path
    plan = None if steer is None else as_plan(steer)  # read and validated before any work
    if plan is not None and ckpt_path is not None:
        ckpt = Checkpoint.open(ckpt_path)
        plan.check_model(get_adapter(ckpt.config, weight_keys=ckpt.names()))
    if tokenizer is None or isinstance(tokenizer, str | Path):  # a folder; None: the checkpoint's own
        tok = load_tokenizer(ckpt_path or Path(tokenizer), None if tokenizer is None else str(tokenizer))
    else:
        tok = tokenizer

    with offline():
        lm_eval, HFLM, TaskManager = _import_lm_eval()
        task_manager = TaskManager(include_path=str(inc) if inc else None, include_defaults=include_defaults)
        _check_task_names(task_manager, names, inc)
        if in_memory:
            model_obj = model
        else:
            logger.info("loading %s (%s on %s)", ckpt_path, dtype, device)
            model_obj = load_model(ckpt_path, dtype=dtype, device=device)
        if policy is not None:
            from moeprune.routing.apply import apply_routing

            apply_routing(model_obj, policy)
        lm = HFLM(pretrained=model_obj, tokenizer=tok, batch_size=batch_size, device=device)
        logger.info("lm-eval %s: %s", getattr(lm_eval, "__version__", "?"), ", ".join(names))
        try:
            with steering(model_obj, plan) if plan is not None else contextlib.nullcontext():
                raw = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=task_manager,
                                              num_fewshot=num_fewshot, limit=limit, log_samples=log_samples)
        except ConnectionError as e:  # datasets / huggingface_hub offline refusals subclass it
            raise MoePruneError(f"a task dataset is not available offline ({e}); moeprune runs lm-eval without the "
                                "hub: use tasks whose data are local files or already in the datasets cache.") from e
        except FileNotFoundError as e:
            raise MoePruneError(f"a task data file is missing ({e}); relative `data_files` in a task YAML resolve "
                                f"against the working directory ({Path.cwd()}), so prefer absolute paths.") from e
    if raw is None:  # non-zero rank of a distributed run
        return LmEvalResults({}, {})
    return LmEvalResults(compact_results(raw.get("results", {})), dict(raw))
