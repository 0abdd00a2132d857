"""`moeprune compare ORIGINAL PRUNED --data ...`: the same held-out windows through both models; a before/after
table (terminal), `compare.md`, `compare.json` and `compare.png` (perplexity ratio per domain) in `--out`.

    ppl ratio = perplexity(PRUNED) / perplexity(ORIGINAL)   (1.00 = no loss; lower is better)
    Δ accuracy = accuracy(PRUNED) − accuracy(ORIGINAL)

With `--generate` (EvalOptions.generate), both models also run the generative tasks on the same items; a second
table lists each task's metrics before / after (fractions of items, greedy; primary metric first) next to the
perplexity ratio of the domain of the same name; compare.json holds them under "generative". The plot stays the
perplexity ratio.

With `--steer PLAN` (EvalOptions.steer) only the second model is steered: `compare MODEL MODEL --steer PLAN`
measures a steering plan's effect. Likewise `--pack PACK --task auto|NAME --task-ratio R` scores the second model
through the task pack: `compare MODEL MODEL --pack PACK` measures the task-loaded models against the full one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from moeprune.eval.generative import GenScore
from moeprune.eval.perplexity import DomainScore
from moeprune.eval.run import EvalOptions, evaluate, steer_plan
from moeprune.io.atomic import atomic_dir, check_output
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.report import read_report
from moeprune.log import logger


@dataclass
class Comparison:
    before: dict[str, DomainScore]
    after: dict[str, DomainScore]
    title: str
    gen_before: dict[str, GenScore] = field(default_factory=dict)
    gen_after: dict[str, GenScore] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        return [{"domain": d, "perplexity_before": b.perplexity, "perplexity_after": self.after[d].perplexity,
                 "perplexity_ratio": self.after[d].perplexity / b.perplexity, "accuracy_before": b.accuracy,
                 "accuracy_after": self.after[d].accuracy, "tokens": b.tokens} for d, b in self.before.items()]

    def generative_rows(self) -> list[dict]:
        """One row per (task, metric), the primary metric first: before, after, items, and the perplexity ratio of
        the domain named after the task (None when no --data set has its name)."""
        out = []
        for task, b in self.gen_before.items():
            a, ppl = self.gen_after[task], self.before.get(task)
            ratio = self.after[task].perplexity / ppl.perplexity if ppl is not None else None
            for m in [b.primary] + [k for k in b.metrics if k != b.primary]:
                out.append({"task": task, "metric": m, "primary": m == b.primary, "before": b.metrics[m],
                            "after": a.metrics[m], "items": b.items, "perplexity_ratio": ratio})
        return out

    def markdown(self) -> str:
        lines = [f"# {self.title}", "", "| domain | ppl before | ppl after | ppl ratio | acc before | acc after | "
                 "Δ acc | tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows():
            lines.append(f"| {r['domain']} | {r['perplexity_before']:.3f} | {r['perplexity_after']:.3f} | "
                         f"{r['perplexity_ratio']:.3f} | {r['accuracy_before']:.3f} | {r['accuracy_after']:.3f} | "
                         f"{r['accuracy_after'] - r['accuracy_before']:+.3f} | {r['tokens']} |")
        gen = self.generative_rows()
        if gen:
            lines += ["", "Generative tasks (greedy; fraction of items; docs/generation.md):", "",
                      "| task | ppl ratio | metric | before | after | Δ | items |",
                      "|---|---:|---|---:|---:|---:|---:|"]
            for r in gen:
                ratio = "" if r["perplexity_ratio"] is None or not r["primary"] else f"{r['perplexity_ratio']:.3f}"
                name = f"**{r['metric']}**" if r["primary"] else r["metric"]
                lines.append(f"| {r['task']} | {ratio} | {name} | {r['before']:.3f} | {r['after']:.3f} | "
                             f"{r['after'] - r['before']:+.3f} | {r['items']} |")
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2.5, 3.2))
        ratios = [r["perplexity_ratio"] for r in rows]
        ax.bar([r["domain"] for r in rows], ratios, color=["#c44e52" if x > 1.1 else "#4c72b0" for x in ratios])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("perplexity ratio (pruned / original)")
        ax.set_title(self.title, fontsize=9)
        for i, x in enumerate(ratios):
            ax.text(i, x, f"{x:.2f}", ha="center", va="bottom", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def compare(original: str | Path, pruned: str | Path, opts: EvalOptions, out: str | Path,
            overwrite: bool = False) -> Comparison:
    src, dst = Checkpoint.open(original), Checkpoint.open(pruned)
    out_path = check_output(out, [src.path, dst.path], overwrite)
    opts = opts.for_model(src.path, dst.path)
    opts.data_config()  # sources exist before anything loads
    report = read_report(dst.path) or {}
    title = f"{dst.path.name} vs {src.path.name}"
    if report.get("method"):
        title += f" — {report['method']} at ratio {report.get('ratio')}"
    opts.gen_items_list()  # generative items exist (or --generate is refused) before anything loads
    steer_plan(opts.steer, dst)  # a bad plan is refused before either model loads
    if opts.steer is not None:  # the plan steers the second model only: `compare M M --steer plan` shows its effect
        title += f" — steered by {Path(opts.steer).name}"
    request = opts.pack_request()
    if request is not None:  # the pack serves the second model only, checked before either model loads
        request.check(dst)
        title += f" — task pack {Path(opts.pack).name}, task {request.task}, ratio {request.ratio or 'default'}"
    # --routing applies to the export side only too: `compare MODEL MODEL --routing P` measures the policy itself
    plain = replace(opts, steer=None, routing=None, pack=None, task=None, task_ratio=None)
    before, after = evaluate(src.path, plain), evaluate(dst.path, opts)
    if after.routing:
        title += f" — routing {after.routing['policy']}"
    result = Comparison(before.scores, after.scores, title, before.generative, after.generative)
    data = {"title": title, "rows": result.rows()}
    if after.routing:
        data["routing"] = after.routing
    if after.task:
        data["task"] = after.task
    if result.gen_before:
        data["generative"] = result.generative_rows()
    with atomic_dir(out_path) as tmp:
        (tmp / "compare.md").write_text(result.markdown())
        (tmp / "compare.json").write_text(json.dumps(data, indent=1))
        result.plot(tmp / "compare.png")
    logger.info("comparison written to %s (compare.md, compare.json, compare.png)", out_path)
    return result
