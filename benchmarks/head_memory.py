"""Benchmark: host memory of next-token scoring at a real vocabulary, the head's logits whole against by chunks.

The `auto` judge (its cross-fitted NLL) and the layer-by-layer held-out scores end every window batch in the model's
head. With V = 151 936 (Qwen3), B = 8 windows of L = 512 tokens the float32 logits alone are 2.5 GB, and the
float64 log-softmax the judge took over them twice that again. `eval/token_scores.score_head` runs the head a chunk
of positions at a time (`logits_to_keep`), its temporaries within `SCORE_BYTES`.

Each row runs in a fresh subprocess (one thread): a random qwen3_moe of hidden 256, 2 layers, the given vocabulary,
one batch through the layer-by-layer engine, then
    whole:   head_logits over every position, then −log_softmax(logits.double()) gathered (the judge's former code);
    chunks:  `score_head` (the judge's and held-out scoring's code now);
the in-memory `eval` path on the same model and batch:
    model-whole:   model(...).logits, then a float64 cross-entropy over them (`score_logits`' former code);
    model-chunks:  `score_model` (the decoder layers once, then the head in chunks: `evaluate_sets` now).
and HEAPr's gradient at the last decoder layer's output (both HEAPr paths start their backward from it):
    grad-whole:    the head on every position, the summed NLL over [B, L, V], backward (the former code);
    grad-chunks:   `stats/head_gradient.nll_gradient` (a chunk of positions at a time).
Peak RSS is VmHWM after `5 > /proc/self/clear_refs` (reset once the model and hidden states exist), so it is the
scoring's own peak above that; every row's per-window NLL must agree with the first's (relative 1e-6: the
in-memory forward and the layer-by-layer engine round differently in float32).

Run:  python benchmarks/head_memory.py [--vocab 151936] [--batch 8] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


NAMES = {"whole": "layer by layer: whole logits, float64 log-softmax (before)",
         "chunks": "layer by layer: `score_head`, chunks (now)",
         "model-whole": "in memory: model(...).logits, float64 cross-entropy (before)",
         "model-chunks": "in memory: `score_model`, chunks (now)",
         "grad-whole": "HEAPr's ∂L/∂h_L: head on every position, summed NLL, backward (before)",
         "grad-chunks": "HEAPr's ∂L/∂h_L: `nll_gradient`, chunks (now)"}


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def child(mode: str, vocab: int, batch: int, seq_len: int) -> None:
    import torch
    import torch.nn.functional as F

    from moeprune.calibration.engine import capture, head_logits, run_layers
    from moeprune.eval.token_scores import score_head, score_model
    from moeprune.models import get_adapter
    from moeprune.tiny import tiny_model

    torch.set_num_threads(1)
    model = tiny_model("qwen3_moe", seed=0, vocab_size=vocab, hidden_size=256, intermediate_size=512,
                       moe_intermediate_size=128, num_hidden_layers=2, mlp_only_layers=[], head_dim=64,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(1024, seq_len))
    adapter = get_adapter(model.config, model=model)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=g),
              "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}
    b = capture(model, adapter, inputs["input_ids"], inputs["attention_mask"])
    with torch.no_grad():
        for _ in run_layers(model, adapter, [b]):
            pass
        base = _rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        t = time.perf_counter()
        if mode == "whole":
            logits = head_logits(model, adapter, inputs, b.hidden)  # [B, L, V]
            logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            nll = (-logp.gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]).sum(1)
        elif mode == "model-whole":
            logits = model(**inputs, use_cache=False).logits  # [B, L, V]
            nll = torch.stack([F.cross_entropy(logits[r, :-1].double(), inputs["input_ids"][r, 1:], reduction="sum")
                               for r in range(batch)])
        elif mode == "model-chunks":
            nll = score_model(model, adapter, inputs).nll
        elif mode.startswith("grad"):
            nll = _gradient(mode, model, adapter, inputs, b.hidden)  # per window: Σ (∂L/∂h)² instead
        else:
            nll = score_head(model, adapter, inputs, b.hidden).nll
        seconds = time.perf_counter() - t
    print(json.dumps({"peak": _rss("VmHWM") - base, "seconds": seconds, "nll": nll.tolist()}))


def _gradient(mode: str, model, adapter, inputs, hidden):
    """Per window Σ_t ‖∂L/∂h_{L,t}‖² (float64), L the summed next-token NLL: the head's logits whole, or in chunks."""
    import torch

    from moeprune.calibration.engine import head_logits
    from moeprune.stats.head_gradient import frozen, nll_gradient
    from moeprune.stats.neurons import summed_nll

    if mode == "grad-chunks":
        g = nll_gradient(model, adapter, inputs, hidden)
    else:
        with frozen(model), torch.enable_grad():
            h = hidden.detach().requires_grad_(True)
            summed_nll(head_logits(model, adapter, inputs, h), inputs["input_ids"], inputs["attention_mask"]).backward()
            g = h.grad
    return g.double().square().sum((1, 2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--child", choices=list(NAMES), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.vocab, a.batch, a.seq_len)
        return 0
    rows = {}
    for mode in NAMES:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--vocab", str(a.vocab), "--batch",
                              str(a.batch), "--seq-len", str(a.seq_len)], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            rows[mode] = None
            continue
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    logits_gb = a.batch * a.seq_len * a.vocab * 4 / 1e9
    print(f"V={a.vocab}, {a.batch} windows x {a.seq_len} tokens (float32 logits {logits_gb:.2f} GB), one thread\n")
    print("| scoring | peak RSS above the model, GB | seconds |\n|---|---:|---:|")
    for mode, r in rows.items():
        peak, seconds = ("failed", "-") if r is None else (f"{r['peak'] / 1e9:.2f}", f"{r['seconds']:.1f}")
        print(f"| {NAMES[mode]} | {peak} | {seconds} |")
    if not all(rows.values()):
        return 1
    import math

    worst = max(abs(x - y) / abs(x) for m, r in rows.items() if not m.startswith("grad")
                for x, y in zip(rows["whole"]["nll"], r["nll"], strict=True))
    grad = max(abs(x - y) / abs(x) for x, y in zip(rows["grad-whole"]["nll"], rows["grad-chunks"]["nll"], strict=True))
    print(f"\nper-window NLL, every scoring row against the first: max relative difference {worst:.1e}",
          "(agree)" if worst <= 1e-6 else "(DIFFER)")  # layer by layer vs one forward: float32 rounding
    print(f"per-window Σ ‖∂L/∂h_L‖², chunks against whole: max relative difference {grad:.1e}",
          "(agree)" if grad <= 1e-5 else "(DIFFER)")
    ok = worst <= 1e-6 and grad <= 1e-5
    return 0 if ok and not math.isnan(worst) and not math.isnan(grad) else 1


if __name__ == "__main__":
    raise SystemExit(main())
