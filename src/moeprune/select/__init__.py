"""Selection: turn scores into a `PrunePlan` under a policy."""

from moeprune.select.plan import PrunePlan
from moeprune.select.uniform import drop_count, select_uniform

__all__ = ["PrunePlan", "drop_count", "select_uniform"]
