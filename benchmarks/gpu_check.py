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
CUDA = torch.cuda.is_available()


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
def calib(dev: str) -> dict:
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
    r = {"tokens": tokens, "plain_s": a, "eager_s": a2, "collect_s": b, "collect_over_plain": b / a,
         "collect_over_eager": b / a2, "collect_peak_GiB": peak,
         "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    LINES.append("\n### Calibration vs a plain forward (bf16, one GPU)\n"
                 f"{r['params_M']:.0f} M parameters, 8 layers x {SHAPE['num_experts']} experts, {tokens} tokens, "
                 f"batch {B}.\n\n"
                 "| (a) plain forward | (a') eager experts | (b) collect, every statistic | (b)/(a) | (b)/(a') "
                 "| peak GiB (b) |\n|---|---|---|---|---|---|\n"
                 f"| {a:.3f} s | {a2:.3f} s | {b:.3f} s | {b / a:.2f} | {b / a2:.2f} | {peak:.2f} |")
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


def cli(*args: str, timeout: int = 240) -> tuple[int, float, str, str]:
    """Exit code, seconds, stdout, the end of stderr."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "moeprune", *args], capture_output=True, text=True, timeout=timeout)
    return p.returncode, time.perf_counter() - t0, p.stdout, p.stderr[-1500:]


@section("prune")
def prune(dev: str, work: Path) -> dict:
    from moeprune.tiny import save_tiny

    words = "the of and to in is was for on that with as by at from his her an which".split()
    g = torch.Generator().manual_seed(0)
    text = work / "web.txt"
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (20000,), generator=g)))
    rows = {}
    for family in ("qwen3_moe", "deepseek_v3", "gpt_oss"):
        src = save_tiny(family, work / f"src-{family}", dtype=torch.bfloat16, with_tokenizer=True)
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
    """torchrun (NCCL process group, one rank per GPU) calibration == the single-process calibration."""
    from moeprune.stats.store import ExpertStats

    src, text = work / "src-qwen3_moe", work / "web.txt"
    args = ["calibrate", str(src), "--calib", f"web={text}", "--samples", "16", "--seq-len", "64", "--device", dev,
            "--overwrite"]
    t0 = time.perf_counter()
    p = subprocess.run(["torchrun", "--nproc-per-node", str(torch.cuda.device_count()), "-m", "moeprune", *args,
                        "--out", str(work / "ddp.safetensors")], capture_output=True, text=True, timeout=240)
    ddp_s = time.perf_counter() - t0
    rc, one_s, _, _ = cli(*args, "--out", str(work / "one.safetensors"))
    if p.returncode or rc:
        raise RuntimeError(f"torchrun exit {p.returncode}, single exit {rc}: {p.stderr[-800:]}")
    a, b = ExpertStats.load(work / "ddp.safetensors"), ExpertStats.load(work / "one.safetensors")
    diff = max(float((a.sets[s][layer].sums[f] - b.sets[s][layer].sums[f]).abs().max())
               for s in a.sets for layer in a.sets[s] for f in a.sets[s][layer].sums)
    r = {"gpus": torch.cuda.device_count(), "world_size": a.meta.get("world_size"), "ddp_s": ddp_s,
         "single_s": one_s, "max_abs_diff": diff}
    LINES.append(f"\n### torchrun (NCCL) calibration, {r['gpus']} GPU(s)\n\nworld size {r['world_size']}, "
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
    src, text = work / "src-q-qwen3_moe", work / "web.txt"
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


# --------------------------------------------------------------------------------------------------- vllm
# vLLM-friendly widths (head_dim 64, hidden and expert width 128: multiples its attention and fused-MoE kernels take);
# 200 steps train in ~30 s on one CPU core (the testbed trains on the CPU), the dry run uses 40
SERVE_TESTBED = dict(vocab_size=512, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64,
                     num_experts=8, top_k=2, moe_intermediate_size=128, seq_len=64, batch_size=16,
                     steps=40 if os.environ.get("GPU_CHECK_SMALL") else 200, warmup=10, train_chars=100_000,
                     calib_chars=10_000, heldout_chars=20_000, tokenizer_chars=30_000)
GEN_ITEMS = 8  # per generative task (lm-eval `limit`, the native runner's items)
GEN_TASKS = ("arithmetic", "records", "python")
GREEDY_TOKENS = 16
# prefix caching off: older V1 releases refuse prompt_logprobs with it
VLLM_ARGS = dict(dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.2, seed=0, enable_prefix_caching=False)
START = time.perf_counter()
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "460"))  # gpu_check.sh kills the run at 480 s
WORKER_MIN_S = {"vllm": 60.0, "transformers": 20.0}  # skip an export when less is left
WORKER_MAX_S = 180.0


def left_s() -> float:
    return BUDGET_S - (time.perf_counter() - START)


def free_gib() -> float | None:
    """Free device memory (all processes), GiB."""
    return torch.cuda.mem_get_info()[0] / 2**30 if CUDA else None


def serve_testbed(dev: str, work: Path) -> tuple[Path, Path, Path]:
    """(small testbed, its frequency-pruned copy, the generative task folder of the testbed's held-out text)."""
    from moeprune.testbed import build_testbed
    from moeprune.testbed.train import TestbedConfig

    cfg = TestbedConfig(**SERVE_TESTBED)
    tb = build_testbed(work / f"testbed-{cfg.steps}", cfg=cfg)  # reused when it is there
    pruned, gen = work / f"testbed-{cfg.steps}-pruned", work / f"testbed-{cfg.steps}-gen"
    if not (pruned / "config.json").is_file():
        calib = [a for spec in tb.specs("calib") for a in ("--calib", spec)]
        rc, _, _, log = cli("prune", str(tb.path), "--method", "frequency", "--ratio", "0.25", *calib,
                            "--samples", "16", "--seq-len", str(cfg.seq_len), "--device", dev, "--out", str(pruned),
                            "--overwrite")
        if rc:
            raise RuntimeError(f"moeprune prune of the testbed: exit {rc}: {log}")
    if not (gen / "tasks.jsonl").is_file():
        rc, _, _, log = cli("gen-tasks", str(tb.path), "--out", str(gen), "--gen-items", str(GEN_ITEMS), "--overwrite")
        if rc:
            raise RuntimeError(f"moeprune gen-tasks: exit {rc}: {log}")
    return tb.path, pruned, gen


def lm_eval_run(lm, gen: Path) -> dict:
    """lm-eval's generate_until on the moeprune tasks of `gen` with `lm` -> {task: {metrics, completions}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from moeprune.eval.lm_eval_adapter import compact_results, offline
    from moeprune.eval.lm_eval_tasks import task_name

    names = [task_name(t) for t in GEN_TASKS]
    with offline():
        raw = lm_eval.simple_evaluate(model=lm, tasks=names, limit=GEN_ITEMS, log_samples=True,
                                      task_manager=TaskManager(include_path=str(gen), include_defaults=False))
    metrics = compact_results(raw["results"])
    return {t: {"metrics": {m: v for m, v in metrics[task_name(t)].items() if not m.endswith("_stderr")},
                "completions": {s["doc"]["prompt"]: s["filtered_resps"][0] for s in raw["samples"][task_name(t)]}}
            for t in GEN_TASKS}


def serve_one(runtime: str, model: Path, dev: str, out: Path, gen: Path | None) -> None:
    """One export in its own process (`--serve-one`): transformers float32 is the reference; the candidate is
    vLLM (bf16), or transformers bf16 standing in for it where vLLM is not importable. Writes `out` (JSON) after
    every step, so a crash or a timeout still leaves what was measured."""
    import gc

    from moeprune.calibration.run import load_tokenizer
    from moeprune.eval.gen_tasks import read_items
    from moeprune.eval.generative import evaluate_generative
    from moeprune.eval.logprobs import TOLERANCE, TOP_K, as_top_k, compare_logprobs, transformers_provider
    from moeprune.gguf.llama import VERIFY_TEXTS
    from moeprune.io.load import load_model

    res: dict = {"runtime": runtime}

    def save() -> None:
        out.write_text(json.dumps(res, default=str))

    def free() -> None:
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()

    t0 = time.perf_counter()
    tok = load_tokenizer(model, None)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in VERIFY_TEXTS]  # tokenised once, fed as ids
    items = [i for i in read_items(gen / "tasks.jsonl") if i["domain"] in GEN_TASKS] if gen else []
    f32 = load_model(model, dtype="float32", device=dev)
    ref = transformers_provider(f32)(prompts, TOP_K, GREEDY_TOKENS)

    def reference(p, k, g):
        return ref

    res["prompt_tokens"] = [len(p) for p in prompts]
    if items:  # the native runner (`moeprune eval --generate`), float32
        native = evaluate_generative(f32, tok, items, batch_size=8)
        res["native"] = {t: {"metrics": g.metrics, "completions": dict(zip([i["prompt"] for i in items
                                                                             if i["domain"] == t], g.completions,
                                                                            strict=True))}
                         for t, g in native.items()}
    del f32
    free()
    b16 = load_model(model, dtype="bfloat16", device=dev)
    base = compare_logprobs(reference, as_top_k(transformers_provider(b16)), prompts, runtime="transformers",
                            dtype="bfloat16", greedy_tokens=GREEDY_TOKENS)
    res["hf_bf16"] = base.to_dict()
    tolerance = max(TOLERANCE["bfloat16"], 2 * base.max_abs)  # a routing near-tie flips in bf16 (eval/logprobs.py)
    res["reference_s"] = time.perf_counter() - t0
    save()

    t0 = time.perf_counter()
    lm = None
    if runtime == "vllm":
        from moeprune.eval.logprobs import vllm_provider

        del b16
        free()
        max_len = min(512, int(json.loads((model / "config.json").read_text()).get("max_position_embeddings", 512)))
        args = {**VLLM_ARGS, "max_model_len": max_len}
        try:  # lm-eval's vLLM backend, built as simple_evaluate(model="vllm", model_args=...) builds it, holds the
            # one vllm.LLM of this process (`.model`); the log-prob check uses that one too
            from lm_eval.api.registry import get_model

            lm = get_model("vllm").create_from_arg_obj({"pretrained": str(model), **args}, {}) if items else None
            llm = lm.model if lm is not None else None
        except Exception as e:  # lm-eval missing or at odds with this vLLM: the log-prob check still runs
            res["lm_eval"] = {"error": f"lm-eval's vllm backend: {type(e).__name__}: {e}"[:500]}
            lm = llm = None
            free()
        if llm is None:
            from vllm import LLM

            llm = LLM(model=str(model), **args)
        candidate = vllm_provider(llm)
    else:
        candidate = as_top_k(transformers_provider(b16))
        if items:
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=b16, tokenizer=tok, batch_size=8, device=dev)
    res["load_s"] = time.perf_counter() - t0
    save()
    check = compare_logprobs(reference, candidate, prompts, runtime=runtime, dtype="bfloat16",
                             greedy_tokens=GREEDY_TOKENS, tolerance=tolerance)
    res["logprobs"], res["line"] = check.to_dict(), check.line()
    save()
    if lm is not None:
        t0 = time.perf_counter()
        res["lm_eval"] = lm_eval_run(lm, gen)
        res["lm_eval_s"] = time.perf_counter() - t0
        save()


def run_worker(runtime: str, name: str, model: Path, dev: str, work: Path, gen: Path | None) -> dict:
    """`serve_one` in a subprocess of its own session (vLLM's engine process included), killed as a group on
    timeout: every LLM instance starts on a device that the previous one has left."""
    import signal

    out, log = work / f"serve-{name}.json", work / f"serve-{name}.log"
    out.unlink(missing_ok=True)
    timeout = min(WORKER_MAX_S, left_s() - 5)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-one", runtime, str(model), dev, str(out),
           str(gen) if gen else "-"]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the worker's leftovers (a vLLM engine process), or itself
        except ProcessLookupError:
            pass
        p.wait()
    res = json.loads(out.read_text()) if out.is_file() else {}
    res.update(rc=rc, s=time.perf_counter() - t0, free_GiB_after=free_gib())
    if rc != 0 or "logprobs" not in res:
        res["log"] = log.read_text(errors="replace")[-1500:]
    return res


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


def _cell(text: str, n: int = 200) -> str:
    """The end of `text` as one markdown table cell."""
    return " ".join(str(text)[-n:].split()).replace("|", "\\|")


def _f(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def serve_tables(runtime: str, r: dict) -> str:
    name = "vLLM" if runtime == "vllm" else "stand-in"
    out = [f"\nCandidate: {name} (bf16); reference: transformers float32 on the same token ids (4 prompts, "
           f"`gguf.llama.VERIFY_TEXTS`, tokenised once). |Δ| over the top-5 and prompt-token log-probs the candidate "
           f"returns at every position; bound = max(0.25, 2 × transformers' own bf16 error on the same export); "
           f"greedy: {GREEDY_TOKENS} tokens. Free device memory before: {_f(r.get('free_GiB_before'), '.1f')} GiB.",
           "", f"| export | exit | s | {name} max \\|Δ logprob\\| | mean | transformers bf16 max \\|Δ\\| | bound "
           "| top-1 | identical greedy (tokens) | result | free GiB after |", "|" + "---|" * 11]
    for exp, v in r["rows"].items():
        lp, hf = v.get("logprobs") or {}, v.get("hf_bf16") or {}
        if "skipped" in v or "error" in v:
            out.append(f"| {exp} | — | — | {_cell(v.get('skipped') or v.get('error'))} |" + " |" * 7)
            continue
        failed = f"no result (exit {v['rc']}): {_cell(v.get('log') or '')}"
        result = ("PASS" if lp["passed"] else "FAIL") if lp else failed
        out.append(f"| {exp} | {v['rc']} | {v['s']:.0f} | {_f(lp.get('max_abs'), '.3f')} "
                   f"| {_f(lp.get('mean_abs'), '.1e')} | {_f(hf.get('max_abs'), '.3f')} "
                   f"| {_f(lp.get('tolerance'), '.2f')} | {_f(lp.get('top1'), '.3f')} "
                   f"| {lp.get('greedy_same', '—')}/{lp.get('prompts', '—')} ({_f(lp.get('greedy_match'), '.2f')}) "
                   f"| {result} | {_f(v.get('free_GiB_after'), '.1f')} |")
    gen_rows = []
    for exp, v in r["rows"].items():
        native, lm = v.get("native"), v.get("lm_eval")
        if not native:
            continue
        if not lm or "error" in lm:
            gen_rows.append(f"| {exp} | — | — | — | {_cell((lm or {}).get('error', 'no lm-eval result'))} | — |")
            continue
        for task, nv in native.items():
            lv = lm.get(task, {})
            comp = nv["completions"]
            same = f"{sum(lv.get('completions', {}).get(p) == c for p, c in comp.items())}/{len(comp)}"
            for metric, value in nv["metrics"].items():
                got = _f(lv.get("metrics", {}).get(metric), ".3f")
                gen_rows.append(f"| {exp} | {task} | {metric} | {value:.3f} | {got} | {same} |")
    if gen_rows:
        out += ["", f"Generative tasks ({GEN_ITEMS} items each, the same items): native runner (transformers float32,"
                f" `moeprune eval --generate`) vs lm-eval's {'vllm' if runtime == 'vllm' else 'hf (bf16)'} backend.",
                "", f"| export | task | metric | native | lm-eval {name} | identical completions |",
                "|---|---|---|---|---|---|", *gen_rows]
    if r.get("testbed_error"):
        out.append(f"\ntestbed: FAILED {r['testbed_error']}")
    if r.get("absent"):
        out.append(f"\nnot built here (the prune / quant sections did not run): {', '.join(r['absent'])}")
    return "\n".join(out)


def main() -> None:
    if sys.argv[1:2] == ["--serve-one"]:  # a subprocess of the vllm section
        runtime, model, dev, out_json, gen = sys.argv[2:7]
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # CUDA is initialised before vLLM starts
        serve_one(runtime, Path(model), dev, Path(out_json), None if gen == "-" else Path(gen))
        return
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check_work"))
    work.mkdir(parents=True, exist_ok=True)
    dev = os.environ.get("GPU_CHECK_DEVICE", "cuda")
    if dev.startswith("cuda") and not CUDA:
        sys.exit("gpu_check: no CUDA device is visible (GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 for a dry run)")
    import transformers

    import moeprune

    RESULTS["env"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                      "moeprune": moeprune.__file__, "device": torch.cuda.get_device_name(0) if CUDA else "cpu"}
    LINES.append(f"# moeprune GPU check\n{json.dumps(RESULTS['env'])}")
    only = set(os.environ.get("GPU_CHECK_ONLY", "calib,depth,prune,nccl,quant,vllm").split(","))
    for name, run in (("calib", lambda: calib(dev)), ("depth", lambda: depth(dev, work)),
                      ("prune", lambda: prune(dev, work)), ("nccl", lambda: nccl(dev, work)),
                      ("quant", lambda: quant(dev, work)), ("vllm", lambda: vllm(dev, work))):
        if name in only:
            run()
            (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))
            (out / "gpu_check.md").write_text("\n".join(LINES) + f"\n\nseconds per section: {RESULTS['seconds']}\n")
    print("\n".join(LINES))


if __name__ == "__main__":
    main()
