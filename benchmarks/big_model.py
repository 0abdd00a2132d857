"""Benchmark: every verb on a checkpoint several times larger than the memory it may use.

1. Generates (once, in --work) a bf16 Qwen3-MoE-shaped checkpoint written shard by shard without building the
   model: defaults 24 layers x 128 experts, H=1024, expert width 448 -> ~8.5 GB (one decoder layer ~350 MB). The
   on-disk names are checked against what `save_pretrained` writes for the same family at toy size.
2. Runs each step as a user would (a `moeprune` subprocess) inside a memory cgroup with a hard limit (--limit,
   default 3G): cgroup v2 `memory.max` where this machine has a writable v2 hierarchy, else cgroup v1
   `memory.limit_in_bytes` (the kernel kills the step if it goes over). Only the step's process is moved into
   the group. Peak RSS is the step's own high-water mark (`os.wait4` rusage: the child and the processes it
   waited for), wall time is measured around it, and the ratio is against step 0: a plain layer-by-layer forward
   over the same calibration tokens (no statistics), run the same way.
3. Prints a table (step, exit, peak RSS GB, seconds, x forward, target) and writes it to --work/big_model.md.
   `--interleave` runs the plain forward again after every step and rates each step against the mean of the
   forwards just before and after it: on a VM whose speed drifts (the same forward took 56-121 s on one day),
   a ratio against one forward at the start says more about the drift than about the step.

Targets (issue 15): peak RSS <= 3 decoder layers + 1 GB; each step <= 2x the plain layer-by-layer forward,
HEAPr <= 4x. A step that is not implemented yet shows its exit status and the end of its error output.

    python benchmarks/big_model.py --work /tmp/big          # 8.5 GB, every step
    python benchmarks/big_model.py --work /tmp/small --layers 4 --experts 16 --steps forward,calibrate
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeprune.io.stock import compute_dtype, parse_dtype

WORDS = ("the of and to in is was for on that with as by at from his her an which you were are be this have had "
         "not but one all they there been has more when who will would can said she into only new some could").split()


def config_dict(a) -> dict:
    from moeprune.tiny import tiny_config

    cfg = tiny_config("qwen3_moe", hidden_size=a.hidden, moe_intermediate_size=a.expert_width,
                      intermediate_size=a.expert_width, num_experts=a.experts, num_experts_per_tok=a.top_k,
                      num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                      mlp_only_layers=[], decoder_sparse_step=1, max_position_embeddings=4096)
    d = cfg.to_dict()
    d["dtype"] = "bfloat16"
    return d


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint in save_pretrained's on-disk naming, in order, with its shape."""
    H, I, E, V = c["hidden_size"], c["moe_intermediate_size"], c["num_local_experts"], c["vocab_size"]
    nh, kv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    out = [("model.embed_tokens.weight", (V, H))]
    for L in range(c["num_hidden_layers"]):
        p = f"model.layers.{L}."
        out += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,)),
                (p + "self_attn.q_proj.weight", (nh * hd, H)), (p + "self_attn.k_proj.weight", (kv * hd, H)),
                (p + "self_attn.v_proj.weight", (kv * hd, H)), (p + "self_attn.o_proj.weight", (H, nh * hd)),
                (p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,)),
                (p + "mlp.gate.weight", (E, H))]
        for j in range(E):
            q = f"{p}mlp.experts.{j}."
            out += [(q + "gate_proj.weight", (I, H)), (q + "up_proj.weight", (I, H)), (q + "down_proj.weight", (H, I))]
    return out + [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]


def check_names(tmp: Path) -> None:
    """The generator's names and shapes == what save_pretrained writes for the same family at toy size."""
    from safetensors import safe_open

    from moeprune.tiny import save_tiny

    a = argparse.Namespace(hidden=32, expert_width=16, experts=4, top_k=2, layers=2)
    c = config_dict(a)
    path = save_tiny("qwen3_moe", tmp / "names", num_experts=c["num_local_experts"], **{k: c[k] for k in (
        "hidden_size", "moe_intermediate_size", "intermediate_size", "num_experts_per_tok", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "mlp_only_layers")})
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        real = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    mine = dict(tensor_shapes(c))
    if real != mine:
        raise SystemExit(f"generator names differ from save_pretrained: {sorted(set(real) ^ set(mine))[:6]} "
                         f"{[(k, real[k], mine[k]) for k in real if k in mine and real[k] != mine[k]][:3]}")


