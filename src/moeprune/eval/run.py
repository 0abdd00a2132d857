"""`moeprune eval`: checkpoint + held-out text per domain -> perplexity / accuracy table, JSON and samples.

Every check runs before the model is loaded: data sources, options, the JSON output folder, the tokenizer, all
held-out text tokenised into windows. Without `--data`, the testbed's held-out domains are used: the testbed the
model was made from (its `testbed.json` travels with pruned copies), else the cached default testbed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from moeprune.calibration.data import CalibConfig, CalibSource, build_sets
from moeprune.calibration.run import load_tokenizer
from moeprune.errors import MoePruneError
from moeprune.eval.generate import greedy_samples
from moeprune.eval.perplexity import DomainScore, evaluate_sets
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.load import load_model, parse_dtype
from moeprune.io.report import write_json_atomic
from moeprune.log import logger
from moeprune.testbed.build import find_testbed

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

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise MoePruneError("--batch-size and --max-new-tokens must be >= 1.")
        if self.seq_len is not None and self.seq_len < 2:
            raise MoePruneError("--seq-len must be >= 2.")
        parse_dtype(self.dtype)

    def for_model(self, model: str | Path) -> EvalOptions:
        """Fill the defaults for `model`: no data -> the testbed's held-out domains, no seq_len -> its length."""
        if self.data and self.seq_len is not None:
            return self
        tb = find_testbed(model)
        if not self.data and tb is None:
            raise MoePruneError("no evaluation data: pass --data NAME=PATH (held-out text, repeatable), or build the "
                                "testbed (`moeprune testbed build`), whose held-out domains are the default.")
        data = self.data or tb.specs("heldout")
        seq_len = self.seq_len or (tb.seq_len if tb is not None and not self.data else DEFAULT_SEQ_LEN)
        return replace(self, data=data, seq_len=seq_len)

    def data_config(self) -> CalibConfig:
        if not self.data or self.seq_len is None:
            raise MoePruneError("internal: EvalOptions.data_config() before for_model() filled the defaults.")
        return CalibConfig(tuple(CalibSource.parse(d, flag="--data") for d in self.data),
                           samples=self.max_sequences, seq_len=self.seq_len, warn_short=False)


@dataclass
class EvalResult:
    scores: dict[str, DomainScore]
    samples: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {name: s.to_dict() for name, s in self.scores.items()}

    def format(self) -> str:
        rows = [f"{'domain':<16} {'perplexity':>11} {'accuracy':>9} {'tokens':>9}"]
        rows += [f"{n:<16} {s.perplexity:11.3f} {s.accuracy:9.3f} {s.tokens:9d}" for n, s in self.scores.items()]
        rows += [f"\n> {p!r}\n  {c!r}" for p, c in self.samples.items()]
        return "\n".join(rows)


def evaluate(model: str | Path, opts: EvalOptions, json_out: str | Path | None = None) -> EvalResult:
    out = Path(json_out).expanduser() if json_out is not None else None
    if out is not None and not out.parent.resolve().is_dir():
        raise MoePruneError(f"--json {out}: folder {out.parent} does not exist; create it first.")
    ckpt = Checkpoint.open(model)
    opts = opts.for_model(ckpt.path)
    cfg = opts.data_config()
    tokenizer = load_tokenizer(ckpt.path, opts.tokenizer)
    sets = build_sets(cfg, tokenizer)
    model_obj = load_model(ckpt.path, dtype=opts.dtype, device=opts.device)
    result = EvalResult(evaluate_sets(model_obj, sets, opts.batch_size))
    if opts.prompts:
        result.samples = greedy_samples(model_obj, tokenizer, list(opts.prompts), opts.max_new_tokens)
    if out is not None:
        write_json_atomic(out, result.to_dict())
        logger.info("evaluation written to %s", out)
    return result
