"""Expert scoring criteria (pure functions), registered by name. Importing registers them all."""

from moeprune.criteria import data_free, routed  # noqa: F401  (registration)
from moeprune.criteria.base import CRITERIA, Criterion, criterion

__all__ = ["CRITERIA", "Criterion", "criterion"]