@torch.no_grad()
def generate(a, path: Path) -> None:
    """Random bf16 weights (norms 1, routers sharp), shards of ~2 GB, an index, config and tokenizer."""
    from moeprune.tiny import tiny_tokenizer

    c = config_dict(a)
    tmp = path.with_suffix(".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    check_names(tmp)
    g = torch.Generator().manual_seed(0)
    shards, shard, size, weight_map = [], {}, 0, {}

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    total = 0
    specs = tensor_shapes(c)
    for i, (name, shape) in enumerate(specs):
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            std = 4 / shape[1] ** 0.5 if name.endswith("mlp.gate.weight") else 0.02
            t = (torch.randn(shape, generator=g) * std).to(torch.bfloat16)
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= 2 * 10**9:
            flush()
        if i % 2000 == 0:
            print(f"generating {path.name}: {total / 1e9:.1f} GB", file=sys.stderr, flush=True)
    flush()
    n = len(shards)
    for k, old in enumerate(shards):  # rename to the -of-N form transformers writes
        new = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        (tmp / old).rename(tmp / new)
        weight_map = {t: (new if f == old else f) for t, f in weight_map.items()}
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(c, indent=1))
    tiny_tokenizer().save_pretrained(tmp)
    import shutil

    shutil.rmtree(tmp / "names", ignore_errors=True)
    tmp.rename(path)


# ----------------------------------------------------------------------------------------------- memory limit
class MemoryLimit:
    """A memory cgroup with a hard limit; `wrap(cmd)` runs cmd inside it (only that process and its children)."""

    def __init__(self, limit: int, name: str):
        v2 = Path("/sys/fs/cgroup")
        if (v2 / "cgroup.controllers").is_file() and "memory" in (v2 / "cgroup.controllers").read_text():
            self.dir, self.file = v2 / name, "memory.max"
        else:
            self.dir, self.file = Path("/sys/fs/cgroup/memory") / name, "memory.limit_in_bytes"
        try:
            self.dir.mkdir(exist_ok=True)
            (self.dir / self.file).write_text(str(limit))
        except OSError as e:
            raise SystemExit(f"cannot create a memory cgroup at {self.dir} ({e}); run as root on a machine with "
                             "cgroup v1 or v2 memory control, or use --limit 0 to run without a limit.") from e
        self.kind = "v2 memory.max" if self.file == "memory.max" else "v1 memory.limit_in_bytes"

    def wrap(self, cmd: list[str]) -> list[str]:
        procs = self.dir / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]

    def remove(self) -> None:
        try:
            self.dir.rmdir()
        except OSError:
            pass


def run_step(cmd: list[str], limit: MemoryLimit | None, log: Path) -> tuple[int, float, float]:
    """Exit code, wall seconds, peak RSS GB of the step's process tree (os.wait4 rusage)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "5"}
    with open(log, "w") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(limit.wrap(cmd) if limit else cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, wall, usage.ru_maxrss * 1024 / 1e9


FORWARD = """
import sys, torch
from moeprune.calibration.data import CalibConfig, CalibSource, build_sets
from moeprune.calibration.engine import run_layers
from moeprune.calibration.run import load_tokenizer
from moeprune.calibration.session import make_batches
from moeprune.io.lazy import load_lazy
from moeprune.io.stock import compute_dtype
from moeprune.models import get_adapter
torch.set_num_threads(1)
path, calib, samples, seq, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sets = build_sets(CalibConfig((CalibSource.parse(calib),), samples=samples, seq_len=seq, held_out=0),
                  load_tokenizer(__import__('pathlib').Path(path), None))
lazy = load_lazy(path, dtype=compute_dtype(dtype, "cpu"),  # the dtype the steps compute in (`--dtype`)
                 read_ahead=sys.argv[6:7] != ["no-read-ahead"])  # benchmarks/read_ahead.py compares both
adapter = get_adapter(lazy.model.config, model=lazy.model)
batches = make_batches(lazy.model, adapter, sets, 8)
for _ in run_layers(lazy.model, adapter, batches, layer_context=lazy.layer):
    pass
