"""Criterion registry. A criterion is a pure function from per-layer inputs to one score per expert [E].

`higher_keeps` says which way the score points (True: high score = keep). `needs` says what the function
consumes: "weights" (a `WeightSummary` of one layer), "none" (only E and a seed), or "calibration"
(`RoutedStats` of one layer from the calibration engine).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeprune.registry import Registry


@dataclass(frozen=True)
class Criterion:
    name: str
    fn: Callable[..., torch.Tensor]
    higher_keeps: bool
    needs: str
    reference: str = ""

    @property
    def summary(self) -> str:
        doc = (self.fn.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


CRITERIA: Registry[Criterion] = Registry("method", hint="See `moeprune plan --help` for the list.")


def criterion(name: str, *, higher_keeps: bool, needs: str, reference: str = ""):
    """Decorator registering a scoring function as a named criterion."""

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        CRITERIA.register(name, Criterion(name, fn, higher_keeps, needs, reference))
        return fn

    return wrap
