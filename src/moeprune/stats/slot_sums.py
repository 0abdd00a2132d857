"""Per-token reductions of the collector's per-slot expert outputs f [T, k, H], a few token rows at a time on the CPU.

Whole-batch temporaries of that size (a float32 copy of f: 67 MB at T = 2 048, k = 8, H = 1 024) are above the heap's
reuse threshold (`io.memory.COMPUTE_REUSE`), so each call maps fresh pages and faults them in: `f.float()` took
31 ms that way against 8.5 ms into pages already mapped. In chunks of rows whose temporaries fit under the threshold
the same operations reuse the heap's pages (one thread, the shape above: peak and norm 49 -> 22 ms, the weighted
sum 29 -> ~12 ms). Every row is computed by the same operations as whole, so the results are bit-identical. On an
accelerator the batch is one chunk (launches, not page faults, are what costs there).
"""

from __future__ import annotations

import torch

from moeprune.io.memory import COMPUTE_REUSE


def row_step(rows: int, row_bytes: int, device: torch.device) -> int:
    """Rows per chunk: as many as keep a temporary of `row_bytes` per row under the reuse threshold (CPU), or all."""
    if device.type != "cpu":
        return max(1, rows)
    return max(1, min(rows, COMPUTE_REUSE // max(1, row_bytes)))


def peak_and_norm(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f [T, k, H] -> (max_h |f| [T, k], ‖f‖₂ over h [T, k]), both float64, computed in float32."""
    T, k, H = f.shape
    peak = torch.empty(T, k, dtype=torch.float32, device=f.device)
    norm = torch.empty(T, k, dtype=torch.float32, device=f.device)
    step = row_step(T, k * H * 4, f.device)
    for s in range(0, T, step):
        ff = f[s : s + step].float()  # [c, k, H]
        torch.maximum(ff.amax(dim=-1), ff.amin(dim=-1).neg_(), out=peak[s : s + step])
        torch.linalg.vector_norm(ff, dim=-1, out=norm[s : s + step])
    return peak.double(), norm.double()


def weighted_sum(f: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Σ_slots g·f: f [T, k, H], gate [T, k] -> [T, H] in f's dtype, the product rounded to f's dtype before the
    sum over slots (as transformers' experts kernels combine them)."""
    T, k, H = f.shape
    g = gate.to(f.dtype)
    if torch.is_grad_enabled() and (f.requires_grad or g.requires_grad):  # `out=` takes no autograd inputs
        return (f * g[..., None]).sum(dim=1)
    out = torch.empty(T, H, dtype=f.dtype, device=f.device)
    step = row_step(T, k * H * f.element_size(), f.device)
    for s in range(0, T, step):
        torch.sum(f[s : s + step] * g[s : s + step, :, None], dim=1, out=out[s : s + step])
    return out


def dot_terms(h: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h, r [T, H] -> (Σ h², Σ h·r, Σ r²) per token [T] each, in float64."""
    T, H = h.shape
    hh, hr, rr = (torch.empty(T, dtype=torch.float64, device=h.device) for _ in range(3))
    step = row_step(T, H * 8, h.device)
    for s in range(0, T, step):
        hd, rd = h[s : s + step].double(), r[s : s + step].double()  # [c, H]
        torch.sum(hd * hd, dim=-1, out=hh[s : s + step])
        torch.sum(hd * rd, dim=-1, out=hr[s : s + step])
        torch.sum(rd * rd, dim=-1, out=rr[s : s + step])
    return hh, hr, rr
