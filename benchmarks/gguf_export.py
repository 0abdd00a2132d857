"""GGUF exports in llama.cpp (CPU): file sizes and tokens/s of the original and pruned testbed side by side, how
closely llama.cpp follows transformers per output type, and which families convert and run exactly.

    python benchmarks/gguf_export.py [--testbed DIR] [--ratios 0.25 0.5] [--reps 3] [--out OUT]

1. Speed and size: the testbed and its `tcess_top1` exports at each ratio (`api.prune`, calibrated on the
   testbed's calibration text), each converted to GGUF f16 and q8_0 (`moeprune export gguf`), then in llama.cpp
   with one thread: prompt processing of a 256-token held-out window (tokens/s) and 64 greedy tokens after it
   (tokens/s). Models are timed in turn, `--reps` rounds; the median of each, and its ratio to the original's,
   comes from the same run.
2. Fidelity per output type on the testbed (its weights are f32): `verify_gguf` — max |Δlogit| / max |logit|,
   top-1 agreement, identical 16-token greedy continuations, against stock transformers on the same ids.
3. Families: a tiny random model of each (`gguf/tiny.py`), converted to f32 and compared the same way; refusals
   and converter failures are listed with their reason.

Writes OUT.json and OUT.md, prints the markdown. Pins one thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from heldout import results_path, save_results

from moeprune import api
from moeprune.calibration.run import CalibrateOptions, load_tokenizer
from moeprune.errors import MoePruneError
from moeprune.gguf import GgufOptions, export_gguf
from moeprune.gguf.llama import LlamaCpp, verify_gguf
from moeprune.gguf.tiny import save_tiny_for_gguf
from moeprune.testbed import build_testbed

FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss",
            "granitemoe", "llama4_text", "dots1", "qwen3_next", "minimax", "phimoe")
# released models' settings where the tiny default differs and llama.cpp hard-codes them (see gguf/families.py);
# gpt-oss runs twice: with its own YaRN setting (truncate false, which llama.cpp does not follow) and truncate true
RELEASED = {"qwen3_moe": {"norm_topk_prob": True}}
YARN_TRUNCATED = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                      "beta_slow": 1.0, "truncate": True, "original_max_position_embeddings": 4096}}
PROMPT_TOKENS, GEN_TOKENS = 256, 64


def speed(path: Path, ids: list[int]) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of one llama.cpp run on one thread."""
    llm = LlamaCpp(path, n_ctx=PROMPT_TOKENS + GEN_TOKENS + 8)
    llm.llm.reset()
    t0 = time.perf_counter()
    llm.llm.eval(ids)
    t1 = time.perf_counter()
    _generate(llm, GEN_TOKENS)
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), GEN_TOKENS / (t2 - t1)


def _generate(llm: LlamaCpp, n: int) -> None:
    """n greedy steps after what the context holds (argmax of the last row, fed back)."""
    import numpy as np

    for _ in range(n):
        llm.llm.eval([int(np.argmax(llm.llm.scores[llm.llm.n_tokens - 1]))])


