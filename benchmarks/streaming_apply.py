"""Benchmark: streaming expert removal (`moeprune apply --streaming`) against a plain file copy.

What is measured
    A synthetic qwen3_moe checkpoint (bf16 random weights, Hub key layout `model.layers.L.mlp.experts.J.*`,
    sharded with an index) of >= `--size-gb` GB is generated shard by shard, without building a model. Then, each
    in a fresh subprocess, alternating the order every repeat:
      copy       shutil.copyfile of every shard (+ config/index) into a new folder, then fsync of each file
                 (streaming fsyncs its shards too, so both pay for reaching the disk);
      streaming  moeprune.api.apply_plan(ckpt, plan, out, streaming=True, max_shard_size=...) with a `random`
                 plan at ratio 0.5 made once in the parent.
    Before every run the input shards are evicted from the page cache (fsync + posix_fadvise DONTNEED), so both
    methods read cold; `disk read` (from /proc/self/io) shows whether that worked. Wall time is the median over
    repeats (the best is in --json). Throughput: "input GB/s" = size of the input checkpoint / wall -- the basis of
    the speed ratio, since both jobs process the same checkpoint (streaming reads only the kept ~half of the
    expert bytes); "output GB/s" = bytes written / wall. Peak RSS is the child's own VmHWM (/proc/self/status;
    ru_maxrss is not used because Linux carries the parent's peak over fork+exec); "above baseline" subtracts its
    VmHWM right after imports (torch/transformers/moeprune). GB = 1e9 bytes, MB = 1e6 bytes.

Targets: speed streaming/copy >= 0.5 (input basis); peak RSS of streaming <= largest input shard + 200 MB.

Run:  python benchmarks/streaming_apply.py [--size-gb 1.2] [--shard-mb 400] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

H, I, E, TOPK, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 1024, 768, 64, 4, 16, 4, 64, 32768
INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------------------- synthetic checkpoint
def layout(size_bytes: int) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
    """Number of layers needed for `size_bytes` (bf16) and every (name, shape) in on-disk order."""
    def layer(i: int) -> list[tuple[str, tuple[int, ...]]]:
        p = f"model.layers.{i}."
        out = [(p + "input_layernorm.weight", (H,))]
        for j in range(E):
            out += [(f"{p}mlp.experts.{j}.{w}_proj.weight", s) for w, s in (("gate", (I, H)), ("up", (I, H)),
                                                                             ("down", (H, I)))]
        out += [(p + "mlp.gate.weight", (E, H)), (p + "post_attention_layernorm.weight", (H,)),
                (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, H)),
                (p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, H)),
                (p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, H)),
                (p + "self_attn.o_proj.weight", (H, HEADS * HEAD_DIM)),
                (p + "self_attn.q_norm.weight", (HEAD_DIM,)), (p + "self_attn.k_norm.weight", (HEAD_DIM,))]
        return out

    nbytes = lambda ts: 2 * sum(math.prod(s) for _, s in ts)  # noqa: E731
    ends = [("model.embed_tokens.weight", (VOCAB, H)), ("model.norm.weight", (H,)), ("lm_head.weight", (VOCAB, H))]
    n_layers = max(1, math.ceil((size_bytes - nbytes(ends)) / nbytes(layer(0))))
    return n_layers, ends[:1] + [t for i in range(n_layers) for t in layer(i)] + ends[1:]


def generate(path: Path, size_gb: float, shard_mb: float) -> None:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    n_layers, tensors = layout(int(size_gb * 1e9))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:  # greedy packing, like save_pretrained
        nb = 2 * math.prod(shape)
        if shards[-1] and size + nb > shard_mb * 1e6:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):  # one shard in memory at a time
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {n: torch.ones(s, dtype=torch.bfloat16) if n.endswith("norm.weight")
                else torch.randn(s, generator=gen, dtype=torch.bfloat16) for n, s in shard}
        save_file(data, str(path / fname), metadata={"format": "pt"})
        total += sum(t.nbytes for t in data.values())
        weight_map.update(dict.fromkeys(data, fname))
        del data
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {  # shape of moeprune.tiny.save_tiny("qwen3_moe") config.json, scaled up; Hub key "num_experts"
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "dtype": "bfloat16", "head_dim": HEAD_DIM,
        "hidden_act": "silu", "hidden_size": H, "intermediate_size": 3 * H, "initializer_range": 0.02,
        "max_position_embeddings": 4096, "moe_intermediate_size": I, "norm_topk_prob": True,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "num_experts": E,
        "num_experts_per_tok": TOPK, "num_hidden_layers": n_layers, "output_router_logits": False,
        "rms_norm_eps": 1e-06, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False,
        "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))


# ----------------------------------------------------------------------------------------- measured child
def child(method: str, src: Path, out: Path, plan_file: Path, max_shard: str) -> None:
    if method == "streaming":
        from transformers import AutoConfig  # noqa: F401  (imported before the baseline, as the CLI would)

        from moeprune.api import apply_plan
        from moeprune.select.plan import PrunePlan
    base_kb = vm_kb("VmHWM")
    t0 = time.perf_counter()
    if method == "copy":
        out.mkdir()
        for f in sorted(src.iterdir()):
            shutil.copyfile(f, out / f.name)
            with open(out / f.name, "rb+") as fh:
                os.fsync(fh.fileno())
    else:
        apply_plan(src, PrunePlan.load(plan_file), out, streaming=True, max_shard_size=max_shard)
    wall = time.perf_counter() - t0
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    print(json.dumps({"wall": wall, "base_kb": base_kb, "peak_kb": vm_kb("VmHWM"), "disk_read": int(io["read_bytes"]),
                      "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def vm_kb(field: str) -> int:
    """VmHWM = peak RSS of this process image. Not ru_maxrss: Linux carries the parent's peak over fork+exec."""
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(field + ":"))


