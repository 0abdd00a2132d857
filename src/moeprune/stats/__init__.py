"""Statistics collected during calibration (float64 sums, mergeable by addition) and their file format."""

from moeprune.stats.routed import FIELDS, RoutedCollector, RoutedStats
from moeprune.stats.store import ExpertStats

__all__ = ["FIELDS", "ExpertStats", "RoutedCollector", "RoutedStats"]
