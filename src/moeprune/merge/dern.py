"""DERN (Dropping Experts, Recombining Neurons; arXiv 2509.10377): the merge step, for a whole layer.

The layer's survivors S (each group's first member) stay; every other expert d is cut into neuron segments — its
neuron k is row k of gate/up (and of their biases) plus column k of down, one atomic piece of the expert's sum
y = Σ_k down[:, k]·act(gate_k·x)·(up_k·x). Each segment goes to the most compatible retained neuron anywhere in the
layer (not only its own group):

    (s*, k*) = argmax_{s∈S, k'} cos(φ_{d,k}, φ_{s,k'}),   φ = [gate row, up row, down column (, bias entries)]

and is kept only if that cosine is >= `threshold` (α; segments below it are dropped as incompatible). Inside each
survivor the segments are merged into the neuron they were assigned to, usage-weighted:

    θ_{s,k'} ← (f_s·θ_{s,k'} + Σ_{(d,k)→(s,k')} f_d·θ_{d,k}) / (f_s + Σ_{(d,k)→(s,k')} f_d)

(f = usage frequency from the plan; a survivor with f_s = 0 counts as 1 so its own neurons are never zeroed).
The survivor keeps its width and its down bias. With no segment above α this is pruning of the dropped experts;
α = None (`recombine` 0, the default) recombines nothing and skips the similarity scan.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch

from moeprune.log import logger
from moeprune.merge.align import FEATURE_ROLES, check_group, neuron_features

Expert = Mapping[str, torch.Tensor]
NEURON_ROWS = ("gate", "up", "gate_bias", "up_bias")


SURVIVOR_BLOCK = 8  # survivors whose neuron features are held at once while assigning (memory: (block+1)·I·3H·12 B)
# `dern_best` results by the layer's content: the threshold choice, the export and verify's reference scan the same
# layer in one process (three scans of E_d·E_s·I²·3H multiply-adds otherwise); each entry is 16 B per dropped neuron
MEMO_LAYERS = 128
_MEMO: OrderedDict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()


def _unit_features(expert: Expert) -> torch.Tensor:
    """[I, D] float64 neuron features (`neuron_features`), each row scaled to unit norm in place."""
    f = neuron_features(expert)
    return f.div_(f.norm(dim=1, keepdim=True).clamp_min(1e-300))


def float32_margin(dim: int) -> float:
    """Twice a bound on |cos₃₂ − cos₆₄| for unit vectors of `dim` entries: rounding each entry to float32
    (relative u = 2⁻²⁴) moves a dot product by ≤ 2u + u², and a float32 dot product of n terms errs by at most
    γ_n·Σ|a_i b_i| ≤ γ_n = n·u / (1 − n·u) (Higham, Thm 3.1; Σ|a_i b_i| ≤ ‖a‖‖b‖ = 1). Two float32 scores further
    apart than this are ordered as their float64 values are."""
    u = 2.0 ** -24
    return 2 * (dim * u / (1 - dim * u) + 3 * u)


def _block_best(fd64: torch.Tensor, fd32: torch.Tensor, b64: torch.Tensor, b32: torch.Tensor,
                margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(best float64 cosine [I], its index into the block [I]) of each dropped neuron against one block of
    survivor neurons, equal to `(fd64 @ b64.T).max(dim=1)` (first index on ties).

    The scan runs in float32 (2× the float64 rate on CPU); a row whose two best float32 scores are within `margin`
    (a possible reordering, `float32_margin`) is recomputed in float64 against the whole block, every other row
    keeps its float32 winner, which is then the unique float64 maximum, and gets its exact float64 value."""
    top = (fd32 @ b32.T).topk(min(2, b32.shape[0]), dim=1)  # [I, ≤2] float32 best two
    arg = top.indices[:, 0].clone()  # [I]
    rows = (top.values[:, 0] - top.values[:, -1] <= margin).nonzero().squeeze(1)  # [r] rows to settle in float64
    if rows.numel():  # (a block of one neuron gives gap 0: settled in float64, trivially)
        arg[rows] = (fd64[rows] @ b64.T).argmax(dim=1)
    return (fd64 * b64[arg]).sum(dim=1), arg  # [I] float64 cosine of each winner, [I] its index


