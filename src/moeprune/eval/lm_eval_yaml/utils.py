"""lm-eval hook of the moeprune generative tasks: the same scorers as `moeprune eval --generate`."""

from moeprune.eval.scorers import score


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval calls this per document with its (filtered) generations; the first is the greedy completion."""
    return score(doc["domain"], doc["prompt"], results[0])
