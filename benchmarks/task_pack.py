"""Task pack (PreMoe TAER) on the testbed: retrieval accuracy, quality of the retrieved models, memory and reads.

    python benchmarks/task_pack.py --out benchmarks/results/task_pack

One calibration run on the testbed's 4 calibration domains builds a pack with ratios 0.5 and 0.75 (share of routed
experts REMOVED per MoE layer), criterion tcess, keys from the first 2 MoE layers.

- Retrieval: held-out text of each domain, tokenised, cut into non-overlapping prompts of 32 and 128 tokens (up to
  200 per domain, evenly spread; fewer where the held-out text is shorter, reported), each matched to the nearest
  task key (cosine). Accuracy per domain and the margin distribution (best − second-best cosine; negative = the
  own domain is not the nearest). The same for keys of 1 and 4 MoE layers (task keys then = token-weighted mean of
  the calibration windows' keys) to show what the key depth buys.
- Quality: held-out perplexity (256-token windows) of every task's 50 % and 75 % model on every domain (a
  matrix: a wrong retrieval's cost is its off-diagonal entry), the retrieved model (majority vote of the domain's
  128-token prompts), the mixed-calibrated 50 % model (tcess on all 4 domains) and the original; ratios to the
  original.
- Memory: parameter bytes and process RSS (a fresh process per load, VmRSS after the load minus after importing
  moeprune and the model's modeling code), and bytes read from the shards: the full model (stock from_pretrained,
  and the task loader keeping every expert) against each task-loaded model; plus the retrieval's own reads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from heldout import HeldOut, results_path, save_results

from moeprune.api import make_plan
from moeprune.calibration.data import build_sets
from moeprune.calibration.run import calibrate
from moeprune.eval.perplexity import evaluate_sets
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.stock import auto_class
from moeprune.taskpack.build import BuildOptions, build_pack
from moeprune.taskpack.load import task_keys
from moeprune.taskpack.pack import TaskPack
from moeprune.taskpack.partial import full_plan, load_pruned, param_bytes
from moeprune.taskpack.retrieve import KeyEmbedder, nearest

RATIOS = (0.5, 0.75)


def prompts(tok, text: str, length: int, n: int) -> torch.Tensor:
    """[M, length] non-overlapping token windows of `text`, M = min(n, all), evenly spread over the text."""
    ids = torch.tensor(tok(text)["input_ids"])
    total = ids.numel() // length
    pick = torch.linspace(0, total - 1, min(n, total)).round().long().unique()
    return ids[: total * length].reshape(total, length)[pick]


def retrieval(h: HeldOut, pack: TaskPack, ckpt: Checkpoint, lengths: list[int], n: int) -> tuple[dict, dict]:
    """({K: {length: {domain: {accuracy, prompts, margins, chosen}}}}, {domain: majority task at 128})."""
    moe = list(range(4))  # every testbed layer is a MoE layer
    emb = KeyEmbedder(ckpt, moe, pack.routing_kind)
    E = pack.num_experts
    calib_keys = {}  # task keys of K layers = token-weighted mean of the calibration windows' keys
    for s in build_sets(h.calib.calib_config(), h.tokenizer):
        w = s.attention_mask.sum(1, keepdim=True).double()
        calib_keys[s.name] = (emb.keys(s.input_ids, s.attention_mask) * w).sum(0) / w.sum()  # [4E]
    out: dict = {}
    for K in (1, 2, 4):
        keys = task_keys(pack) if K == len(pack.key_layers) else {d: k[: K * E] for d, k in calib_keys.items()}
        out[K] = {}
        for length in lengths:
            out[K][length] = {}
            for d in h.domains:
                text = h.tb.data("heldout")[d].read_text()
                q = emb.keys(prompts(h.tokenizer, text, length, n))[:, : K * E]  # [M, K·E]
                matches = [nearest(keys, row) for row in q]
                own = [m.similarities[d] - max(v for t, v in m.similarities.items() if t != d) for m in matches]
                chosen = [m.task for m in matches]
                out[K][length][d] = {"prompts": len(matches), "accuracy": sum(c == d for c in chosen) / len(chosen),
                                     "own_margins": own, "chosen": {t: chosen.count(t) for t in set(chosen)}}
    top = max(lengths)
    majority = {d: max(r["chosen"], key=r["chosen"].get) for d, r in out[len(pack.key_layers)][top].items()}
    return out, majority


def quality(h: HeldOut, pack: TaskPack, ckpt: Checkpoint, stats) -> dict:
    """Perplexity ratios: every task model on every domain, per ratio; the mixed 50 % model."""
    res: dict = {"matrix": {}, "mixed_0.5": None, "original": {d: h.base[d].perplexity for d in h.domains}}
    for r in RATIOS:
        res["matrix"][r] = {}
        for task in pack.tasks:
            model, _ = load_pruned(ckpt, pack.task(task).plan(r), "float32")
            res["matrix"][r][task] = h.ratios(evaluate_sets(model, h.held))[0]
    mixed = make_plan(stats, pack.criterion, 0.5)  # every domain's statistics together
    model, _ = load_pruned(ckpt, mixed, "float32")
    res["mixed_0.5"] = h.ratios(evaluate_sets(model, h.held))[0]
    return res


def memory_child(pack: str, task: str, ratio: float) -> None:
    """One load in this fresh process; prints a JSON line of its memory numbers."""
    from streaming_apply import vm_kb

    torch.set_num_threads(1)
    from moeprune import load_model
    from moeprune.taskpack.load import load_for_task

    ckpt = Checkpoint.open(TaskPack.load(pack).checkpoint)
    auto_class(ckpt.config)._model_mapping[type(ckpt.config)]  # the modeling code imported before the baseline
    base = vm_kb("VmRSS")
    if task == "from_pretrained":
        model, nbytes = load_model(ckpt.path, dtype="float32"), ckpt.total_bytes  # reads every tensor
    elif task == "full":  # the task loader with every expert kept
        model, nbytes = load_pruned(ckpt, full_plan(ckpt), "float32")
    else:
        tm = load_for_task(pack, task=task, ratio=ratio, dtype="float32")
        model, nbytes = tm.model, tm.bytes_read
    print(json.dumps({"rss_mb": (vm_kb("VmRSS") - base) / 1e3, "param_mb": param_bytes(model) / 1e6,
                      "read_mb": nbytes / 1e6}))


def memory(pack_dir: Path, pack: TaskPack) -> dict:
    rows = {}
    for task, r in [("from_pretrained", 0.0), ("full", 0.0)] + [(t, r) for r in RATIOS for t in pack.tasks]:
        p = subprocess.run([sys.executable, __file__, "--memory-child", str(pack_dir), task, str(r)],
                           capture_output=True, text=True, check=True)
        rows[f"{task}@{r}"] = json.loads(p.stdout.strip().splitlines()[-1])
    return rows


def markdown(ret: dict, majority: dict, q: dict, mem: dict, retrieval_mb: dict, domains: list[str]) -> str:
    lines = ["## Retrieval accuracy (nearest task key, cosine)", "",
             "| key layers | prompt tokens | " + " | ".join(domains) + " | margin p05 / median (all) |",
             "|---:|---:|" + "---:|" * (len(domains) + 1)]
    for K, by_len in ret.items():
        for length, by_d in by_len.items():
            margins = torch.tensor([m for d in domains for m in by_d[d]["own_margins"]])
            cells = " | ".join(f"{by_d[d]['accuracy']:.3f} ({by_d[d]['prompts']})" for d in domains)
            lines.append(f"| {K} | {length} | {cells} | {margins.quantile(0.05):+.3f} / {margins.median():+.3f} |")
    lines += ["", "(prompts per domain in parentheses; margin = own-domain cosine − best other, negative = "
              "missed)", "", "## Held-out perplexity ratio to the original", "",
              "| model | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains),
              "| original (ppl) | " + " | ".join(f"{q['original'][d]:.2f}" for d in domains) + " |",
              "| mixed-calibrated 50 % | " + " | ".join(f"{q['mixed_0.5'][d]:.3f}" for d in domains) + " |"]
    for r in RATIOS:
        lines.append(f"| retrieved {int(r * 100)} % (task) | " + " | ".join(
            f"{q['matrix'][r][majority[d]][d]:.3f} ({majority[d]})" for d in domains) + " |")
        for task in q["matrix"][r]:
            lines.append(f"| {task} {int(r * 100)} % | " + " | ".join(f"{q['matrix'][r][task][d]:.3f}"
                                                                      for d in domains) + " |")
    lines += ["", "## Memory and reads", "", "| load | parameters MB | RSS above imports MB | read from shards MB |",
              "|---|---:|---:|---:|"]
    for k, v in mem.items():
        lines.append(f"| {k} | {v['param_mb']:.2f} | {v['rss_mb']:.1f} | {v['read_mb']:.2f} |")
    lines += ["", "Retrieval reads (embeddings + first key layers, experts of the last one skipped): "
              + ", ".join(f"{k} key layers {v:.2f} MB" for k, v in retrieval_mb.items())]
    return "\n".join(lines) + "\n"


def plot(ret: dict, q: dict, domains: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for i, r in enumerate(RATIOS):
        m = [[q["matrix"][r][t][d] for d in domains] for t in q["matrix"][r]]
        im = axes[i].imshow(m, cmap="viridis_r", norm=LogNorm(vmin=1.0, vmax=max(max(row) for row in m)))
        axes[i].set_xticks(range(len(domains)), domains, rotation=30)
        axes[i].set_yticks(range(len(m)), list(q["matrix"][r]))
        axes[i].set_xlabel("evaluated on"), axes[i].set_ylabel("task model")
        axes[i].set_title(f"ppl ratio (log colour), {int(r * 100)} % removed")
        for a in range(len(m)):
            for b in range(len(domains)):
                axes[i].text(b, a, f"{m[a][b]:.2f}", ha="center", va="center", fontsize=8,
                             color="black" if m[a][b] < 10 else "white")
        fig.colorbar(im, ax=axes[i], fraction=0.046)
    K = 2
    for length, style in zip(ret[K], ("--", "-"), strict=False):
        for d in domains:
            mg = sorted(ret[K][length][d]["own_margins"])
            axes[2].plot(mg, [j / len(mg) for j in range(len(mg))], style, label=f"{d} ({length} tok)")
    axes[2].axvline(0, color="black", linewidth=0.8)
    axes[2].set_xlabel("own-domain margin (cosine)"), axes[2].set_ylabel("CDF"), axes[2].legend(fontsize=7)
    axes[2].set_title("retrieval margin, 2 key layers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", help="testbed folder (default: the cached one, built when missing)")
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration windows per domain")
    ap.add_argument("--eval-sequences", type=int, default=64, help="held-out 256-token windows per domain")
    ap.add_argument("--prompts", type=int, default=200, help="retrieval prompts per domain and length")
    ap.add_argument("--out", default="benchmarks/results/task_pack", help="writes OUT.json, OUT.md and OUT.png")
    args = ap.parse_args()
    out = results_path(args.out)
    torch.set_num_threads(1)
    h = HeldOut.build(args.testbed, args.calib_samples, args.eval_sequences)
    stats = calibrate(h.tb.path, h.calib)  # one run: the pack's plans and the mixed plan
    with tempfile.TemporaryDirectory() as tmp:  # the pack itself is in OUT.json
        pack_dir = Path(tmp) / "pack"
        pack = build_pack(h.tb.path, h.calib, BuildOptions(RATIOS), pack_dir, stats=stats)
        ckpt = Checkpoint.open(h.tb.path)
        ret, majority = retrieval(h, pack, ckpt, [32, 128], args.prompts)
        retrieval_mb = {K: KeyEmbedder(ckpt, list(range(K)), pack.routing_kind).bytes_read / 1e6 for K in (1, 2, 4)}
        q = quality(h, pack, ckpt, stats)
        mem = memory(pack_dir, pack)
    result = {"retrieval": ret, "majority": majority, "quality": q, "memory": mem, "retrieval_mb": retrieval_mb,
              "pack": pack.to_dict()}
    save_results(out, result, markdown(ret, majority, q, mem, retrieval_mb, h.domains))
    plot(ret, q, h.domains, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
