"""GPU check: what moeprune costs and whether it works on one CUDA device. Run by `benchmarks/gpu_check.sh OUT`.

Sections (each timed and guarded; a failure is recorded and the next section runs):
  calib   bf16 qwen3_moe-shaped model on the GPU (H=2048, expert width 768, 64 experts, top-8, 8 layers, every
          layer MoE, vocab 32k): (a) plain whole-model forward with the default experts kernel, (a') the same
          with eager experts, (b) `collect` (every routed statistic, probes on), same tokens and batches.
          Medians of 3 after a warm-up; torch.cuda.synchronize around each.
  depth   peak device memory of a lazy (layer-by-layer) calibration on checkpoints of 2 and of 8 decoder layers
          of the same size: flat in depth means one layer plus the activation cache is resident.
  prune   `moeprune prune --method reap --ratio 0.5 --device cuda` then `moeprune verify` for three families
          (qwen3_moe, deepseek_v3, gpt_oss), as a user runs them (subprocesses); exit codes, wall times and the
          verify line.
  quant   `moeprune quantize --scheme w4a16 --algorithm gptq --group-size 128 --device cuda` (uniform int4,
          compressed-tensors) and a per-layer mixed export (odd MoE layers int8, even int4: the form vLLM can serve,
          one scheme per fused MoE layer) of a small bf16 qwen3_moe (H=256, expert width 128), each verified by
          moeprune; both land in the vllm section's exports.
  verbs   NAEE, M-SMoE (dominant and weighted router), HC-SMoE, Sub-MoE, DERN, HEAPr, CAMERA-P, Wanda, STUN, top_p
          and naee_skip (fitted thresholds), the M-SMoE -> compress recipe, and analyze with
          `--device cuda`, in memory and `--lazy`: exits, verify lines, and whether the two give the same plan and
          tensors; then `verify --lazy --device cuda` (benchmarks/gpu_verbs.py).
  vllm    whether vLLM imports here (no network on the device: it cannot be pip-installed), then, on a small
          testbed built here (2 layers, 8 experts, head_dim 64; ~30 s of CPU training), its frequency-pruned copy
          (25 %) and every export the prune and quant sections left (int4, per-layer mixed, qwen3_moe, deepseek_v3,
          gpt_oss), each in a subprocess of its own (vLLM does not reliably give the device back to a second LLM in
          one process; the subprocess and its vLLM engine process are killed as a group, and the free device memory
          after each is in the table):
          (1) load it in vLLM (bf16, eager); (2) the same token ids (4 fixed prompts, tokenised once with the
          export's tokenizer, fed as prompt_token_ids) through vLLM (prompt_logprobs=5, logprobs=5, temperature 0)
          and transformers float32: max and mean |Δ logprob| over the log-probs vLLM returns, top-1 agreement and
          identical 16-token greedy continuations (`moeprune.eval.logprobs.compare_logprobs`); the bound is
          max(0.25, 2 x transformers' own bf16 error on the same export), since a bf16 routing near-tie moves
          log-probs by more than rounding; (3) testbed exports only: the generative tasks (`moeprune gen-tasks`, 8
          items per task) through lm-eval's vLLM backend next to the native runner's scores on the same items
          (transformers float32) and the number of identical completions.
          Where vLLM is not importable, transformers bf16 stands in for it (lm-eval's hf backend), which proves the
          plumbing only. Exports are skipped once less than a minute of the budget is left (GPU_CHECK_BUDGET_S,
          default 460 s); `GPU_CHECK_ONLY=prune,quant,vllm` leaves the vllm section room for every export.
Writes OUT/gpu_check.md (tables) and OUT/gpu_check.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from gpu_serve import (
    CUDA,
    WORKER_MIN_S,
    calib_text,
    cli,
    free_gib,
    left_s,
    run_worker,
    serve_tables,
    serve_testbed,
    tiny_inputs,
)

RESULTS: dict = {}
LINES: list[str] = []


def section(name: str):
    def wrap(fn):
        def run(*args):
            t0 = time.perf_counter()
            print(f"== {name}", flush=True)
            try:
                RESULTS[name] = fn(*args)
            except Exception as e:  # a failed section is a result too
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
                LINES.append(f"\n### {name}: FAILED\n```\n{RESULTS[name]['trace']}\n```")
            RESULTS.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
            print(f"== {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
        return run
    return wrap


def calib_set(n: int, length: int, vocab: int, seed: int = 0):
    from moeprune.calibration.data import CalibSet

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return CalibSet("bench", ids, torch.ones_like(ids), "", "random", 1, ids.numel())


SHAPE = dict(hidden_size=2048, moe_intermediate_size=512, intermediate_size=512, num_experts=64,
             num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=4, head_dim=128, vocab_size=32000,
             mlp_only_layers=[], decoder_sparse_step=1, max_position_embeddings=4096)
DEPTH_SHAPE = {**SHAPE, "num_experts": 32}
if os.environ.get("GPU_CHECK_SMALL"):  # a dry run of the script itself on a CPU machine
    SHAPE.update(hidden_size=64, moe_intermediate_size=32, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)
    DEPTH_SHAPE = {**SHAPE}


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def reset_peak() -> None:
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")


def timed(fn, reps: int = 3) -> float:
    fn()
    sync()
    out = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


@section("calib")
def calib(dev: str, out: Path) -> dict:
    from moeprune.calibration.session import collect, eager_experts
    from moeprune.io.stock import auto_class
    from moeprune.models import get_adapter
    from moeprune.tiny import tiny_config

    config = tiny_config("qwen3_moe", num_hidden_layers=8, **SHAPE)
    torch.manual_seed(0)
    with torch.device(dev):  # random init on the device: seconds, not minutes
        model = auto_class(config).from_config(config, dtype=torch.bfloat16).eval()
    adapter = get_adapter(model.config, model=model)
    cs = calib_set(64, 512, SHAPE["vocab_size"])
    B = 16

    @torch.no_grad()
    def plain():
        for s in range(0, 64, B):
            model(input_ids=cs.input_ids[s:s + B].to(dev), attention_mask=cs.attention_mask[s:s + B].to(dev),
                  use_cache=False)

    def eager():
        with eager_experts(model):
            plain()

    def ours():
        collect(model, adapter, [cs], device=dev, batch_size=B)

    a, a2, b = timed(plain), timed(eager), timed(ours)
    reset_peak()
    ours()
    peak = peak_gib()
    tokens = cs.input_ids.numel()
    from gpu_profile import profile_call

    prof = profile_call(ours, out, "collect")  # out/collect_profile.txt: top ops, host syncs and where
    r = {"tokens": tokens, "plain_s": a, "eager_s": a2, "collect_s": b, "collect_over_plain": b / a,
         "collect_over_eager": b / a2, "collect_peak_GiB": peak,
         "params_M": sum(p.numel() for p in model.parameters()) / 1e6, **prof}
    LINES.append("\n### Calibration vs a plain forward (bf16, one GPU)\n"
                 f"{r['params_M']:.0f} M parameters, 8 layers x {SHAPE['num_experts']} experts, {tokens} tokens, "
                 f"batch {B}.\n\n"
                 "| (a) plain forward | (a') eager experts | (b) collect, every statistic | (b)/(a) | (b)/(a') "
                 "| peak GiB (b) |\n|---|---|---|---|---|---|\n"
                 f"| {a:.3f} s | {a2:.3f} s | {b:.3f} s | {b / a:.2f} | {b / a2:.2f} | {peak:.2f} |\n\n"
                 f"Host syncs in one collect ({cs.input_ids.shape[0] // B} batches x 8 layers): {r['syncs']}; "
                 "most frequent sites: "
                 + ", ".join(f"{site} x{n}" for site, n in r["sync_sites"][:5])
                 + ". Top ops: collect_profile.txt.")
    return r


@section("depth")
def depth(dev: str, work: Path) -> dict:
    from moeprune.calibration.session import collect
    from moeprune.io.lazy import load_lazy
    from moeprune.models import get_adapter
    from moeprune.tiny import tiny_model

    rows = {}
    for layers in (2, 8):
        path = work / f"depth{layers}"
        if not path.exists():
            tiny_model("qwen3_moe", num_hidden_layers=layers, **DEPTH_SHAPE).to(torch.bfloat16).save_pretrained(path)
        reset_peak()
        lazy = load_lazy(path)
        adapter = get_adapter(lazy.model.config, model=lazy.model)
        layer_mib = lazy.layer_bytes(0) / 2**20
        t0 = time.perf_counter()
        collect(lazy.model, adapter, [calib_set(32, 512, SHAPE["vocab_size"])], device=dev, batch_size=16,
                layer_context=lazy.layer)
        sync()
        rows[layers] = {"peak_GiB": peak_gib(), "s": time.perf_counter() - t0,
                        "layer_MiB": layer_mib}
        del lazy
    LINES.append("\n### Peak device memory of layer-by-layer calibration, 2 vs 8 layers (bf16)\n\n"
                 "| layers | one layer MiB | peak GiB | seconds |\n|---|---|---|---|\n"
                 + "\n".join(f"| {n} | {v['layer_MiB']:.0f} | {v['peak_GiB']:.3f} | {v['s']:.1f} |"
                             for n, v in rows.items())
                 + f"\n\nratio 8/2 layers: {rows[8]['peak_GiB'] / rows[2]['peak_GiB']:.2f}")
    return rows


@section("prune")
def prune(dev: str, work: Path) -> dict:
    rows = {}
    for family in ("qwen3_moe", "deepseek_v3", "gpt_oss"):
        src, text = tiny_inputs(work, family)
        out = work / f"out-{family}"
        rc, s, _, log = cli("prune", str(src), "--method", "reap", "--ratio", "0.5", "--calib", f"web={text}",
                         "--device", dev, "--samples", "16", "--seq-len", "64", "--out", str(out), "--overwrite")
        rv, sv, vline, vlog = cli("verify", str(src), str(out), "--dtype", "float32")
        rows[family] = {"prune_rc": rc, "prune_s": s, "verify_rc": rv, "verify_s": sv, "verify": vline.strip(),
                        "log": (log if rc else vlog if rv else "")[-600:]}
    LINES.append("\n### prune (reap 50 %, calibrated on the GPU) + verify, three families\n\n"
                 "| family | prune exit | prune s | verify exit | verify s | verify line |\n|---|---|---|---|---|---|\n"
                 + "\n".join(f"| {f} | {v['prune_rc']} | {v['prune_s']:.1f} | {v['verify_rc']} | {v['verify_s']:.1f} "
                             f"| {v['verify'][:110]} |" for f, v in rows.items()))
    return rows


@section("nccl")
def nccl(dev: str, work: Path) -> dict:
    """torchrun (NCCL process group, one rank per GPU; two gloo ranks on a CPU dry run) calibration == the
    single-process calibration."""
    from moeprune.stats.store import ExpertStats

    src, text = tiny_inputs(work, "qwen3_moe")
    args = ["calibrate", str(src), "--calib", f"web={text}", "--samples", "16", "--seq-len", "64", "--device", dev,
            "--overwrite"]
    ranks = torch.cuda.device_count() if dev.startswith("cuda") else 2  # a CPU dry run: two gloo ranks
    t0 = time.perf_counter()
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # `torchrun`, whether or not it is on PATH
    p = subprocess.run([*torchrun, "--nproc-per-node", str(ranks), "-m", "moeprune", *args,
                        "--out", str(work / "ddp.safetensors")], capture_output=True, text=True, timeout=240)
    ddp_s = time.perf_counter() - t0
    rc, one_s, _, _ = cli(*args, "--out", str(work / "one.safetensors"))
    if p.returncode or rc:
        raise RuntimeError(f"torchrun exit {p.returncode}, single exit {rc}: {p.stderr[-800:]}")
    a, b = ExpertStats.load(work / "ddp.safetensors"), ExpertStats.load(work / "one.safetensors")
    diff = max(float((a.sets[s][layer].sums[f] - b.sets[s][layer].sums[f]).abs().max())
               for s in a.sets for layer in a.sets[s] for f in a.sets[s][layer].sums)
    r = {"gpus": torch.cuda.device_count(), "ranks": ranks, "world_size": a.meta.get("world_size"), "ddp_s": ddp_s,
         "single_s": one_s, "max_abs_diff": diff}
    backend = "NCCL" if dev.startswith("cuda") else "gloo"
    LINES.append(f"\n### torchrun ({backend}) calibration, {ranks} rank(s), {r['gpus']} GPU(s)\n\nworld size "
                 f"{r['world_size']}, "
                 f"{ddp_s:.1f} s vs {one_s:.1f} s single-process; max |Δ| of every statistic: {diff:.2e}")
    return r


@section("quant")
def quant(dev: str, work: Path) -> dict:
    from moeprune import api
    from moeprune.models import get_adapter
    from moeprune.tiny import save_tiny

    # widths that vLLM's int4/int8 MoE kernels take (multiples of 128 / 64); the dry run keeps them small
    shape = {} if os.environ.get("GPU_CHECK_SMALL") else {"hidden_size": 256, "moe_intermediate_size": 128}
    group = "16" if os.environ.get("GPU_CHECK_SMALL") else "128"
    src, text = work / "src-q-qwen3_moe", calib_text(work)
    save_tiny("qwen3_moe", src, dtype=torch.bfloat16, with_tokenizer=True, **shape)
    rows = {}
    rc, s, _, log = cli("quantize", str(src), "--scheme", "w4a16", "--algorithm", "gptq", "--group-size", group,
                        "--calib", f"web={text}", "--device", dev, "--samples", "16", "--seq-len", "64",
                        "--out", str(work / "out-q4-qwen3_moe"), "--overwrite")
    rows["int4 gptq"] = {"rc": rc, "s": s, "log": log[-600:] if rc else ""}
    from transformers import AutoConfig

    moe = get_adapter(AutoConfig.from_pretrained(src)).moe_layers()
    bits = {layer: 8 if i % 2 else 4 for i, layer in enumerate(moe)}
    t0 = time.perf_counter()
    try:
        _, result = api.quantize(src, work / "out-qmix-qwen3_moe", scheme="w4a16", group_size=int(group), bits=bits,
                                 overwrite=True)
        rows["per-layer mixed"] = {"rc": 0 if result.passed else 1, "s": time.perf_counter() - t0,
                                   "verify": result.line()}
    except Exception as e:
        rows["per-layer mixed"] = {"rc": 1, "s": time.perf_counter() - t0, "log": f"{type(e).__name__}: {e}"[:600]}
    LINES.append("\n### quantize (compressed-tensors)\n\n| export | exit | s | detail |\n|---|---|---|---|\n"
                 + "\n".join(f"| {k} | {v['rc']} | {v['s']:.1f} | {(v.get('verify') or v.get('log', ''))[:110]} |"
                             for k, v in rows.items()))
    return rows


@section("verbs")
def verbs(dev: str, work: Path) -> dict:
    from gpu_verbs import verbs as run_verbs

    rows, table = run_verbs(dev, work)
    LINES.append(table)
    return rows


# --------------------------------------------------------------------------------------------------- vllm
# vLLM-friendly widths (head_dim 64, hidden and expert width 128: multiples its attention and fused-MoE kernels take);
# 200 steps train in ~30 s on one CPU core (the testbed trains on the CPU), the dry run uses 40

@section("vllm")
def vllm(dev: str, work: Path) -> dict:
    try:
        import vllm  # noqa: F401

        runtime, r = "vllm", {"available": True, "version": getattr(vllm, "__version__", "?")}
        LINES.append(f"\n### vLLM {r['version']}: log-probs vs transformers, generative tasks through lm-eval")
    except ImportError as e:
        print(f"vLLM is not importable here ({e}): transformers bf16 stands in for it (plumbing only)", flush=True)
        runtime, r = "transformers", {"available": False, "error": str(e)}
        LINES.append(f"\n### vLLM\nnot importable here ({e}); the device has no network, so `pip install vllm` "
                     "cannot run. **vLLM has not run.** Below, transformers bf16 stands in for it, so the rows "
                     "only show that the check itself works (and what bf16 alone moves).")
    r["runtime"] = runtime
    if CUDA:
        torch.cuda.empty_cache()
    r["free_GiB_before"] = free_gib()
    exports: list[tuple[str, Path, Path | None]] = []
    try:
        tb, pruned, gen = serve_testbed(dev, work)
        exports += [("testbed", tb, gen), ("testbed-pruned", pruned, gen)]
    except Exception as e:
        r["testbed_error"] = f"{type(e).__name__}: {e}"[-1500:]
    wanted = ["out-q4-qwen3_moe", "out-qmix-qwen3_moe", "out-qwen3_moe", "out-deepseek_v3", "out-gpt_oss"]
    exports += [(n, work / n, None) for n in wanted if (work / n / "config.json").is_file()]
    r["absent"] = [n for n in wanted if not (work / n / "config.json").is_file()]  # prune / quant did not run
    rows: dict = {}
    for name, path, gen_dir in exports:
        if left_s() < WORKER_MIN_S[runtime]:
            rows[name] = {"skipped": f"time budget ({left_s():.0f} s left)"}
            continue
        print(f"   {runtime}: {name}", flush=True)
        try:
            rows[name] = run_worker(runtime, name, path, dev, work, gen_dir)
        except Exception as e:
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
    r["rows"] = rows
    LINES.append(serve_tables(runtime, r))
    return r




def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check_work"))
    work.mkdir(parents=True, exist_ok=True)
    dev = os.environ.get("GPU_CHECK_DEVICE", "cuda")
    if dev.startswith("cuda") and not CUDA:
        sys.exit("gpu_check: no CUDA device is visible (GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 for a dry run)")
    import transformers

    import moeprune

    RESULTS["env"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                      "moeprune": moeprune.__file__, "device": torch.cuda.get_device_name(0) if CUDA else "cpu"}
    for extra in ("compressed_tensors", "lm_eval", "vllm"):  # what the quant and vllm sections need
        try:
            RESULTS["env"][extra] = getattr(__import__(extra), "__version__", "?")
        except Exception as e:
            RESULTS["env"][extra] = f"not importable: {type(e).__name__}: {e}"[:120]
    LINES.append(f"# moeprune GPU check\n{json.dumps(RESULTS['env'])}")
    only = set(os.environ.get("GPU_CHECK_ONLY", "calib,depth,prune,nccl,quant,verbs,vllm").split(","))
    for name, run in (("calib", lambda: calib(dev, out)), ("depth", lambda: depth(dev, work)),
                      ("prune", lambda: prune(dev, work)), ("nccl", lambda: nccl(dev, work)),
                      ("quant", lambda: quant(dev, work)), ("verbs", lambda: verbs(dev, work)),
                      ("vllm", lambda: vllm(dev, work))):
        if name in only:
            run()
            (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))
            (out / "gpu_check.md").write_text("\n".join(LINES) + f"\n\nseconds per section: {RESULTS['seconds']}\n")
    print("\n".join(LINES))


if __name__ == "__main__":
    main()