"""


def steps(model: Path, calib: str, work: Path, samples: int, seq: int,
          lazy: bool = False, dtype: str = "auto") -> list[tuple[str, list[str], float]]:
    """(name, command, time target in x forward). lazy: pass --lazy to every moeprune step (a model that would
    fit, e.g. a few layers to profile, still takes the layer-by-layer path)."""
    m = [sys.executable, "-m", "moeprune"]
    c = ["--calib", calib, "--samples", str(samples), "--seq-len", str(seq), "--held-out", "0", "--dtype", dtype,
         *(["--lazy"] if lazy else [])]
    o = lambda name: ["--out", str(work / "out" / name), "--overwrite"]  # noqa: E731
    recipe = work / "recipe.yaml"
    recipe.write_text("stages:\n  - {method: reap, ratio: 0.25}\n  - {method: camera, ratio: 0.25}\n")
    compress = work / "msmoe_compress.yaml"
    compress.write_text("stages:\n  - {method: msmoe, ratio: 0.25}\n  - {method: compress, rank: 32, sparsity: 0.9}\n")
    return [
        ("forward (plain, layer by layer)", [sys.executable, "-c", FORWARD, str(model), calib, str(samples), str(seq),
                                              dtype],
         1.0),
        ("calibrate", [*m, "calibrate", str(model), *c, "--out", str(work / "out" / "stats.safetensors"),
                       "--overwrite"], 2.0),
        ("prune reap 25%", [*m, "prune", str(model), "--method", "reap", "--ratio", "0.25", *c, *o("reap"),
                            "--no-verify"], 2.0),
        ("NAEE 25%", [*m, "prune", str(model), "--method", "naee", "--ratio", "0.25", *c, *o("naee"),
                      "--no-verify"], 2.0),
        ("DERN merge 25%", [*m, "prune", str(model), "--method", "dern", "--ratio", "0.25", *c, *o("dern"),
                            "--no-verify"], 2.0),
        ("M-SMoE merge 25%", [*m, "prune", str(model), "--method", "msmoe", "--ratio", "0.25", *c, *o("msmoe"),
                              "--no-verify"], 2.0),
        ("HEAPr 25%", [*m, "prune", str(model), "--method", "heapr", "--ratio", "0.25", *c, *o("heapr"),
                       "--no-verify"], 4.0),
        ("CAMERA-P 25%", [*m, "prune", str(model), "--method", "camera", "--ratio", "0.25", *c, *o("camera"),
                          "--no-verify"], 2.0),
        ("wanda 50%", [*m, "prune", str(model), "--method", "wanda", "--sparsity", "0.5", *c, *o("wanda-plain"),
                       "--no-verify"], 2.0),
        ("wanda 50% + OWL", [*m, "prune", str(model), "--method", "wanda", "--sparsity", "0.5", "--owl", *c,
                             *o("wanda"), "--no-verify"], 2.0),
        ("M-SMoE 25% -> compress", [*m, "prune", str(model), "--recipe", str(compress), *c, *o("compress"),
                                    "--no-verify"], 2.0),
        ("recipe reap 25% -> camera 25%", [*m, "prune", str(model), "--recipe", str(recipe), *c, *o("recipe"),
                                           "--no-verify"], 2.0),
        ("analyze", [*m, "analyze", str(model), *c, "--out", str(work / "out" / "analysis"), "--overwrite"], 2.0),
        ("verify (reap export)", [*m, "verify", str(model), str(work / "out" / "reap"), "--dtype", "bfloat16",
                                  *(["--lazy"] if lazy else [])], 2.0),
        ("verify (wanda export)", [*m, "verify", str(model), str(work / "out" / "wanda"), "--dtype", "bfloat16",
                                   *(["--lazy"] if lazy else [])], 2.0),
    ]


def computes_in(dtype: str) -> str:
    """The dtype the steps compute in on this CPU: `compute_dtype`'s "auto" / "stored" mean the checkpoint's (bf16)."""
    resolved = compute_dtype(dtype, "cpu")
    if resolved in ("auto", "stored"):
        return "bfloat16, the checkpoint's"
    return str(parse_dtype(resolved)).removeprefix("torch.")


def drop_export(cmd: list[str], later: list[tuple[str, list[str], float]]) -> None:
    """Delete the export a step wrote (its --out folder) unless a later step reads it (verify): each export is a
    full-size checkpoint, and a run of every step would otherwise need ten times the checkpoint in disk space."""
    if "--out" not in cmd:
        return
    out = Path(cmd[cmd.index("--out") + 1])
    if out.is_dir() and not any(str(out) in c for _, later_cmd, _ in later for c in later_cmd):
        shutil.rmtree(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/moeprune-big"))
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--expert-width", type=int, default=448)
    ap.add_argument("--limit", default="3G", help="hard memory limit of each step (0: none), e.g. 3G or 2500M")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", default="all", help="comma-separated step-name prefixes, or all")
    ap.add_argument("--lazy", action="store_true", help="pass --lazy to every step (for a model that would fit)")
    ap.add_argument("--dtype", default="auto", help="every step's --dtype, and the plain forward's (auto: float32 on "
                    "a CPU without native bf16 matmul, else the checkpoint's bf16; stored: bf16)")
    ap.add_argument("--keep-exports", action="store_true",
                    help="keep every step's export (default: deleted after its step unless a later step reads it)")
    ap.add_argument("--interleave", action="store_true",
                    help="run the plain forward again after every step and rate each step against the mean of the "
                         "forwards just before and after it (for a machine whose speed drifts)")
    ap.add_argument("--profile", action="store_true",
                    help="run each step under `py-spy record` (must be installed); flame graphs in --work/out")
    a = ap.parse_args()
    work = a.work.resolve()
    (work / "out").mkdir(parents=True, exist_ok=True)
    model = work / f"qwen3moe-{a.layers}x{a.experts}-h{a.hidden}-i{a.expert_width}"
    if not model.exists():  # in its own process: a step's peak RSS (wait4's ru_maxrss) starts from this process's
        # RSS at fork, so generating here would count its ~3 GB in every step
        gen = multiprocessing.get_context("spawn").Process(target=generate, args=(a, model))
        gen.start()
        gen.join()
        if gen.exitcode != 0:
            raise SystemExit(f"generating {model} failed (exit {gen.exitcode})")
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    layer = sum(n * 2 for name, shape in tensor_shapes(config_dict(a)) if name.startswith("model.layers.0.")
                for n in [int(torch.Size(shape).numel())])
    text = work / "web.txt"
    if not text.exists():
        g = torch.Generator().manual_seed(0)
        text.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (20000,), generator=g)))
    mult = {"G": 2**30, "M": 2**20}
    limit_bytes = int(float(a.limit[:-1]) * mult[a.limit[-1]]) if a.limit[-1] in mult else int(a.limit)
    limit = MemoryLimit(limit_bytes, f"moeprune-big-{os.getpid()}") if limit_bytes else None
    print(f"checkpoint {model}: {size / 1e9:.2f} GB, one decoder layer {layer / 1e9:.3f} GB; limit "
          f"{a.limit} ({limit.kind if limit else 'none'}); target peak RSS {(3 * layer + 2**30) / 1e9:.2f} GB",
          flush=True)
    rows, base = [], None
    wanted = None if a.steps == "all" else [s.strip() for s in a.steps.split(",")]
    try:
        chosen = [s for s in steps(model, f"web={text}", work, a.samples, a.seq_len, a.lazy, a.dtype)
                  if not wanted or any(s[0].startswith(w) for w in wanted)]
        forward = next((s for s in chosen if s[0].startswith("forward")), None)
        for k, (name, cmd, target) in enumerate(chosen):
            log = work / "out" / (name.split()[0].lower() + ".log")
            if a.profile:
                cmd = ["py-spy", "record", "--rate", "20", "--idle", "--threads", "--format", "raw", "-o",
                       str(log.with_suffix(".pyspy.txt")), "--", *cmd]
            rc, wall, rss = run_step(cmd, limit, log)
            if name.startswith("forward") and rc == 0:
                base = wall
            ref, note = base, ""
            if a.interleave and forward is not None and base and not name.startswith("forward"):
                after = run_step(forward[1], limit, work / "out" / "forward.log")[1]
                ref, note, base = (base + after) / 2, f" (forwards {base:.0f} / {after:.0f} s)", after
            tail = "" if rc == 0 else log.read_text()[-300:].replace("\n", " ")
            rows.append((name + note, rc, rss, wall, wall / ref if ref else float("nan"), target, tail))
            if not a.keep_exports:
                drop_export(cmd, chosen[k + 1:])
            print(f"{name}: exit {rc}, peak RSS {rss:.2f} GB, {wall:.0f} s"
                  + (f", x{wall / ref:.2f} forward{note}" if ref else "") + (f"  | {tail}" if tail else ""),
                  flush=True)
    finally:
        if limit:
            limit.remove()
    table = [f"checkpoint {size / 1e9:.2f} GB ({a.layers} layers x {a.experts} experts, H={a.hidden}, width "
             f"{a.expert_width}, top-{a.top_k}), decoder layer {layer / 1e9:.3f} GB, limit {a.limit} "
             f"({limit.kind if limit else 'none'}), {a.samples} x {a.seq_len} tokens, 1 thread, --dtype {a.dtype} "
             f"(computes in {computes_in(a.dtype)})",
             "", "| step | exit | peak RSS GB | target GB | seconds | x forward | target x |",
             "|---|---|---|---|---|---|---|"]
    for name, rc, rss, wall, ratio, target, _ in rows:
        table.append(f"| {name} | {rc} | {rss:.2f} | {(3 * layer + 2**30) / 1e9:.2f} | {wall:.0f} | {ratio:.2f} "
                     f"| {target:.0f} |")
    (work / "big_model.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