def speed_table(tb, ratios: list[float], reps: int, work: Path) -> list[dict]:
    calib = CalibrateOptions(tb.specs("calib"), samples=64, seq_len=tb.seq_len, held_out=0)
    models = {"original": tb.path}
    for r in ratios:
        out = work / f"tcess_top1-{r}"
        api.prune(tb.path, out, method="tcess_top1", ratio=r, calib=calib)
        models[f"tcess_top1 {r:.0%}"] = out
    tok = load_tokenizer(tb.path, None)
    text = Path(tb.specs("heldout")[0].split("=", 1)[1]).read_text()
    ids = tok(text, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
    files = {}
    for name, folder in models.items():
        for outtype in ("f16", "q8_0"):
            files[(name, outtype)] = export_gguf(folder, work / f"{name.replace(' ', '_')}-{outtype}.gguf",
                                                 GgufOptions(outtype=outtype))
    times: dict[tuple, list[tuple[float, float]]] = {k: [] for k in files}
    for _ in range(reps):
        for key, summary in files.items():
            times[key].append(speed(Path(summary.path), ids))
    rows = []
    for (name, outtype), summary in files.items():
        pp = statistics.median(t[0] for t in times[(name, outtype)])
        tg = statistics.median(t[1] for t in times[(name, outtype)])
        base = files[("original", outtype)]
        bpp = statistics.median(t[0] for t in times[("original", outtype)])
        btg = statistics.median(t[1] for t in times[("original", outtype)])
        rows.append({"model": name, "outtype": outtype, "experts": summary.experts, "bytes": summary.bytes,
                     "size_ratio": summary.bytes / base.bytes, "prompt_tok_s": pp, "gen_tok_s": tg,
                     "prompt_ratio": pp / bpp, "gen_ratio": tg / btg})
    return rows


def fidelity_table(tb, work: Path) -> list[dict]:
    rows = []
    for outtype in ("f32", "f16", "bf16", "q8_0"):
        summary = export_gguf(tb.path, work / f"tb-{outtype}.gguf", GgufOptions(outtype=outtype))
        check = verify_gguf(tb.path, summary.path, outtype)
        rows.append({"outtype": outtype, "bytes": summary.bytes, "rel": check.rel, "top1": check.top1,
                     "greedy_same": f"{check.greedy_same}/{check.prompts}", "tolerance": check.tolerance,
                     "passed": check.passed})
    return rows


def family_table(work: Path) -> list[dict]:
    rows = []
    cases = [(f, f, RELEASED.get(f, {})) for f in FAMILIES] + [("gpt_oss (YaRN truncate true)", "gpt_oss",
                                                                  YARN_TRUNCATED)]
    for label, family, overrides in cases:
        row = {"family": label}
        try:
            src = save_tiny_for_gguf(family, work / label.replace(" ", "_"), seed=3, **overrides)
            summary = export_gguf(src, src.with_suffix(".gguf"), GgufOptions(outtype="f32"))
            check = verify_gguf(src, summary.path, "f32")
            row.update(arch=summary.arch, experts=summary.experts, rel=check.rel, top1=check.top1,
                       greedy_same=f"{check.greedy_same}/{check.prompts}", result="PASS" if check.passed else "FAIL")
        except (MoePruneError, ValueError, RuntimeError) as e:
            first = str(e).split("\n")[0]
            row.update(result="refused" if "cannot convert" in first else "error", why=str(e)[-300:])
        rows.append(row)
        print(f"  {label}: {row['result']}", file=sys.stderr)
    return rows


def to_markdown(res: dict) -> str:
    lines = ["# GGUF exports in llama.cpp (CPU, one thread)", "",
             f"llama-cpp-python {res['llama_cpp_python']}; prompt {PROMPT_TOKENS} held-out tokens, then {GEN_TOKENS} "
             f"greedy tokens; median of {res['reps']} rounds, models timed in turn.", "",
             "| model | type | experts | GGUF MB | size × | prompt tok/s | × | gen tok/s | × |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["speed"]:
        lines.append(f"| {r['model']} | {r['outtype']} | {r['experts']} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['size_ratio']:.3f} | {r['prompt_tok_s']:.0f} | {r['prompt_ratio']:.2f} | "
                     f"{r['gen_tok_s']:.0f} | {r['gen_ratio']:.2f} |")
    lines += ["", "## llama.cpp vs transformers on the testbed, per output type", "",
              "| type | GGUF MB | max abs Δlogit / max abs logit | top-1 agreement | identical greedy | tolerance | |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for r in res["fidelity"]:
        lines.append(f"| {r['outtype']} | {r['bytes'] / 1e6:.2f} | {r['rel']:.2e} | {r['top1']:.3f} | "
                     f"{r['greedy_same']} | {r['tolerance']:.2g} | {'PASS' if r['passed'] else 'FAIL'} |")
    lines += ["", "## Families (tiny random models, f32)", "",
              "| family | result | arch | max abs Δlogit / max abs logit | top-1 | identical greedy | reason |",
              "|---|---|---|---:|---:|---:|---|"]
    for r in res["families"]:
        rel = f"{r['rel']:.1e}" if "rel" in r else ""
        top1 = f"{r['top1']:.3f}" if "top1" in r else ""
        why = r.get("why", "").replace("\n", " ").replace("|", "/")[-160:]
        lines.append(f"| {r['family']} | {r['result']} | {r.get('arch', '')} | {rel} | {top1} | "
                     f"{r.get('greedy_same', '')} | {why} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", help="testbed folder (default: the cached one; built if missing)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/gguf_export")
    args = ap.parse_args(argv)
    out = results_path(args.out)
    torch.set_num_threads(1)
    from importlib.metadata import version

    tb = build_testbed(args.testbed)
    with tempfile.TemporaryDirectory(prefix="moeprune-gguf-") as tmp:
        work = Path(tmp)
        res = {"llama_cpp_python": version("llama-cpp-python"), "reps": args.reps,
               "speed": speed_table(tb, args.ratios, args.reps, work), "fidelity": fidelity_table(tb, work),
               "families": family_table(work / "families")}
    save_results(out, res, to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
