"""Expert cache of one MoE layer: m experts resident on the fast device, the rest on the host.

The stream is one layer's routing trace in serving order, requests [T, k] (token t needs the k experts
R_t = requests[t]). The cache starts empty (cold) and persists over the whole stream (consecutive requests of a
server). Per token t, in this order:

    1. prefetch (predictive policies only): every guess in P_t not resident is loaded (one transfer each),
       evicting, for each, the victim of the eviction rule among the resident experts not in P_t;
    2. request: every e ∈ R_t resident now is a hit; each missing one is demand-loaded (one transfer each),
       evicting the victim among the resident experts not in R_t (m >= k, so one always exists).

Counted per token: hits (≤ k), demand loads d_t = k − hits, prefetch loads q_t. Hit rate = Σ hits / (T·k) =
the share of requested experts resident when the layer runs. Bytes moved = (d_t + q_t) · expert bytes.

Eviction rules (ties broken by the lowest expert index, so every result is deterministic):

    lru      the resident expert used longest ago (a load or a hit is a use; the k experts of one token, and a
             token's prefetched guesses, share that token's time)
    lfu      the resident expert requested least often so far in the stream (counts survive eviction; a
             prefetch is not a request), ties: lru
    belady   the resident expert whose next request lies farthest ahead (never again = infinitely far): MIN,
             Belady's optimal offline rule. Serialising R_t into k requests, demand paging with it moves the
             fewest experts of any policy — also of any prefetching policy (a prefetch is a load done early;
             moving loads earlier never lowers their number) — so its demand loads are a lower bound on every
             policy's loads and its hit rate an upper bound on every demand-paging policy's (lru, lfu).

Prefetching raises the hit rate (a correct guess hides the transfer behind compute, see offload/timing.py) but not
below Belady's bytes: an oracle that prefetches exactly R_t with belady eviction reaches hit rate 1 *and* Belady's
bytes — the most prefetching can give (tests/test_offload.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeprune.errors import MoePruneError
from moeprune.registry import Registry

INF = 1 << 62


@dataclass
class CacheRun:
    """Per-token counters of one layer's stream."""

    hits: torch.Tensor  # [T] long, requested experts resident when the layer ran
    demand: torch.Tensor  # [T] long, demand loads (= k − hits)
    prefetch: torch.Tensor  # [T] long, prefetch loads issued for this token
    k: int

    @property
    def hit_rate(self) -> float:
        return float(self.hits.sum()) / max(1, self.hits.numel() * self.k)

    @property
    def loads_per_token(self) -> float:
        """Experts moved over the link per token (demand + prefetch)."""
        return float((self.demand + self.prefetch).sum()) / max(1, self.hits.numel())


class Eviction:
    """Chooses the victim among resident experts; sees every use and request of the stream."""

    def __init__(self, requests: torch.Tensor, num_experts: int):
        self.E = num_experts

    def use(self, e: int, t: int, requested: bool) -> None:  # a hit, a demand load or a prefetch at token t
        pass

    def victim(self, resident: set[int], exclude: set[int], t: int) -> int:
        raise NotImplementedError


EVICTIONS: Registry[Callable[[torch.Tensor, int], Eviction]] = Registry("eviction rule")


@EVICTIONS.register("lru")
class LRU(Eviction):
    def __init__(self, requests: torch.Tensor, num_experts: int):
        super().__init__(requests, num_experts)
        self.last = [-1] * num_experts

    def use(self, e: int, t: int, requested: bool) -> None:
        self.last[e] = t

    def victim(self, resident: set[int], exclude: set[int], t: int) -> int:
        return min((e for e in resident if e not in exclude), key=lambda e: (self.last[e], e))


@EVICTIONS.register("lfu")
class LFU(LRU):
    def __init__(self, requests: torch.Tensor, num_experts: int):
        super().__init__(requests, num_experts)
        self.count = [0] * num_experts

    def use(self, e: int, t: int, requested: bool) -> None:
        super().use(e, t, requested)
        self.count[e] += int(requested)

    def victim(self, resident: set[int], exclude: set[int], t: int) -> int:
        return min((e for e in resident if e not in exclude), key=lambda e: (self.count[e], self.last[e], e))


