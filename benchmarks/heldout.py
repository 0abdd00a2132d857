"""What the testbed benchmarks share (quant.py, repair.py, pareto.py): calibration options, held-out windows,
the original's held-out scores, and the perplexity ratio of a variant against them.

    ratio(domain) = perplexity(variant, domain) / perplexity(original, domain),   geo-mean over the domains

Calibration text (`data/<domain>.calib.txt`, `calib_samples` windows per domain) and held-out text
(`data/<domain>.heldout.txt`, `eval_sequences` windows per domain) are disjoint files of the testbed.
Imported as a sibling module: run the benchmarks as `python benchmarks/NAME.py` (benchmarks/ is then on sys.path).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from moeprune.calibration.data import CalibSet, build_sets
from moeprune.calibration.run import CalibrateOptions, load_tokenizer
from moeprune.eval.perplexity import DomainScore, evaluate_sets
from moeprune.eval.run import EvalOptions
from moeprune.eval.table import ratio_table
from moeprune.io.load import load_model
from moeprune.testbed import Testbed, build_testbed


@dataclass
class HeldOut:
    tb: Testbed
    domains: list[str]
    calib: CalibrateOptions  # the testbed's calibration text (held_out=0: the held-out files are separate)
    held: list[CalibSet]  # held-out windows per domain
    base: dict[str, DomainScore]  # the original's scores on them
    tokenizer: object

    @classmethod
    def build(cls, testbed: str | Path | None, calib_samples: int, eval_sequences: int) -> HeldOut:
        tb = build_testbed(testbed)
        calib = CalibrateOptions(tb.specs("calib"), samples=calib_samples, seq_len=tb.seq_len, held_out=0)
        tok = load_tokenizer(tb.path, None)
        held = build_sets(EvalOptions(max_sequences=eval_sequences).for_model(tb.path).data_config(), tok)
        base = evaluate_sets(load_model(tb.path, dtype="float32"), held)
        return cls(tb, list(tb.data("calib")), calib, held, base, tok)

    def ratios(self, scores: dict[str, DomainScore]) -> tuple[dict[str, float], float]:
        """({domain: ratio}, geo-mean) of a variant's scores against the original's."""
        r = ratio_table(self.base, {"x": scores})["x"]
        return {d: r[d] for d in self.domains}, r["mean"]

    def score(self, folder: str | Path) -> tuple[dict[str, float], float]:
        """Load an export in float32 and score it on the held-out windows: `ratios` of it."""
        return self.ratios(evaluate_sets(load_model(folder, dtype="float32"), self.held))


def results_path(out: str) -> Path:
    """`--out OUT` of a benchmark (it writes OUT.json and OUT.md): its folder must exist (checked before work)."""
    path = Path(out)
    if not path.parent.is_dir():
        sys.exit(f"--out {path}: folder {path.parent} does not exist")
    return path


def save_results(out: Path, result: dict, markdown: str) -> None:
    """OUT.json (every number) and OUT.md (the tables), and the tables on stdout."""
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
