"""Whether this CPU should calibrate a bf16 checkpoint in bf16 or in float32 (`io/stock.compute_dtype`).

Times one Qwen3-MoE sparse block (the shape of `benchmarks/big_model.py`'s checkpoint: H=1024, expert width 448,
128 experts, top-8) on the same tokens in bfloat16 and in float32, with the model's default experts kernel
(grouped_mm) and the eager per-expert loop, one thread, median of --repeats; then prints what `--dtype auto`
chooses here and why.

    python benchmarks/compute_dtype.py [--tokens 2048] [--experts 128] [--repeats 3]

On a CPU without native bf16 matmul (x86 without AVX-512/AMX) torch's bf16 matmul takes a scalar path, and float32
is several times faster; with it, bf16 is as fast or faster and needs half the memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from moeprune.io.stock import compute_dtype, cpu_has_native_bf16  # noqa: E402

torch.set_num_threads(1)


def block(experts: int, top_k: int, hidden: int, width: int, kernel: str):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=width, num_experts=experts,
                         num_experts_per_tok=top_k, norm_topk_prob=True)
    cfg._experts_implementation = kernel
    torch.manual_seed(0)
    b = Qwen3MoeSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in b.parameters():
            p.normal_(0, 0.02)
    return b


def seconds(b, x, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            b(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--width", type=int, default=448)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    x = torch.randn(1, a.tokens, a.hidden, generator=torch.Generator().manual_seed(1))
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 matmul: {cpu_has_native_bf16()}; "
          f"--dtype auto computes in {compute_dtype('auto', 'cpu').replace('auto', 'the checkpoint dtype')}")
    print(f"\none Qwen3-MoE block, {a.experts} experts top-{a.top_k}, H={a.hidden}, width {a.width}, {a.tokens} "
          f"tokens, one thread, median of {a.repeats}\n")
    print("| kernel | bfloat16 s | float32 s | bf16 / float32 |\n|---|---:|---:|---:|")
    for kernel in ("grouped_mm", "eager"):
        b = block(a.experts, a.top_k, a.hidden, a.width, kernel)
        f32 = seconds(b, x, a.repeats)
        bf16 = seconds(b.to(torch.bfloat16), x.to(torch.bfloat16), a.repeats)
        print(f"| {kernel} | {bf16:.2f} | {f32:.2f} | {bf16 / f32:.2f} |")


if __name__ == "__main__":
    main()
