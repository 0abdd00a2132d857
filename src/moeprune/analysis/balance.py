"""Per-layer load balance and specialisation of experts, from routing counts.

counts[e] = number of tokens that selected expert e in one layer (top-k selections, so Σ_e counts = k·tokens).
Functions taking ``counts`` accept one layer [E] (-> float) or a stack of layers [N, E] (-> tensor [N]).

    usage entropy      H = −Σ_e p_e log2 p_e,  p_e = counts[e] / Σ counts,  0·log 0 = 0;  normalised H / log2 E
    coefficient of var CV = std(counts) / mean(counts)   (population std; 0 = perfectly balanced)
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from moeprune.errors import MoePruneError


class UsageEntropy(NamedTuple):
    bits: float | torch.Tensor  # H in bits, 0 .. log2 E
    normalized: float | torch.Tensor  # H / log2 E, 0 (one expert) .. 1 (uniform)


class DomainSpecificity(NamedTuple):
    per_expert: torch.Tensor  # [E] float64 in [0, 1]; 0 for experts no domain uses
    owner: torch.Tensor  # [E] int64 domain with the highest normalised rate; −1 for unused experts
    layer: float  # usage-weighted mean of per_expert


def _out(x: torch.Tensor) -> float | torch.Tensor:
    return float(x) if x.dim() == 0 else x


def _check_counts(counts: torch.Tensor, name: str, dims: tuple[int, ...], shape: str) -> torch.Tensor:
    if not isinstance(counts, torch.Tensor):
        raise MoePruneError(f"{name} must be a torch.Tensor, got {type(counts).__name__}")
    if counts.dim() not in dims or counts.numel() == 0:
        raise MoePruneError(f"{name} must have shape {shape} and be non-empty, got {list(counts.shape)}")
    x = counts.double()
    if not torch.isfinite(x).all() or (x < 0).any():
        raise MoePruneError(f"{name} must hold finite, non-negative counts")
    return x


def usage_entropy(counts: torch.Tensor) -> UsageEntropy:
    """Entropy of the expert-usage distribution in bits, and normalised by log2 E. counts [E] or [N, E]; E >= 2."""
    x = _check_counts(counts, "counts", (1, 2), "[E] or [N, E]")  # [..., E]
    E = x.shape[-1]
    if E < 2:
        raise MoePruneError("usage_entropy needs at least 2 experts (normalisation divides by log2 E)")
    total = x.sum(-1, keepdim=True)  # [..., 1]
    if (total == 0).any():
        raise MoePruneError("counts of a layer are all zero: no routing recorded; drop that layer or collect tokens")
    p = x / total
    bits = -(torch.where(p > 0, p * p.log2(), torch.zeros_like(p))).sum(-1)  # [...]
    return UsageEntropy(_out(bits), _out(bits / math.log2(E)))


def coefficient_of_variation(counts: torch.Tensor) -> float | torch.Tensor:
    """CV = σ / μ of the per-expert counts (population σ, divides by E). counts [E] or [N, E]."""
    x = _check_counts(counts, "counts", (1, 2), "[E] or [N, E]")  # [..., E]
    mean = x.mean(-1)
    if (mean == 0).any():
        raise MoePruneError("counts of a layer are all zero: CV is undefined; drop that layer or collect tokens")
    return _out(x.std(-1, correction=0) / mean)


def domain_specificity(
    counts_by_domain: torch.Tensor, tokens_by_domain: torch.Tensor | None = None
) -> DomainSpecificity:
    """How exclusively each expert serves one domain, independent of how many tokens each domain has.

    counts_by_domain [D, E]: selections of expert e on domain d's tokens; tokens_by_domain [D] (default: row sums,
    i.e. k·tokens, which gives the same result for a fixed k). With r[d, e] = counts[d, e] / tokens[d] (rate),

        q[d | e] = r[d, e] / Σ_d' r[d', e]                    (expert e's distribution over domains)
        spec[e]  = 1 − H(q[· | e]) / log2 D                   (1: one domain only; 0: every domain at the same rate)
        owner[e] = argmax_d q[d | e]
        layer    = Σ_e w_e spec[e],  w_e = Σ_d r[d, e] / Σ_{d,e} r[d, e]

    Rates make the scores invariant to scaling any domain's token count; the weights w are usage at equal domain
    sizes, so ``layer`` is invariant too. Experts with no selections get spec 0, owner −1 and weight 0.
    """
    x = _check_counts(counts_by_domain, "counts_by_domain", (2,), "[D, E]")  # [D, E]
    D = x.shape[0]
    if D < 2:
        raise MoePruneError(f"domain_specificity needs at least 2 domains, got D={D}; pass counts [D, E] with D >= 2")
    if tokens_by_domain is None:
        tok = x.sum(1)  # [D]
    else:
        tok = _check_counts(tokens_by_domain, "tokens_by_domain", (1,), "[D]")
        if tok.shape[0] != D:
            raise MoePruneError(f"tokens_by_domain has {tok.shape[0]} entries but counts_by_domain has D={D} rows")
    if (tok <= 0).any():
        raise MoePruneError("a domain has no tokens (zero row or token count); drop that domain")
    rate = x / tok[:, None]  # [D, E]
    used = rate.sum(0)  # [E]
    q = rate / used.clamp(min=torch.finfo(torch.float64).tiny)  # [D, E]
    ent = -(torch.where(q > 0, q * q.log2(), torch.zeros_like(q))).sum(0)  # [E]
    spec = torch.where(used > 0, 1 - ent / math.log2(D), torch.zeros_like(ent)).clamp(0, 1)  # [E]
    owner = torch.where(used > 0, q.argmax(0), torch.full_like(used, -1, dtype=torch.int64))  # [E]
    if used.sum() == 0:
        raise MoePruneError("counts_by_domain is all zero: no routing recorded")
    w = used / used.sum()  # [E]
    return DomainSpecificity(per_expert=spec, owner=owner, layer=float((w * spec).sum()))


def coactivation_counts(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """coact[i, j] = tokens selecting both i and j (diagonal: tokens selecting i). idx [T, k] -> [E, E] int64."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype.is_floating_point:
        raise MoePruneError("idx must be an integer tensor of expert indices [T, k]")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_experts):
        raise MoePruneError(f"idx holds expert indices outside [0, {num_experts}); check num_experts")
    mask = torch.zeros(idx.shape[0], num_experts, dtype=torch.int64)  # [T, E]
    mask.scatter_(1, idx.long(), 1)
    return mask.T @ mask  # [E, E]


