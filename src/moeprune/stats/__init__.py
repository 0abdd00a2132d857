"""Statistics collected during calibration (float64 sums, mergeable by addition)."""

from moeprune.stats.routed import FIELDS, RoutedCollector, RoutedStats

__all__ = ["FIELDS", "RoutedCollector", "RoutedStats"]
