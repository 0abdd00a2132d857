"""Neuron alignment of experts before merging: weight matching (MC-SMoE / Git Re-Basin).

An expert is a dict role -> tensor in the canonical orientation of `models/layouts.py` `roles()`:

    gate [I, H], up [I, H], down [H, I]   (required)
    gate_bias [I], up_bias [I], down_bias [H]   (optional)

Neuron k is row k of gate and up (entry k of gate_bias / up_bias) and column k of down; the expert computes
y = Σ_k down[:, k] · act(gate_k·x + gate_bias_k) · (up_k·x + up_bias_k) + down_bias. The sum runs over neurons
in no particular order, so relabelling the neurons (a permutation π: new neuron k = old neuron π(k)) never changes
the function, while an element-wise average of two experts is only meaningful once their neurons correspond.

Weight matching picks, for a reference expert R and another expert O, the permutation π maximising

    Σ_k sim(R_k, O_{π(k)}),   sim(a, b) = <gate_a, gate_b> + <up_a, up_b> + <down[:, a], down[:, b]>
                                          (+ gate_bias_a·gate_bias_b + up_bias_a·up_bias_b when present)

i.e. a linear assignment problem on the [I, I] score matrix S = F_R F_Oᵀ, where F [I, 2H + H (+2)] stacks each
neuron's gate row, up row, down column (and bias entries). S is computed in float32 (float64 for float64 experts:
`match_dtype`) and the assignment solved exactly on it (Hungarian / Jonker-Volgenant,
`scipy.optimize.linear_sum_assignment(maximize=True)`). `down_bias` belongs to no neuron and is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moeprune.errors import MoePruneError
from moeprune.merge.align_memo import MEMO, expert_digest

REQUIRED_ROLES = ("gate", "up", "down")
BIAS_ROLES = ("gate_bias", "up_bias", "down_bias")
ROLES = REQUIRED_ROLES + BIAS_ROLES
# roles whose dim 0 is the neuron index (down is [H, I]: neurons on dim 1; down_bias [H] has none)
NEURON_ROWS = ("gate", "up", "gate_bias", "up_bias")
UNSET = object()  # `permutation_to`'s reference_digest when the caller has not computed it


def expert_dims(expert: Mapping[str, torch.Tensor], what: str = "expert") -> tuple[int, int]:
    """Check one expert dict (roles, ranks, shapes) and return (I, H). Raises MoePruneError on bad input."""
    if not isinstance(expert, Mapping):
        raise MoePruneError(f"{what} must be a dict role -> tensor, got {type(expert).__name__}.")
    missing = [r for r in REQUIRED_ROLES if r not in expert]
    unknown = sorted(set(expert) - set(ROLES))
    if missing or unknown:
        raise MoePruneError(f"{what}: roles must be gate, up, down (+ optional {', '.join(BIAS_ROLES)}); "
                            f"missing {missing}, unknown {unknown}.")
    for role, t in expert.items():
        if not isinstance(t, torch.Tensor):
            raise MoePruneError(f"{what}: role {role!r} is a {type(t).__name__}, not a tensor.")
        if not t.is_floating_point():
            raise MoePruneError(f"{what}: role {role!r} has dtype {t.dtype}; expert weights must be floating point.")
    gate = expert["gate"]
    if gate.dim() != 2:
        raise MoePruneError(f"{what}: gate must be 2-D [I, H], got shape {tuple(gate.shape)}.")
    inter, hidden = gate.shape
    expected = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter),
                "gate_bias": (inter,), "up_bias": (inter,), "down_bias": (hidden,)}
    for role, t in expert.items():
        if tuple(t.shape) != expected[role]:
            raise MoePruneError(f"{what}: {role} has shape {tuple(t.shape)}, expected {expected[role]} "
                                f"(canonical gate/up [I, H], down [H, I] with I={inter}, H={hidden}).")
    if inter == 0 or hidden == 0:
        raise MoePruneError(f"{what}: empty expert (I={inter}, H={hidden}).")
    return inter, hidden


def check_group(experts: list[Mapping[str, torch.Tensor]]) -> tuple[int, int]:
    """Check a merge group: non-empty, every member a valid expert with the same roles, shapes and dtypes.
    Returns (I, H)."""
    if not isinstance(experts, (list, tuple)) or len(experts) == 0:
        raise MoePruneError("a merge group needs at least one expert (got an empty group).")
    dims = expert_dims(experts[0], "expert 0")
    roles0 = set(experts[0])
    for i, e in enumerate(experts[1:], start=1):
        d = expert_dims(e, f"expert {i}")
        if set(e) != roles0:
            raise MoePruneError(f"expert {i} has roles {sorted(e)} but expert 0 has {sorted(roles0)}; "
                                "all members of a merge group must have the same roles.")
        if d != dims:
            raise MoePruneError(f"expert {i} has (I, H) = {d} but expert 0 has {dims}; "
                                "all members of a merge group must have the same shapes.")
        for role in roles0:
            if e[role].dtype != experts[0][role].dtype:
                raise MoePruneError(f"expert {i}: {role} is {e[role].dtype} but expert 0's is "
                                    f"{experts[0][role].dtype}; cast the group to one dtype first.")
    return dims


FEATURE_ROLES = ("gate", "up", "down", "gate_bias", "up_bias")  # what `neuron_features` reads, in its order


def neuron_features(expert: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[I, 3H (+1 per gate/up bias)] CPU, in `dtype`: per neuron its gate row, up row, down column, bias entries.
    Each part is converted straight into its columns (no float64 copies to concatenate: 2-2.7x faster at I=448,
    H=1024, and the same values)."""
    parts = [expert["gate"], expert["up"], expert["down"].t()]  # [I, H] each
    parts += [expert[b].unsqueeze(1) for b in ("gate_bias", "up_bias") if b in expert]  # [I, 1]
    out = torch.empty(parts[0].shape[0], sum(p.shape[1] for p in parts), dtype=dtype)  # [I, 3H (+2)]
    at = 0
    for p in parts:
        out[:, at:at + p.shape[1]].copy_(p.detach())
        at += p.shape[1]
    return out


