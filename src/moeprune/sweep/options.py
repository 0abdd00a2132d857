"""What `moeprune sweep` needs besides the model and its calibration options, validated before any work, and the
held-out text of every task.

Held-out text of task d (never a calibration window):
- `--heldout d=PATH`: every window of PATH in order, up to `heldout_sequences` (`eval.run.EvalOptions`' windows);
- else d's calibration split: the `--held-out N` windows its calibration draw kept apart (`calibration.data`).
Refused when a task has neither (no --heldout and --held-out 0, or a source too small to hold windows apart), when a
--heldout file is its task's calibration file, and when any held-out window equals one of the task's calibration
windows token for token — all before the model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeprune.analysis.probe import CLIFF, PROBE_TOKENS, check_ratios
from moeprune.calibration.data import CalibSet, CalibSource, build_sets
from moeprune.calibration.run import CalibrateOptions
from moeprune.errors import MoePruneError
from moeprune.eval.run import EvalOptions
from moeprune.pipeline.quality import held_apart
from moeprune.sweep.knee import TOLERANCE, check_tolerance

HELDOUT_SEQUENCES = 64  # windows per --heldout file (in order)


@dataclass(frozen=True)
class SweepOptions:
    ratios: tuple[float, ...]
    criterion: str = "tcess"
    heldout: tuple[str, ...] = ()  # NAME=PATH per task (else the calibration split)
    heldout_sequences: int = HELDOUT_SEQUENCES
    tolerance: float = TOLERANCE  # the knee's allowed held-out perplexity increase
    cliff: float = CLIFF  # a layer's reconstruction-error cliff
    probe_tokens: int | None = PROBE_TOKENS  # real tokens per task and layer for the block error; 0/None: all

    def __post_init__(self) -> None:
        from moeprune.criteria import CRITERIA

        object.__setattr__(self, "ratios", tuple(check_ratios(self.ratios)[0]))
        crit = CRITERIA.get(self.criterion)  # did-you-mean error for unknown names
        if crit.needs != "calibration":
            raise MoePruneError(f"--criterion {self.criterion!r} is {crit.needs}-based: it gives every task the same "
                                "plan. The sweep plans each task from its own calibration statistics; choose a "
                                "calibrated criterion (e.g. tcess, tcess_top1, reap, ean_sum, easy_ep).")
        check_tolerance(self.tolerance)
        if not 0.0 < float(self.cliff) < 1.0:
            raise MoePruneError(f"--cliff {self.cliff}: the cliff is a relative output error strictly between 0 and 1 "
                                "(default 0.1).")
        if isinstance(self.heldout_sequences, bool) or self.heldout_sequences < 1:
            raise MoePruneError(f"--heldout-sequences must be >= 1, got {self.heldout_sequences!r}.")
        p = self.probe_tokens
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 0):
            raise MoePruneError(f"--probe-tokens {p!r}: give a number of tokens >= 1, or 0 for every token.")

    def heldout_sources(self, calib: CalibrateOptions) -> dict[str, CalibSource]:
        """{task: held-out file}; checks that every task has held-out text (module docstring)."""
        tasks = {s.name: s for s in calib.calib_config().sources}
        given = {}
        for spec in self.heldout:
            src = CalibSource.parse(spec, flag="--heldout")
            if src.name in given:
                raise MoePruneError(f"--heldout {src.name} is given twice; one held-out source per task.")
            if src.name not in tasks:
                raise MoePruneError(f"--heldout {src.name}: no --calib set of that name; tasks are {sorted(tasks)}.")
            if src.path.resolve() == tasks[src.name].path.resolve():
                raise MoePruneError(f"--heldout {src.name}={src.path} is the task's calibration text; give text "
                                    "disjoint from it, or leave --heldout out to use the calibration split "
                                    "(--held-out N windows kept apart).")
            given[src.name] = src
        missing = [name for name in tasks if name not in given]
        if missing and calib.held_out < 1:
            raise MoePruneError(f"no held-out text for {missing}: give --heldout NAME=PATH for each, or keep "
                                "calibration windows apart with --held-out N (N >= 1).")
        if not missing and calib.held_out:
            raise MoePruneError("--held-out keeps calibration windows apart for tasks without --heldout; every task "
                                "has a --heldout file. Drop --held-out.")
        return given


def heldout_sets(opts: SweepOptions, calib: CalibrateOptions, sets: list[CalibSet], tokenizer) -> list[CalibSet]:
    """Held-out windows per task (order of `sets`), checked disjoint from that task's calibration windows."""
    files = opts.heldout_sources(calib)
    from_files = {}
    if files:
        cfg = EvalOptions(tuple(f"{s.name}={s.path}" for s in files.values()), seq_len=calib.seq_len,
                          max_sequences=opts.heldout_sequences).data_config()
        from_files = {s.name: s for s in build_sets(cfg, tokenizer)}
    split = {s.name: s for s in held_apart([s for s in sets if s.name not in files])}
    out = []
    for s in sets:
        held = from_files.get(s.name) or split.get(s.name)
        if held is None or not held.tokens:
            raise MoePruneError(f"calibration set {s.name!r} kept no window apart (its text holds only the "
                                f"{s.input_ids.shape[0]} windows calibration draws); give --heldout {s.name}=PATH or "
                                "lower --samples.")
        overlap = shared_windows(s, held)
        if overlap:
            raise MoePruneError(f"{overlap} held-out window(s) of {s.name!r} equal calibration windows token for "
                                f"token; give held-out text disjoint from {s.source}.")
        out.append(held)
    return out


def shared_windows(calib: CalibSet, held: CalibSet) -> int:
    """Held-out windows whose real tokens equal one calibration window's real tokens."""
    def rows(s: CalibSet) -> list[tuple[int, ...]]:
        return [tuple(ids[m.bool()].tolist()) for ids, m in zip(s.input_ids, s.attention_mask, strict=True)]

    seen = set(rows(calib))
    return sum(r in seen for r in rows(held))

