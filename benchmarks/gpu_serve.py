"""The serving half of `benchmarks/gpu_check.py`'s vllm section: a small testbed for it, one subprocess per export
(`python benchmarks/gpu_serve.py --serve-one RUNTIME MODEL DEVICE OUT.json GEN|-`) that loads the export in vLLM
(or transformers bf16 as a stand-in), compares log-probs with transformers and runs the generative tasks through
lm-eval, and the markdown tables. See gpu_check.py's docstring for what is measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()


def cli(*args: str, timeout: int = 240) -> tuple[int, float, str, str]:
    """Exit code, seconds, stdout, the end of stderr."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "moeprune", *args], capture_output=True, text=True, timeout=timeout)
    return p.returncode, time.perf_counter() - t0, p.stdout, p.stderr[-1500:]


def calib_text(work: Path) -> Path:
    """A calibration text file under `work` (20 000 random common words), made once."""
    text = work / "web.txt"
    if not text.is_file():
        words = "the of and to in is was for on that with as by at from his her an which".split()
        g = torch.Generator().manual_seed(0)
        text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (20000,), generator=g)))
    return text


def tiny_inputs(work: Path, family: str) -> tuple[Path, Path]:
    """(a tiny bf16 `family` checkpoint with a tokenizer, a calibration text file) under `work`, made once."""
    from moeprune.tiny import save_tiny

    text, src = calib_text(work), work / f"src-{family}"
    if not (src / "config.json").is_file():
        save_tiny(family, src, dtype=torch.bfloat16, with_tokenizer=True)
    return src, text



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
            try:
                from lm_eval.models.huggingface import HFLM

                lm = HFLM(pretrained=b16, tokenizer=tok, batch_size=8, device=dev)
            except Exception as e:  # lm-eval missing here: the log-prob check still runs
                res["lm_eval"] = {"error": f"lm-eval's hf backend: {type(e).__name__}: {e}"[:500]}
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



if __name__ == "__main__" and sys.argv[1:2] == ["--serve-one"]:  # a subprocess of gpu_check's vllm section
    runtime, model, dev, out_json, gen = sys.argv[2:7]
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # CUDA is initialised before vLLM starts
    serve_one(runtime, Path(model), dev, Path(out_json), None if gen == "-" else Path(gen))