def evict(files: list[Path]) -> None:
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def run_child(method: str, src: Path, out: Path, plan_file: Path, max_shard: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    evict(sorted(src.iterdir()))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    cmd = [sys.executable, __file__, "--child", method, str(src), str(out), str(plan_file), max_shard]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{method} run failed:\n{proc.stderr}")
    res = json.loads(proc.stdout.splitlines()[-1])
    res["bytes_out"] = sum(f.stat().st_size for f in out.iterdir())
    return res


def check_output(src: Path, out: Path, plan) -> None:
    """The streamed checkpoint opens, has E/2 experts, and one kept expert + the router rows are bit-identical."""
    from safetensors import safe_open

    from moeprune.io.checkpoint import Checkpoint
    from moeprune.models import get_adapter

    ckpt = Checkpoint.open(out)
    assert get_adapter(ckpt.config, weight_keys=ckpt.names()).num_experts == len(plan.kept_experts[0])
    src_map, out_map = (json.loads((p / INDEX).read_text())["weight_map"] for p in (src, out))
    key = "model.layers.0.mlp.experts.{}.down_proj.weight"
    old, new = key.format(plan.kept_experts[0][-1]), key.format(len(plan.kept_experts[0]) - 1)
    gate = "model.layers.0.mlp.gate.weight"
    with safe_open(src / src_map[old], "pt") as a, safe_open(out / out_map[new], "pt") as b:
        assert a.get_tensor(old).equal(b.get_tensor(new)), "kept expert bytes differ"
    with safe_open(src / src_map[gate], "pt") as a, safe_open(out / out_map[gate], "pt") as b:
        assert a.get_tensor(gate)[plan.kept_experts[0]].equal(b.get_tensor(gate)), "router rows differ"


# ----------------------------------------------------------------------------------------- parent
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.2)
    ap.add_argument("--shard-mb", type=float, default=400)
    ap.add_argument("--max-shard-size", default="400MB", help="output shard size for streaming apply")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="where to put the data (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--json", type=Path, help="dump the numbers here")
    args = ap.parse_args()

    from moeprune.api import make_plan
    from moeprune.io.checkpoint import Checkpoint
    from moeprune.models import get_adapter

    work = args.workdir or Path(tempfile.mkdtemp(prefix="moeprune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src, plan_file = work / "ckpt", work / "plan.json"
    try:
        if not (src / "config.json").is_file():
            t = time.perf_counter()
            generate(src, args.size_gb, args.shard_mb)
            print(f"generated {src} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        ckpt = Checkpoint.open(src)
        adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
        bytes_in = sum(f.stat().st_size for f in src.iterdir())
        largest = max(f.stat().st_size for f in ckpt.files)
        print(f"checkpoint: {adapter.family}, {adapter.num_layers} layers x {adapter.num_experts} experts, "
              f"{bytes_in / 1e9:.2f} GB in {len(ckpt.files)} shards", file=sys.stderr)
        plan = make_plan(src, "random", 0.5)
        plan.save(plan_file)

        runs: dict[str, list[dict]] = {"copy": [], "streaming": []}
        for rep in range(args.repeats):
            for method in (("copy", "streaming") if rep % 2 == 0 else ("streaming", "copy")):
                r = run_child(method, src, work / f"out-{method}", plan_file, args.max_shard_size)
                if method == "streaming" and rep == 0:
                    check_output(src, work / "out-streaming", plan)
                runs[method].append(r)
                print(f"  run {rep + 1} {method}: {r['wall']:.2f}s", file=sys.stderr)
                shutil.rmtree(work / f"out-{method}")

        rows = {}
        for method, rs in runs.items():
            wall = statistics.median(r["wall"] for r in rs)
            rows[method] = {
                "wall_s": wall, "best_wall_s": min(r["wall"] for r in rs), "walls_s": [r["wall"] for r in rs],
                "input_gbps": bytes_in / wall / 1e9, "output_gbps": rs[0]["bytes_out"] / wall / 1e9,
                "bytes_in": bytes_in, "bytes_out": rs[0]["bytes_out"],
                "peak_rss_mb": max(r["peak_kb"] for r in rs) * 1024 / 1e6,
                "above_baseline_mb": max(r["peak_kb"] - r["base_kb"] for r in rs) * 1024 / 1e6,
                "ru_maxrss_mb_inherited": max(r["ru_maxrss_kb"] for r in rs) * 1024 / 1e6,  # not used: see docstring
                "disk_read_gb": statistics.median(r["disk_read"] for r in rs) / 1e9,
                "largest_shard_mb": largest / 1e6,
            }
        c, s = rows["copy"], rows["streaming"]
        speed = s["input_gbps"] / c["input_gbps"]
        rss_limit = largest / 1e6 + 200
        print(f"\n{adapter.num_layers} layers x {adapter.num_experts} experts, {bytes_in / 1e9:.2f} GB, "
              f"{len(ckpt.files)} shards; random plan, ratio 0.5; cold page cache; median of {args.repeats} "
              "alternating runs\n")
        print("| method | wall s | input GB/s | output GB/s | peak RSS (MB) | RSS above baseline (MB) | "
              "largest input shard (MB) | disk read (GB) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for m, r in rows.items():
            print(f"| {m} | {r['wall_s']:.2f} | {r['input_gbps']:.3f} | {r['output_gbps']:.3f} | "
                  f"{r['peak_rss_mb']:.0f} | {r['above_baseline_mb']:.0f} | {r['largest_shard_mb']:.0f} | "
                  f"{r['disk_read_gb']:.2f} |")
        print(f"\nspeed streaming/copy (input checkpoint bytes per second): {speed:.2f} (target >= 0.5) "
              f"{'PASS' if speed >= 0.5 else 'FAIL'}")
        print(f"output bytes per second, streaming/copy: {s['output_gbps'] / c['output_gbps']:.2f} (informative)")
        print(f"streaming peak RSS {s['peak_rss_mb']:.0f} MB vs largest shard + 200 MB = {rss_limit:.0f} MB "
              f"(ratio {s['peak_rss_mb'] / rss_limit:.2f}) {'PASS' if s['peak_rss_mb'] <= rss_limit else 'FAIL'}")
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "speed_ratio": speed, "rss_limit_mb": rss_limit,
                                             "layers": adapter.num_layers, "experts": adapter.num_experts}, indent=2))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:  # a user-given --workdir keeps everything else it holds
            for p in (src, plan_file) if args.workdir else (work,):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]), sys.argv[6])
    else:
        main()
