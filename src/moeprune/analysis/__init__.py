"""Routing analysis metrics for MoE layers: local routing consistency (SRP/SCH) and load balance/specialisation.

Pure functions on routing traces (top-k expert indices [T, k]) or routing counts; no model is loaded here.
"""

from moeprune.analysis.balance import (
    DomainSpecificity,
    UsageEntropy,
    coactivation_counts,
    coactivation_lift,
    coefficient_of_variation,
    domain_specificity,
    usage_entropy,
)
from moeprune.analysis.lrc import LRCScores, sch, sch_curve, segment_counts, srp, srp_per_expert, srp_sch_baseline

__all__ = [
    "DomainSpecificity",
    "LRCScores",
    "UsageEntropy",
    "coactivation_counts",
    "coactivation_lift",
    "coefficient_of_variation",
    "domain_specificity",
    "sch",
    "sch_curve",
    "segment_counts",
    "srp",
    "srp_per_expert",
    "srp_sch_baseline",
    "usage_entropy",
]
