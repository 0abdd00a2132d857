"""Which experts' masking can change a token's route: the tokens NAEE's incremental scoring reroutes per child.

For a local router (`RoutingSpec.local_masking`) masking expert j changes token t's route only when t selects j,
so the child D ∪ {j} reroutes {t : j ∈ S_D(t)}. A group limit scored by top-2 sums (`RoutingSpec.group_reach`:
sigmoid_grouped with topk_group < n_group, DeepSeek-V3/R1) adds the tokens for which j is one of the top-2 of a
kept group: with g(j) ∈ K_D(t) and j ∈ T2_D(t, g(j)), masking j lowers a kept group's score, so another group may
take its place. Otherwise the group scores that decide, the kept groups and the selected experts' own scores stay.
So token t is rerouted for the children of

    R_D(t) = S_D(t) ∪ ⋃_{g ∈ K_D(t)} T2_D(t, g)        (at most k + 2·topk_group experts)

K_D and T2_D are read from the router's own call under D (`GroupChoices`: the indices of its `topk` over the group
scores [N, G] and over each group's scores [N, G, E/G]), not recomputed. Router rows per beam parent: T·(1 + |R|)
instead of T·E' (at E = 256, k = 8, 4 of 8 groups: ≤ 16 per token against ≈ 200 children).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class GroupChoices(TorchFunctionMode):
    """During one router call on `rows` rows: `top2` [rows, G, 2] (each group's top-2, indices within the group)
    and `kept` [rows, topk_group] (the kept groups), from the outputs of the router's own `topk` calls of those
    shapes; None where no such call was seen."""

    def __init__(self, rows: int, n_group: int, topk_group: int):
        super().__init__()
        self.rows, self.n_group, self.topk_group = rows, n_group, topk_group
        self.top2: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") != "topk" or not isinstance(out, tuple) or len(out) != 2:
            return out
        ind = out[1]
        G = self.n_group
        if ind.dim() == 3 and tuple(ind.shape) == (self.rows, G, 2):
            self.top2 = ind
        elif ind.dim() == 2 and tuple(ind.shape) == (self.rows, self.topk_group) and args[0].shape[-1] == G:
            self.kept = ind
        return out

    @property
    def seen(self) -> bool:
        return self.top2 is not None and self.kept is not None


def reach(idx: torch.Tensor, choices: GroupChoices | None, num_experts: int) -> torch.Tensor:
    """idx [c, k] selected experts under D -> [c, m] the experts R_D(t) (module docstring) whose masking can change
    each token's route, −1 for repeats: idx itself without group choices; with them (their first c rows), idx
    followed by the top-2 of each kept group (global indices)."""
    if choices is None:
        return idx
    c = idx.shape[0]
    size = num_experts // choices.n_group  # experts per group
    kept = choices.kept[:c].long()  # [c, K]
    top2 = choices.top2[:c].long().gather(1, kept[..., None].expand(-1, -1, 2))  # [c, K, 2] within the group
    groups = (kept[..., None] * size + top2).reshape(c, -1)  # [c, 2K] global indices
    every = torch.cat([idx, groups], 1).sort(1).values  # [c, k + 2K]
    every[:, 1:][every[:, 1:] == every[:, :-1]] = -1  # a repeat counts once
    return every
