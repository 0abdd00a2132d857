"""Calibration text for the tests: seeded random words (no file, download or model needed)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def write_words(path: Path, n: int = 2500, vocab: int = 10, seed: int = 0) -> Path:
    """`n` words drawn uniformly from the first `vocab` of WORDS, space-separated, written to `path`."""
    g = torch.Generator().manual_seed(seed)
    path.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, vocab, (n,), generator=g)))
    return path
