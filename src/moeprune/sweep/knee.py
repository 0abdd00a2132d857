"""UNCURL's threshold factor: the ratio above which a task's quality falls, from a swept quality curve.

Curve of a task: swept ratios 0 < r_1 < … < r_n (fraction of routed experts dropped per layer) and the held-out
perplexity ratio q_i = ppl(pruned at r_i) / ppl(original), with the original as the point (r_0, q_0) = (0, 1).

    knee      r* = the first crossing of the tolerance line q = 1 + tol by the piecewise-linear curve:
                   i = min{i ≥ 1 : q_i > 1 + tol},
                   r* = r_{i-1} + (1 + tol − q_{i-1}) / (q_i − q_{i-1}) · (r_i − r_{i-1})      (q_{i-1} ≤ 1 + tol < q_i)
                   None when no swept q exceeds 1 + tol (the task holds over the whole sweep: `holds`).
    recommend = the largest swept ratio ≤ r* (the knee rounded down to a swept ratio) = r_{i-1}; None when that is
                r_0 = 0 (even r_1 costs more than tol: prune this task less than the sweep reaches); r_n when the
                task holds over the whole sweep.
    elbow     = the swept ratio of maximum curvature of y = log q on the grid (r_0..r_n):
                κ_i = 2·[(y_{i+1} − y_i)/(r_{i+1} − r_i) − (y_i − y_{i−1})/(r_i − r_{i−1})] / (r_{i+1} − r_{i−1}),
                elbow = r_i of the largest κ_i > 0 (1 ≤ i < n); None with fewer than two swept ratios or no
                positive κ. A shape figure reported next to the knee; the recommendation follows the tolerance rule.

The first crossing counts even when a later ratio dips back under the line (held-out noise); the rule is
conservative. Per layer, the reconstruction-error cliff is `analysis.probe.cliff`: the first swept ratio whose
measured block error exceeds its threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from moeprune.analysis.probe import check_ratios
from moeprune.errors import MoePruneError

TOLERANCE = 0.05  # default tol: 5 % more held-out perplexity than the original


@dataclass(frozen=True)
class Knee:
    knee: float | None  # r*; None when the task holds over the whole sweep
    recommend: float | None  # largest swept ratio ≤ r* (None: not even the smallest swept ratio)
    elbow: float | None
    holds: bool  # no swept ratio exceeded 1 + tol

    def to_dict(self) -> dict:
        return {"knee": self.knee, "recommend": self.recommend, "elbow": self.elbow, "holds": self.holds}


def check_tolerance(tol: float) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 < float(tol) < 10.0:
        raise MoePruneError(f"--tolerance {tol!r}: give the allowed held-out perplexity increase as a fraction "
                            "above 0 (e.g. 0.05 for 5 %).")
    return float(tol)


def knee(ratios: Sequence[float], quality: Sequence[float], tol: float = TOLERANCE) -> Knee:
    """The knee, recommendation and elbow of one curve (module docstring); `ratios` ascending in (0, 1)."""
    r = [0.0, *map(float, ratios)]
    q = [1.0, *map(float, quality)]
    if len(r) != len(q) or len(r) < 2:
        raise MoePruneError(f"a quality curve needs one value per swept ratio; got {len(ratios)} ratios and "
                            f"{len(quality)} values.")
    if any(b <= a for a, b in zip(r[:-1], r[1:], strict=True)) or not all(math.isfinite(v) and v > 0 for v in q):
        raise MoePruneError("a quality curve needs ascending ratios in (0, 1) and finite positive perplexity ratios.")
    line = 1.0 + check_tolerance(tol)
    first = next((i for i in range(1, len(q)) if q[i] > line), None)
    if first is None:
        return Knee(None, r[-1], elbow(r, q), True)
    a, b = first - 1, first
    cross = r[a] + (line - q[a]) / (q[b] - q[a]) * (r[b] - r[a])
    return Knee(cross, r[a] if a > 0 else None, elbow(r, q), False)


def elbow(r: Sequence[float], q: Sequence[float]) -> float | None:
    """Swept ratio of maximum positive curvature of log q over (r_0 = 0, r_1..r_n) (module docstring)."""
    y = [math.log(v) for v in q]
    best, where = 0.0, None
    for i in range(1, len(r) - 1):
        right = (y[i + 1] - y[i]) / (r[i + 1] - r[i])
        left = (y[i] - y[i - 1]) / (r[i] - r[i - 1])
        k = 2.0 * (right - left) / (r[i + 1] - r[i - 1])
        if k > best:
            best, where = k, r[i]
    return where


def parse_ratios(text: str, step: float | None = None) -> list[float]:
    """'0.1..0.9' (with `step`, default 0.1) or '0.1,0.2,0.5' -> ascending ratios (rounded to 10 decimals)."""
    text = text.strip()
    if ".." in text:
        lo_text, _, hi_text = text.partition("..")
        step = 0.1 if step is None else step
        try:
            lo, hi = float(lo_text), float(hi_text)
        except ValueError:
            raise MoePruneError(f"--ratios {text!r}: write a range as LOW..HIGH, e.g. --ratios 0.1..0.9 "
                                "--step 0.1.") from None
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
            raise MoePruneError(f"--step {step!r}: give a positive step, e.g. --step 0.1.")
        if hi < lo:
            raise MoePruneError(f"--ratios {text!r}: the range must go upwards (LOW..HIGH).")
        n = int(math.floor((hi - lo) / step + 1e-9)) + 1
        values = [round(lo + i * step, 10) for i in range(n)]
    else:
        if step is not None:
            raise MoePruneError("--step applies to a range (--ratios 0.1..0.9); a list of ratios has no step. "
                                "Drop --step or write the ratios as a range.")
        try:
            values = [float(p) for p in text.replace(",", " ").split()]
        except ValueError:
            raise MoePruneError(f"--ratios {text!r}: give a range like 0.1..0.9 or comma-separated fractions like "
                                "0.1,0.25,0.5.") from None
    return check_ratios(values)[0]  # sorted, distinct, each in (0, 1)
