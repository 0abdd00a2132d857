"""Evaluation: per-domain perplexity and next-token accuracy on held-out text, greedy generation samples."""

from moeprune.eval.perplexity import DomainScore, evaluate_sets

__all__ = ["DomainScore", "evaluate_sets"]
