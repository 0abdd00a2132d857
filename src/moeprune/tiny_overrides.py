"""Per-family corrections to the generic tiny shrink of `moeprune.tiny_families` (what a generic rule cannot
know), and the families that cannot be built tiny here, with the reason."""

from __future__ import annotations

TINY_OVERRIDES: dict[str, dict] = {}

NOT_BUILDABLE: dict[str, str] = {}