def coactivation_lift(coact: torch.Tensor, tokens: float, diagonal: float = float("nan")) -> torch.Tensor:
    """lift[i, j] = P(i, j) / (P(i) P(j)) = coact[i, j] · tokens / (coact[i, i] · coact[j, j]).

    coact [E, E]: symmetric co-selection counts, diagonal = selections of each expert; tokens: total tokens.
    1 = independent, > 1 = selected together more than chance, < 1 = less. Off-diagonal entries that involve an
    expert with no selections are 0 (no evidence of co-activation), never NaN. The diagonal (self-lift, which is
    just 1 / P(i)) is set to ``diagonal`` (default NaN). Returns [E, E] float64.
    """
    c = _check_counts(coact, "coact", (2,), "[E, E]")  # [E, E]
    if c.shape[0] != c.shape[1]:
        raise MoePruneError(f"coact must be square [E, E], got {list(c.shape)}")
    if isinstance(tokens, bool) or not isinstance(tokens, numbers.Real) or not 0 < float(tokens) < math.inf:
        raise MoePruneError(f"tokens must be a positive finite number (total tokens), got {tokens!r}")
    tokens = float(tokens)
    if not torch.equal(c, c.T):
        raise MoePruneError("coact must be symmetric (coact[i, j] = coact[j, i]); build it as mask.T @ mask")
    n = c.diagonal()  # [E]
    if (n > tokens).any():
        raise MoePruneError(f"an expert is selected {float(n.max()):g} times but tokens={tokens}; pass total tokens")
    if (c > torch.minimum(n[:, None], n[None, :])).any():
        raise MoePruneError("coact[i, j] exceeds coact[i, i] or coact[j, j]; the diagonal must hold per-expert counts")
    denom = n[:, None] * n[None, :]  # [E, E]
    lift = torch.where(denom > 0, c * tokens / denom.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(c))
    lift.fill_diagonal_(diagonal)
    return lift
