"""Prune / merge / compare results for the analysis report: `results_sections(folders, out_dir)`.

Each folder is either a `moeprune compare` output (`compare.json` + `compare.png`: per-domain perplexity before and
after; with `compare --generate`, the generative task scores too) or a pruned / merged checkpoint folder
(`moeprune_report.json`: method, ratio, experts and bytes before and after, verification). Both kinds become report
sections (`analysis/html.py` schema); images are copied next to the report as `result_<n>_compare.png`. A steering
plan file from `moeprune steer --out` becomes a steering section (`analysis/steering.py`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moeprune.errors import MoePruneError


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MoePruneError(f"{path} is not readable JSON ({e}); pass a `moeprune compare --out` folder or a "
                            "pruned checkpoint folder.") from e


def check_results(folders: list[str | Path]) -> list[Path]:
    """Every --results folder holds compare.json or moeprune_report.json, or is a steering plan file (checked before
    any work)."""
    out = []
    for f in folders:
        p = Path(f).expanduser()
        if p.is_file():
            from moeprune.steer.plan import SteerPlan

            SteerPlan.load(p)  # a readable, valid plan (else its error)
            out.append(p)
            continue
        if not ((p / "compare.json").is_file() or (p / "moeprune_report.json").is_file()):
            raise MoePruneError(f"--results {p}: no compare.json or moeprune_report.json there; pass the folder "
                                "written by `moeprune compare --out` or by `moeprune prune/apply --out`, or a "
                                "steering plan from `moeprune steer --out`.")
        out.append(p)
    return out


def _compare_section(n: int, folder: Path, out_dir: Path) -> dict:
    data = _read(folder / "compare.json")
    images = []
    if (folder / "compare.png").is_file():
        name = f"result_{n}_compare.png"
        shutil.copyfile(folder / "compare.png", out_dir / name)
        images.append({"file": name, "caption": "perplexity ratio per domain (pruned / original)"})
    rows = [[r["domain"], r["perplexity_before"], r["perplexity_after"], r["perplexity_ratio"],
             r["accuracy_before"], r["accuracy_after"], r["tokens"]] for r in data.get("rows", [])]
    worst = max(data.get("rows", []), key=lambda r: r["perplexity_ratio"], default=None)
    text = [f"Held-out evaluation of both models on the same windows ({folder})."]
    if worst is not None:
        text.append(f"Largest loss: {worst['domain']} (perplexity ×{worst['perplexity_ratio']:.3f}).")
    tables = [{"caption": "per-domain perplexity and next-token accuracy",
               "columns": ["domain", "ppl before", "ppl after", "ppl ratio", "acc before", "acc after", "tokens"],
               "rows": rows}]
    gen = data.get("generative") or []
    if gen:  # `moeprune compare --generate`: greedy task scores next to the perplexity ratio
        tables.append({"caption": "generative tasks (greedy, fraction of items; the primary metric first)",
                       "columns": ["task", "metric", "before", "after", "Δ", "ppl ratio", "items"],
                       "rows": [[g["task"], g["metric"], g["before"], g["after"], g["after"] - g["before"],
                                 g["perplexity_ratio"], g["items"]] for g in gen]})
        worst_gen = min((g for g in gen if g["primary"]), key=lambda g: g["after"] - g["before"])
        text.append(f"Largest generative change: {worst_gen['task']} {worst_gen['metric']} "
                    f"{worst_gen['before']:.3f} → {worst_gen['after']:.3f}.")
    return {"id": f"result-{n}", "title": data.get("title", folder.name), "paragraphs": text, "images": images,
            "tables": tables}


def _report_section(n: int, folder: Path) -> dict:
    r = _read(folder / "moeprune_report.json")
    verify = r.get("verify") or {}
    before, after = r.get("weight_bytes_before"), r.get("weight_bytes_after")
    rows = [["method", r.get("method")], ["ratio", r.get("ratio")],
            ["experts per layer", f"{r.get('num_experts_before')} → {r.get('num_experts_after')}"],
            ["weight bytes", f"{before} → {after}" + (f" ({after / before:.1%})" if before and after else "")],
            ["verified", "—" if not verify else f"{'PASS' if verify.get('passed') else 'FAIL'} (max |Δlogit| "
                                                  f"{verify.get('max_abs_diff', float('nan')):.3g})"]]
    if r.get("merge"):
        rows.insert(2, ["merge / router", f"{r['merge']} / {r.get('router')}"])
    return {"id": f"result-{n}", "title": f"{folder.name}: {r.get('method')} at ratio {r.get('ratio')}",
            "paragraphs": [r.get("note") or "", f"Checkpoint {folder}, source {r.get('source')}."], "images": [],
            "tables": [{"caption": "what changed", "columns": ["", "value"], "rows": rows}]}


def results_sections(folders: list[str | Path], out_dir: Path) -> list[dict]:
    sections = []
    for n, folder in enumerate(check_results(folders), 1):
        if folder.is_file():
            from moeprune.analysis.steering import steering_section

            sections.append(steering_section(n, folder, out_dir))
        elif (folder / "compare.json").is_file():
            sections.append(_compare_section(n, folder, out_dir))
        else:
            sections.append(_report_section(n, folder))
    return sections