def match_dtype(expert: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype the scores are computed in: float64 for float64 experts, else float32. The features of bf16 /
    fp16 / fp32 weights are exact in float32 and only the sums of 3H products round; a float64 matmul costs twice
    as much (28.6 vs 13.7 ms for [448, 3072] x [3072, 448], one thread: two thirds of a pair's alignment). On 12
    bf16 pairs of 448 x 1 024 experts, unrelated or noisy permuted copies, both gave the same permutation every
    time."""
    return torch.float64 if any(t.dtype == torch.float64 for t in expert.values()) else torch.float32


def similarity(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The weight-matching score matrix S [I, I] (`match_dtype`): S[k, l] = sim(reference neuron k, other neuron l)."""
    check_group([reference, other])
    dtype = match_dtype(reference)
    return neuron_features(reference, dtype) @ neuron_features(other, dtype).t()  # [I, I]


def permutation_to(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                   reference_features: torch.Tensor | None = None, reference_digest: bytes | None | object = UNSET
                   ) -> torch.Tensor:
    """π (LongTensor [I]) maximising Σ_k sim(reference_k, other_{π(k)}); `permute(other, π)` is aligned to reference.

    `other` neuron π(k) is matched to `reference` neuron k. If other = permute(reference, σ), then π = σ⁻¹ and
    permute(other, π) == reference exactly (up to ties between identical neurons). `reference_features` /
    `reference_digest`: the reference's `neuron_features` / `expert_digest`, when the caller aligns several experts
    to it (built once instead of per call).
    A pair aligned before in this process is not solved again (`merge/align_memo.py`: keyed by both experts' bytes).
    """
    from scipy.optimize import linear_sum_assignment  # imported here: scipy would cost every CLI start-up ~0.5 s

    check_group([reference, other])
    key = None
    if MEMO.consulted():  # not when nothing is held and nothing would be stored (`remembering`)
        ref_digest = expert_digest(reference) if reference_digest is UNSET else reference_digest
        other_digest = expert_digest(other)
        key = None if ref_digest is None or other_digest is None else (ref_digest, other_digest)
    perm = MEMO.get(key)  # the same pair aligned earlier in this process (`merge/align_memo.py`)
    if perm is not None:
        return perm
    dtype = match_dtype(reference)
    if reference_features is None:
        reference_features = neuron_features(reference, dtype)
    scores = (reference_features @ neuron_features(other, dtype).t()).numpy()  # [I, I]; the solver takes float64
    rows, cols = linear_sum_assignment(scores, maximize=True)  # rows == arange(I)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    MEMO.put(key, perm)
    return perm


def permute(expert: Mapping[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Relabel neurons: new neuron k = old neuron perm[k] (rows of gate/up/gate_bias/up_bias, columns of down;
    down_bias unchanged). Never changes the expert's function. Returns a new dict (tensors are new copies)."""
    inter, _ = expert_dims(expert)
    perm = torch.as_tensor(perm)
    if perm.dim() != 1 or perm.numel() != inter or perm.dtype.is_floating_point or perm.dtype == torch.bool:
        raise MoePruneError(f"permutation must be an integer tensor of shape [{inter}], "
                            f"got {perm.dtype} {tuple(perm.shape)}.")
    perm = perm.to(torch.long)
    if not torch.equal(torch.sort(perm.cpu()).values, torch.arange(inter)):
        raise MoePruneError(f"not a permutation of 0..{inter - 1}: every neuron index must appear exactly once.")
    out: dict[str, torch.Tensor] = {}
    for role, t in expert.items():
        p = perm.to(t.device)
        if role in NEURON_ROWS:
            out[role] = t.index_select(0, p)  # [I, H] / [I]
        elif role == "down":
            out[role] = t.index_select(1, p)  # [H, I]
        else:  # down_bias [H]
            out[role] = t.clone()
    return out


def align_group(experts: list[Mapping[str, torch.Tensor]], anchor: int) -> list[dict[str, torch.Tensor]]:
    """Every member permuted onto experts[anchor] by `permutation_to` (the anchor itself is returned as a copy
    of its dict, unpermuted). Order of the list is kept."""
    check_group(experts)
    if isinstance(anchor, bool) or not isinstance(anchor, int) or not 0 <= anchor < len(experts):
        raise MoePruneError(f"anchor {anchor!r} must be a member index 0..{len(experts) - 1}.")
    ref = experts[anchor]
    several = len(experts) > 2
    features = neuron_features(ref, match_dtype(ref)) if several else None  # [I, 3H], every member's
    digest = expert_digest(ref) if several and MEMO.consulted() else UNSET
    return [dict(e) if i == anchor else permute(e, permutation_to(ref, e, features, digest))
            for i, e in enumerate(experts)]