def _digest(experts: Sequence[Expert], survivors: list[int], dropped: list[int]) -> str:
    """A digest of what the scan reads: the two index lists and each feature role's shape and float64 values (the
    scan's own precision, so a layer read in bf16 for the export and in float32 for verify's reference, the same
    values, is one entry)."""
    h = hashlib.blake2b(repr((survivors, dropped)).encode(), digest_size=20)
    for j in (*survivors, *dropped):
        for role in (r for r in FEATURE_ROLES if r in experts[j]):
            t = experts[j][role].detach()
            h.update(f"{j}.{role}:{tuple(t.shape)}".encode())
            h.update(t.to(device="cpu", dtype=torch.float64).contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def dern_best(experts: Sequence[Expert], survivors: list[int],
              dropped: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """`scan_best`, computed once per layer content in a process (`_MEMO`: hashing a layer's bytes costs ~1/100 of
    the scan)."""
    key = _digest(experts, survivors, dropped)
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    best = _MEMO[key] = scan_best(experts, survivors, dropped)
    while len(_MEMO) > MEMO_LAYERS:
        _MEMO.popitem(last=False)
    return best


def scan_best(experts: Sequence[Expert], survivors: list[int],
              dropped: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each dropped expert d: (best cosine [I] float64, flat index [I] into the survivors' n·I neurons) of each
    of its neuron segments against every survivor neuron — the segment similarities a threshold is applied to.

    The survivors are scanned SURVIVOR_BLOCK at a time (running maximum per dropped neuron; ties keep the lowest
    flat index, as one argmax over all of them does), so memory is a block's features, not the layer's. Each block
    is scored in float32 and its near-ties settled in float64 (`_block_best`): the same assignment as an all-float64
    argmax, at about half its cost (the scan is E_d·E_s·I²·D multiply-adds, D = 3H (+2))."""
    I = experts[survivors[0]]["gate"].shape[0]
    best = {d: torch.full((I,), -torch.inf, dtype=torch.float64) for d in dropped}  # [I] per dropped expert
    where = {d: torch.zeros(I, dtype=torch.long) for d in dropped}  # [I] flat index into n·I
    for start in range(0, len(survivors), SURVIVOR_BLOCK):
        block = torch.cat([_unit_features(experts[s]) for s in survivors[start : start + SURVIVOR_BLOCK]])  # [b·I, D]
        block32, margin = block.float(), float32_margin(block.shape[1])
        for d in dropped:  # a dropped expert's features are rebuilt per block (cheap next to the scan): one in memory
            mine = _unit_features(experts[d])  # [I, D] float64
            top, arg = _block_best(mine, mine.float(), block, block32, margin)  # [I] best cosine in the block, index
            better = top > best[d]  # strict: an earlier block wins a tie
            best[d] = torch.where(better, top, best[d])
            where[d] = torch.where(better, arg + start * I, where[d])
        del block, block32
    return {d: (best[d], where[d]) for d in dropped}


def dern_assign(experts: Sequence[Expert], survivors: list[int], dropped: list[int],
                threshold: float) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each dropped expert d: (kept neuron indices [m], survivor position [m] (into `survivors`), target neuron
    [m]) of the segments whose best cosine (`dern_best`) is >= threshold."""
    I = experts[survivors[0]]["gate"].shape[0]
    out = {}
    for d, (best, where) in dern_best(experts, survivors, dropped).items():
        keep = (best >= threshold).nonzero().squeeze(1)  # [m]
        out[d] = (keep, where[keep] // I, where[keep] % I)
    return out


@torch.no_grad()
def merge_dern(experts: Sequence[Expert], groups: list[list[int]], weights: list[list[float]],
               threshold: float | None = 0.4, layer: int | None = None) -> list[dict[str, torch.Tensor]]:
    """experts: every expert of the layer (canonical roles); groups: survivor first; weights: usage per member;
    threshold: least cosine to recombine a segment, None for none (no scan); layer: for the log line only.
    Returns one expert per group (the survivor with its recombined neurons; a survivor nothing comes into is
    returned as it is, its own dict). Survivors are recombined one at a time (one expert's float64 accumulators in
    memory)."""
    check_group(list(experts))
    survivors = [g[0] for g in groups]
    usage = {j: float(w) for g, ws in zip(groups, weights, strict=True) for j, w in zip(g, ws, strict=True)}
    dropped = sorted(j for g in groups for j in g[1:])
    assign = {} if threshold is None or not dropped else dern_assign(experts, survivors, dropped, threshold)
    incoming: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {p: [] for p in range(len(survivors))}
    for d, (k, pos, target) in assign.items():  # (dropped expert, its neurons, their targets) per survivor
        for p in pos.unique().tolist():
            sel = pos == p
            incoming[p].append((d, k[sel], target[sel]))
    moved = sum(k.numel() for k, _, _ in assign.values())
    merged = []
    for p, s in enumerate(survivors):
        if not incoming[p]:  # (f_s·θ) / f_s = θ: the survivor as it is (its own dict: `methods.unchanged`)
            merged.append(experts[s])
            continue
        fs = usage[s] if usage[s] > 0 else 1.0
        acc = {r: experts[s][r].detach().double() * fs for r in experts[s] if r != "down_bias"}
        norm = torch.full((experts[s]["gate"].shape[0],), fs, dtype=torch.float64)
        for d, kk, tt in incoming[p]:
            fd, src = usage[d], experts[d]
            for r in NEURON_ROWS:
                if r in acc:
                    acc[r].index_add_(0, tt, fd * src[r].detach()[kk].double())
            acc["down"].index_add_(1, tt, fd * src["down"].detach()[:, kk].double())
            norm.index_add_(0, tt, torch.full((tt.numel(),), fd, dtype=torch.float64))
        out = {}
        for r, t in acc.items():
            scale = norm[None, :] if r == "down" else norm.view(-1, *[1] * (t.dim() - 1))
            out[r] = (t / scale).to(experts[s][r].dtype)
        if "down_bias" in experts[s]:
            out["down_bias"] = experts[s]["down_bias"].detach().clone()
        merged.append(out)
    logger.info("DERN%s: %d of %d neuron segments of %d dropped experts recombined (%s), rest dropped",
                "" if layer is None else f" layer {layer}", moved,
                len(dropped) * experts[survivors[0]]["gate"].shape[0], len(dropped),
                "recombine 0: no similarity scan" if threshold is None else f"cos >= {threshold:.3f}")
    return merged
