"""Weight-matching permutations remembered by the content of the two experts (`align.permutation_to`).

One process often aligns the same pair more than once: a later stage's plan sees the merged layer (M-SMoE then
compress), the export merges it again, and `prune`'s verify merges it once more in its reference. π is a
deterministic function of the two experts' tensors, so it is looked up by

    key = (digest(reference), digest(other)),  digest(e) = sha256 over every role's name, dtype, shape and bytes,
                                                           roles in sorted order

(1.7 ms per bf16 expert of 448 × 1 024 with the CPU's SHA instructions, 3 ms without, against 12–45 ms for the
assignment). Experts whose tensors are not on the CPU are not hashed (their bytes would cross to the host): those
calls are computed every time. At most `max_bytes` of permutations are held; the least recently used go first.

Hashing pays only when a pair will be asked for again. The pipeline says when it will not (`remembering(False)`:
the export of a `prune --no-verify` or of `apply`, and every verification, which is the last alignment of a run);
there nothing new is stored, and nothing is hashed unless the memo already holds permutations to look up
(`consulted`). M-SMoE 25 % on the 24-layer benchmark checkpoint aligns 768 pairs in its export: 2.4 s of hashing.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from moeprune.io.safetensors_io import tensor_bytes


def expert_digest(expert: Mapping[str, torch.Tensor]) -> bytes | None:
    """sha256 of one expert's roles (module docstring); None when a tensor is not on the CPU."""
    h = hashlib.sha256()
    for role in sorted(expert):
        t = expert[role].detach()
        if t.device.type != "cpu":
            return None
        h.update(f"{role}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.digest()


_WANTED: ContextVar[bool] = ContextVar("moeprune_align_memo_wanted", default=True)


@contextmanager
def remembering(wanted: bool) -> Iterator[None]:
    """Within: store new permutations (`wanted`: a later alignment in this process may ask for the same pairs) or
    not (this is the last alignment of the run). Lookups of what is held go on either way."""
    token = _WANTED.set(wanted)
    try:
        yield
    finally:
        _WANTED.reset(token)


class PermutationMemo:
    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._perms: OrderedDict[tuple[bytes, bytes], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._perms)

    def consulted(self) -> bool:
        """Whether hashing a pair pays: it will be stored (`remembering`), or the memo holds some to look up."""
        return _WANTED.get() or bool(self._perms)

    def get(self, key: tuple[bytes, bytes] | None) -> torch.Tensor | None:
        """A copy of the remembered π, or None."""
        perm = None if key is None else self._perms.get(key)
        if perm is None:
            self.misses += 1
            return None
        self._perms.move_to_end(key)
        self.hits += 1
        return perm.clone()

    def put(self, key: tuple[bytes, bytes] | None, perm: torch.Tensor) -> None:
        if key is None or key in self._perms or not _WANTED.get():
            return
        size = perm.numel() * perm.element_size()
        if size > self.max_bytes:
            return
        self._perms[key] = perm.clone()
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._perms.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self._perms.clear()
        self._bytes = 0
        self.hits = self.misses = 0


MEMO = PermutationMemo()
