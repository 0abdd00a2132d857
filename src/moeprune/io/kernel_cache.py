"""Bound oneDNN's primitive cache while a model is processed layer by layer (CPU, bf16 compute), and keep the
shapes of moeprune's own per-expert matmuls few enough to stay in it (`pad_rows`, below).

On a CPU with native bf16 matmul (`io.stock.cpu_has_native_bf16`) torch sends bf16 matmuls to oneDNN, which
JIT-compiles a kernel for every new problem shape and keeps it in a process-wide cache of 1 024 entries by default.
An MoE layer hands each expert a different number of tokens, so its grouped matmuls bring hundreds of new shapes per
layer (one per distinct group size and projection) until the cache is full: about 0.5 MB of kernel each, resident
for the rest of the process. Measured on the 8.6 GB benchmark checkpoint (`benchmarks/big_model.py`: 128 experts,
top-8, 2 048 tokens per batch, one thread): the plain layer-by-layer forward's resident memory climbs ~70 MB per
layer for its first 10 layers and stays ~0.5 GB above what the layers and activations hold.

| capacity | forward peak RSS GB | forward s |
|---|---|---|
| 1 024 (oneDNN's default) | 1.79 | 29.0 |
| 512 | 1.53 | 30.1 |
| 256 | 1.41 | 30.6 |
| 128 | 1.34 | 30.9 |
| 16 | 1.27 | 32.4 |

(The benchmark's forward in one process with its RSS sampled every 5 ms, read-ahead off, one run each;
`benchmarks/RESULTS.md`, session 28.) Under the benchmark's 3 GiB limit, 256 against the default: forward
1.80 → 1.41 GB, NAEE 2.15 → 1.74, HEAPr 2.27 → 1.82, M-SMoE → compress 2.29 → 1.88 GB, at 0–7 % more wall time
(ratios to the forward 2.79 / 4.13 / 4.46 → 2.76 / 4.03 / 4.02). The layer-by-layer path runs because memory is
short, so it takes 256; a process that loads whole keeps oneDNN's default. A capacity the user set
(`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) is kept.

oneDNN reads the variable when it builds the cache, at the process's first primitive, and torch exposes no setter:
set later, it has no effect (nothing breaks). The layer-by-layer loaders call this before any layer computes.
"""

from __future__ import annotations

import os

import torch

VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
LAYERED_CAPACITY = 256


def bound_kernel_cache(capacity: int = LAYERED_CAPACITY) -> str:
    """Set oneDNN's primitive-cache capacity for this process unless already set; returns the value in force."""
    return os.environ.setdefault(VARIABLE, str(capacity))


# ------------------------------------------------------------------------------------------- few shapes, kept
ROW_BUCKET = 32  # rows of a per-expert matmul are rounded up to a multiple of this (CPU, bf16 / fp16)


def onednn_serves(x: torch.Tensor) -> bool:
    """Whether torch sends matmuls on `x` to oneDNN, whose kernels are compiled per shape: CPU, bf16 or fp16."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def rounded_rows(n, multiple: int = ROW_BUCKET):
    """n (an int or an integer tensor of row counts) rounded up to a multiple of `multiple`."""
    return (n + (multiple - 1)) // multiple * multiple


def pad_rows(x: torch.Tensor, multiple: int = ROW_BUCKET) -> torch.Tensor:
    """x [n, H] -> [⌈n / multiple⌉·multiple, H], zero rows appended (x itself when nothing is to append, or when
    oneDNN does not serve the matmul: not on the CPU, or not bf16 / fp16).

    With the cache bounded, an expert loop over a real layer misses it on almost every call: each expert's token
    count n is another problem shape, a layer brings ~130 of them per projection, and with its forward and
    backward matmuls that is more than 256 kernels, so the cache turns over within a layer and every call compiles
    (~3 ms, against ~0.3 ms for the matmul). Rounding n up to a multiple of 32 leaves ~20 shapes per projection:
    they stay cached for the whole run, for ≤ 31 padded rows per call. The caller slices the padded rows off the
    result; each real row's value is computed as before (a matmul row depends only on that row), up to the
    summation order that oneDNN may pick for another row count. `benchmarks/backward_gemm.py` measures the miss."""
    extra = rounded_rows(x.shape[0], multiple) - x.shape[0]
    if not extra or not onednn_serves(x):
        return x
    return torch.cat([x, x.new_zeros(extra, *x.shape[1:])])
