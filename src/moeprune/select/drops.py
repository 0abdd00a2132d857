"""What a candidate of `method: auto` drops, as the judge (`pipeline/judge.py`) and the choice (`select/auto.py`)
both pass it around."""

from __future__ import annotations

Drops = dict[int, list[int]]  # MoE layer -> dropped experts (original indices)
PerSet = dict[str, Drops]  # fold-set -> dropped experts there
