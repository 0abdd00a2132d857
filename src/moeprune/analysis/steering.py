"""The steering section of the analysis report: a `moeprune steer` plan passed to `analyze --results PLAN.json`.

Shows how the experts were found (sides, tokens, the fTRI formula), the plan's experts with their contrast (routing
frequency and gate mass with / without the behaviour, z-score), the next-ranked experts outside the plan, the
plan's measured effect (perplexity per set without / with it, when `steer` measured it) and a heatmap of Δf per
layer and expert with the plan's experts marked (`steer_<n>.png`).
"""

from __future__ import annotations

from pathlib import Path

from moeprune.steer.plan import SteerPlan

NEXT_RANKED = 5


def _row(r: dict, action: str) -> list:
    return [r["layer"], f"e{r['expert']}", action, r["freq_with"], r["freq_without"], r["d_freq"], r["mass_with"],
            r["mass_without"], r["d_mass"], r["z"]]


COLUMNS = ["layer", "expert", "action", "f with", "f without", "Δf", "gate with", "gate without", "Δ gate", "z"]


def _plot(plan: SteerPlan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = list(plan.layers)
    grid = np.zeros((len(layers), plan.num_experts))  # [L, E] Δf
    for r in plan.experts or []:
        grid[layers.index(r["layer"]), r["expert"]] = r["d_freq"]
    lim = max(float(np.abs(grid).max()), 1e-9)
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.35 * plan.num_experts), 1.2 + 0.35 * len(layers)))
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for e in plan.steer:
        ax.text(e.expert, layers.index(e.layer), "×" if e.action == "off" else "+", ha="center", va="center",
                fontsize=9, color="black")
    ax.set_yticks(range(len(layers)), [str(la) for la in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("Δ routing frequency (with − without); × switched off, + forced on", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def steering_section(n: int, path: Path, out_dir: Path) -> dict:
    plan = SteerPlan.load(path)
    info = {(r["layer"], r["expert"]): r for r in plan.experts or []}
    chosen = {(e.layer, e.expert): e for e in plan.steer}
    c = plan.contrast or {}
    text = [f"Steering plan {path}: {len(plan.steer)} experts ({plan.describe()})."]
    if c:
        text.append(f"Found by the fTRI contrast of {', '.join(c.get('with', []))} ({c.get('tokens_with')} tokens, "
                    f"with the behaviour) against {', '.join(c.get('without', []))} ({c.get('tokens_without')} "
                    f"tokens): {c.get('formula', '')}.")
    text.append("'off' experts are never routed; 'on' experts get +strength on their router score (the logits, or "
                "the sigmoid scores of sigmoid_grouped routers) before the model's own top-k and renormalisation.")
    tables = []
    rows = [_row(info[(e.layer, e.expert)], e.action + (f" +{e.strength:g}" if e.action == "on" else ""))
            for e in plan.steer if (e.layer, e.expert) in info]
    if rows:
        tables.append({"caption": "the plan's experts and their contrast", "columns": COLUMNS, "rows": rows})
    rest = [r for r in plan.experts or [] if (r["layer"], r["expert"]) not in chosen][:NEXT_RANKED]
    if rest:
        tables.append({"caption": f"the next {len(rest)} experts by Δf (not in the plan)", "columns": COLUMNS,
                       "rows": [_row(r, "—") for r in rest]})
    effect = (plan.effect or {}).get("sets") or {}
    if effect:
        tables.append({"caption": f"effect: {plan.effect.get('note', '')}",
                       "columns": ["set", "side", "ppl without plan", "ppl with plan", "ratio", "windows"],
                       "rows": [[name, "with" if name in c.get("with", []) else "without", s["perplexity_before"],
                                 s["perplexity_after"], s["ratio"], s["windows"]] for name, s in effect.items()]})
        worst = max(effect.items(), key=lambda kv: kv[1]["ratio"])
        text.append(f"Measured effect: the largest perplexity change is {worst[0]} (×{worst[1]['ratio']:.3f}).")
    else:
        text.append("No measured effect in the plan (no held-apart windows); measure it with `moeprune compare "
                    "MODEL MODEL --steer PLAN --data ...` and add that folder with --results.")
    images = []
    if plan.experts:
        name = f"steer_{n}.png"
        _plot(plan, out_dir / name)
        images.append({"file": name, "caption": "fTRI contrast per layer and expert; the plan's experts marked"})
    return {"id": f"result-{n}", "title": f"Steering: {path.name}", "paragraphs": text, "images": images,
            "tables": tables}
