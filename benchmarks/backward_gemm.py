"""Why per-expert matmuls cost ~10x their FLOPs on the CPU in bf16: one decoder layer of the
`benchmarks/big_model.py` checkpoint, one thread.

HEAPr's down pass (`stats/neurons_layered._backward`) recomputes each decoder layer with grad and backpropagates.
On the 24-layer checkpoint its backward takes ~2.7x the layer's forward, while the same expert GEMMs cost the same
in either direction when timed alone. This script prints, for one layer and one batch of 8 x 256 tokens:
  1. the whole decoder layer (eager experts): forward and backward seconds, three repetitions;
  2. the MoE block alone on random inputs: forward and backward seconds;
  3. every aten.mm of the whole layer's backward (a TorchDispatchMode timer): count and seconds by shape, and the
     same matmuls (shapes, dtypes, the layer's own weights) timed outside autograd.
Measured 2026-12-04 (session 30), transformers' eager experts (unpadded): whole layer forward 0.5 s / backward
1.3-1.5 s; MoE block alone on random inputs 0.26 / 0.52 s; each expert GEMM of the whole layer's backward ~3 ms
whatever its rows (37 or 390), and ~3 ms outside autograd too. The cause is oneDNN compiling a kernel per shape
with its cache bounded at 256 (`io/kernel_cache.py`): a real layer's ~130 token counts per projection turn the
cache over, while random inputs give fewer distinct counts. With ONEDNN_PRIMITIVE_CACHE_CAPACITY=4096 the same
backward GEMMs take ~0.5 ms each. moeprune's own expert loops round their rows up to 32 (`pad_rows`): HEAPr's
collector layer went 0.56 / 1.40 s -> 0.35 / 0.77 s forward / backward.

    OMP_NUM_THREADS=1 python benchmarks/backward_gemm.py --model /work/big/qwen3moe-24x128-h1024-i448
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class MatmulTimer(TorchDispatchMode):
    """Seconds and count of every aten.mm, keyed by (rows bucket, A columns, B shape, dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict = collections.defaultdict(lambda: [0, 0.0])
        self.calls: list[tuple[torch.Size, torch.Size, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dt = time.perf_counter() - t0
        if func is torch.ops.aten.mm.default:
            a, b = args[0], args[1]
            key = (a.shape[1], tuple(b.shape), str(a.dtype))
            self.rows[key][0] += 1
            self.rows[key][1] += dt
            self.calls.append((a.shape, b.shape, dt))
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--layer", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from moeprune.calibration.engine import call_layer, capture
    from moeprune.calibration.session import eager_experts
    from moeprune.io.lazy import load_lazy
    from moeprune.models import get_adapter
    from moeprune.stats.head_gradient import frozen

    lazy = load_lazy(a.model, head=True)
    model = lazy.model
    adapter = get_adapter(model.config, model=model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 256), generator=g)
    inputs = capture(model, adapter, ids, torch.ones_like(ids))
    i = a.layer
    with lazy.layer(i), eager_experts(model):
        layer = adapter.decoder_layers(model)[i]
        # the layer's input: random hidden states of the embeddings' scale (layer 0's output is not needed here)
        h0 = inputs.hidden.to(next(layer.parameters()).dtype)
        with frozen(layer), torch.enable_grad():
            for rep in range(3):
                h = h0.detach().requires_grad_(True)
                t0 = time.perf_counter()
                out = call_layer(layer, h, inputs.kwargs[i], "cpu")
                out = out[0] if isinstance(out, tuple) else out
                t1 = time.perf_counter()
                timer = MatmulTimer()
                with timer:
                    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
                print(f"whole layer {i}, rep {rep}: forward {t1 - t0:.2f} s, backward {time.perf_counter() - t1:.2f} s")
            block = adapter.block(model, i)
            for rep in range(3):
                x = torch.randn(h0.shape, generator=g).to(h0.dtype).requires_grad_(True)
                t0 = time.perf_counter()
                y = block(x)
                y = y[0] if isinstance(y, tuple) else y
                t1 = time.perf_counter()
                y.backward(torch.randn(y.shape, generator=g).to(y.dtype))
                print(f"MoE block alone, rep {rep}: forward {t1 - t0:.2f} s, backward {time.perf_counter() - t1:.2f} s")
        print("\naten.mm in the whole layer's last backward, and the same shapes outside autograd:")
        print("| A columns | B | dtype | calls | seconds in backward | seconds outside |\n|---|---|---|---|---|---|")
        weights = {tuple(w.shape): w for w in layer.parameters()}
        roles = adapter.expert_roles(adapter.block(model, i))
        weights.update({tuple(t.shape[1:]): t[0] for t in roles.values() if t.dim() == 3})
        for (cols, bshape, dtype), (n, s) in sorted(timer.rows.items(), key=lambda kv: -kv[1][1]):
            b = weights.get(bshape)
            b = b if b is not None else torch.randn(bshape).to(h0.dtype)
            calls = [c for c in timer.calls if c[0][1] == cols and tuple(c[1]) == bshape]
            lhs = [torch.randn(shape_a, generator=g).to(b.dtype) for shape_a, _, _ in calls]
            t0 = time.perf_counter()
            for x in lhs:
                x @ b.detach()
            print(f"| {cols} | {bshape} | {dtype} | {n} | {s:.3f} | {time.perf_counter() - t0:.3f} |")


if __name__ == "__main__":
    main()