@EVICTIONS.register("belady")
class Belady(Eviction):
    def __init__(self, requests: torch.Tensor, num_experts: int):
        super().__init__(requests, num_experts)
        self.next = next_use(requests, num_experts).tolist()  # [T][E]
        self.now = [set(row) for row in requests.tolist()]  # a prefetch at t may evict only after t's own needs

    def victim(self, resident: set[int], exclude: set[int], t: int) -> int:
        nxt, now = self.next[t], self.now[t]
        return min((e for e in resident if e not in exclude), key=lambda e: (-(t if e in now else nxt[e]), e))


def next_use(requests: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, k] -> [T, E]: the first token t' > t whose request holds e (INF if none)."""
    rows = requests.tolist()
    out, row = [None] * len(rows), [INF] * num_experts
    for t in range(len(rows) - 1, -1, -1):
        out[t] = row
        row = list(row)
        for e in rows[t]:
            row[e] = t
    return torch.tensor(out, dtype=torch.long).reshape(len(rows), num_experts)


def check_stream(requests: torch.Tensor, num_experts: int, cache_size: int, prefetch: torch.Tensor | None) -> None:
    if requests.dim() != 2 or requests.shape[1] < 1:
        raise MoePruneError(f"requests must be [T, k] expert indices, got shape {list(requests.shape)}")
    k = requests.shape[1]
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or not k <= cache_size <= num_experts:
        raise MoePruneError(f"cache size m = {cache_size!r}: a layer's cache holds one token's k = {k} experts at "
                            f"least and all E = {num_experts} at most; choose k <= m <= E.")
    if requests.numel() and (int(requests.min()) < 0 or int(requests.max()) >= num_experts):
        raise MoePruneError(f"requests hold expert indices outside [0, {num_experts}).")
    if prefetch is not None:
        if prefetch.dim() != 2 or prefetch.shape[0] != requests.shape[0]:
            raise MoePruneError(f"prefetch must be [T, p] with T = {requests.shape[0]}, got {list(prefetch.shape)}")
        if prefetch.shape[1] > cache_size:
            raise MoePruneError(f"prefetching {prefetch.shape[1]} experts per token does not fit a cache of "
                                f"{cache_size}; prefetch at most m.")


def simulate(requests: torch.Tensor, num_experts: int, cache_size: int, eviction: str = "lru",
             prefetch: torch.Tensor | None = None) -> CacheRun:
    """Run one layer's stream (module docstring). requests [T, k]; prefetch [T, p] guesses (−1 = none) or None."""
    check_stream(requests, num_experts, cache_size, prefetch)
    T, k = requests.shape
    rule = EVICTIONS.get(eviction)(requests, num_experts)
    resident: set[int] = set()
    hits, demand, pre = [0] * T, [0] * T, [0] * T  # python ints: a tensor element write costs a microsecond
    req_rows = [sorted(row) for row in requests.tolist()]
    pre_rows = [sorted({e for e in row if e >= 0}) for row in prefetch.tolist()] if prefetch is not None else None

    def load(e: int, t: int, keep: set[int]) -> None:
        if len(resident) >= cache_size:
            resident.discard(rule.victim(resident, keep, t))
        resident.add(e)

    for t in range(T):
        if pre_rows is not None:
            guesses = pre_rows[t]
            keep = set(guesses)
            for e in guesses:
                if e not in resident:
                    load(e, t, keep)
                    pre[t] += 1
                rule.use(e, t, False)
        want = req_rows[t]
        keep = set(want)
        for e in want:
            if e in resident:
                hits[t] += 1
            else:
                load(e, t, keep)
                demand[t] += 1
            rule.use(e, t, True)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return CacheRun(as_long(hits), as_long(demand), as_long(pre), k)
