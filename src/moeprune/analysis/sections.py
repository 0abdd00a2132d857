"""The analysis as a report for the HTML renderer (`moeprune.analysis.html.render_html`), also saved as report.json:

    {"title": str, "subtitle": str,
     "sections": [{"id": str, "title": str, "paragraphs": [str], "images": [{"file": "usage.png", "caption": str}],
                   "tables": [{"caption": str, "columns": [str], "rows": [[str | float | int]]}]}]}

Image files are relative to the output folder. Built only from analysis.json's dict, so it can be rebuilt later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeprune.analysis.offload import offload_section

Section = dict[str, Any]


def _r(x: float | None, digits: int = 4) -> float | str:
    return "–" if x is None else round(float(x), digits)


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _section(sid: str, title: str, paragraphs: list[str], images: dict[str, str], image: str | None = None,
             caption: str = "", tables: list[dict[str, Any]] | None = None) -> Section:
    imgs = [{"file": images[image], "caption": caption}] if image and image in images else []
    return {"id": sid, "title": title, "paragraphs": paragraphs, "images": imgs, "tables": tables or []}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def overview(a: dict[str, Any], images: dict[str, str]) -> Section:
    layers, paras = a["layers"], []
    p, loc, bal = a["probe"], a.get("locality", {}), a["balance"]["all"]
    if "cliff" in p:
        below = [r for r in p["ratios"] if all(c is None or r < c for c in p["cliff"])]
        groups = {c: [str(layer) for layer, x in zip(layers, p["cliff"], strict=True) if x == c]
                  for c in dict.fromkeys(sorted(p["cliff"], key=lambda c: (c is None, c or 0)))}
        where = "; ".join(f"{'no cliff' if c is None else f'cliff at ratio {c:g}'}: layer{'s' * (len(ls) > 1)} "
                          f"{', '.join(ls)}" for c, ls in groups.items())
        paras.append(f"Redundancy probe (cliff = the cheapest plan's measured MoE-output error exceeds "
                     f"{p['cliff_threshold']:g}): {where}. "
                     + (f"Every layer stays below it up to ratio {max(below):g}." if below else
                        f"Some layer is past it already at ratio {p['ratios'][0]:g}."))
    else:
        paras.append(f"Predicted cost of the cheapest plan at ratio {p['ratios'][-1]:g}: "
                     f"{_pct(_mean([row[-1] for row in p['predicted']]))} of the routed output mass on average; "
                     "the measured cost needs the model (see notes).")
    if "verdict" in loc:
        paras.append(f"Pruning or offloading: {loc['verdict']['text']}")
    if "cv" in bal:
        paras.append(f"Load balance: normalised usage entropy {min(bal['entropy_normalized']):.3f}–"
                     f"{max(bal['entropy_normalized']):.3f}, CV {min(bal['cv']):.2f}–{max(bal['cv']):.2f} over the "
                     "layers (1 and 0 = perfectly balanced).")
    spec = a["specialisation"]
    if "layer" in spec:
        paras.append(f"Specialisation: layer domain specificity {min(spec['layer']):.2f}–{max(spec['layer']):.2f} "
                     f"(0 = every domain uses each expert alike, 1 = each expert serves one domain).")
    found = [f"layer {layer}: {', '.join(f'e{e}' for e in es)}" for layer, es in
             zip(layers, a["super_experts"]["experts"], strict=True) if es]
    paras.append(f"Super experts (never drop them): {'; '.join(found)}." if found else "No super experts found.")
    paras.extend(a.get("notes", []))
    return _section("overview", "Overview", paras, images)


def usage_section(a: dict[str, Any], images: dict[str, str]) -> Section:
    rows = []
    for d, m in a["usage"]["per_domain"].items():
        for i, layer in enumerate(a["layers"]):
            top = sorted(range(len(m[i])), key=lambda e: -m[i][e])[:3]
            rows.append([layer, d, ", ".join(f"e{e} {m[i][e]:.2f}" for e in top)])
    return _section(
        "usage", "Expert usage per domain",
        [f"usage = count / tokens: the fraction of a domain's tokens whose top-{a['top_k']} holds the expert (each "
         f"row sums to {a['top_k']}; uniform routing gives {a['top_k'] / a['num_experts']:.3f}). The last panel "
         "shows how specific each expert is to one domain and which domain owns it."],
        images, "usage", "usage per domain (layers × experts) and domain specificity per expert",
        [{"caption": "three most used experts per layer and domain", "columns": ["layer", "domain", "top experts"],
          "rows": rows}])


def balance_section(a: dict[str, Any], images: dict[str, str]) -> Section:
    bal = a["balance"]
    doms = [d for d, v in bal["per_domain"].items() if "cv" in v]
    cols = ["layer", "entropy (bits)", "entropy / log2 E", "CV"] + [f"{d} {k}" for d in doms for k in ("H/log2E",
                                                                                                       "CV")]
    rows = []
    if "cv" in bal["all"]:
        for i, layer in enumerate(a["layers"]):
            rows.append([layer, _r(bal["all"]["entropy_bits"][i]), _r(bal["all"]["entropy_normalized"][i]),
                         _r(bal["all"]["cv"][i])]
                        + [_r(bal["per_domain"][d][k][i]) for d in doms for k in ("entropy_normalized", "cv")])
    return _section(
        "balance", "Load balance",
        [f"Usage entropy H = −Σ p log2 p of the expert-usage distribution (at most log2 E = "
         f"{bal['entropy_max_bits']:.2f} bits) and CV = σ/μ of the expert counts. Low entropy / high CV: a few "
         "experts carry the layer and the rarely used ones are cheap to drop."],
        images, "balance", "normalised usage entropy and CV per layer",
        [{"caption": "load balance per layer (all domains, then each domain)", "columns": cols, "rows": rows}])


def specialisation_section(a: dict[str, Any], images: dict[str, str]) -> Section:
    spec = a["specialisation"]
    if "skipped" in spec:
        return _section("specialisation", "Specialisation", [spec["skipped"]], images)
    doms = list(spec["owned"])
    rows = [[layer, _r(spec["layer"][i])]
            + [f"{len(spec['owned'][d][i])} ({', '.join(f'e{e}' for e in spec['specialists'][d][i]) or '–'})"
               for d in doms] for i, layer in enumerate(a["layers"])]
    return _section(
        "specialisation", "Specialisation",
        ["Domain specificity of expert e = 1 − H(q[·|e]) / log2 D, where q[d|e] is e's share of the per-token rates "
         "of the D domains; the owner is the domain with the largest share; layer score = usage-weighted mean. "
         f"Experts with specificity ≥ {spec['specialist_threshold']:g} are listed as their owner's specialists: "
         "dropping one hurts that domain most. The last panel of the usage figure maps specificity and owners."],
        images, tables=[{"caption": "layer specificity; experts owned per domain (specialists in brackets)",
          "columns": ["layer", "specificity"] + doms, "rows": rows}])


def coactivation_section(a: dict[str, Any], images: dict[str, str]) -> Section:
    co = a["coactivation"]
    rows = [[layer, f"e{t['experts'][0]} + e{t['experts'][1]}", _r(t["lift"], 3), t["count"]]
            for i, layer in enumerate(a["layers"]) for t in co["top_pairs"][i]]
    return _section(
        "coactivation", "Co-activation",
        ["lift[i, j] = P(i and j in the same token's top-k) / (P(i) P(j)); 1 = independent. Pairs with a high lift "
         "work together (candidates for merging rather than dropping one of them)."],
        images, "coactivation", "log2 lift of a few layers (all layers are in analysis.json)",
        [{"caption": f"top pairs per layer (seen at least {co['min_pair_count']} times)",
          "columns": ["layer", "pair", "lift", "tokens"], "rows": rows}])


def supers_section(a: dict[str, Any], images: dict[str, str]) -> Section:
    s = a["super_experts"]
    rows = [[layer, ", ".join(f"e{e}" for e in s["experts"][i]) or "–", _r(max(s["max_abs"][i]), 3),
             _r(sorted(s["max_abs"][i])[len(s["max_abs"][i]) // 2], 3)] for i, layer in enumerate(a["layers"])]
    return _section(
        "super_experts", "Super experts",
        [f"Experts whose largest |output| exceeds τ = max(99.5th percentile, max/10) = {s['threshold']:.4g} over all "
         "layers (REAP): removing one breaks the model whatever its average score; `--protect-super` keeps them."],
        images, "super_experts", "max |expert output| per expert and layer",
        [{"caption": "super experts per layer", "columns": ["layer", "super experts", "max |f|", "median max |f|"],
          "rows": rows}])


def agreement_section(a: dict[str, Any], images: dict[str, str]) -> Section:
    tables, paras = [], ["Kept-set overlap of every pair of criteria (uniform policy, mean over layers): 1 = the "
                         "same experts kept, about 1 − ratio = chance (the random control). Criteria that agree "
                         "make the choice of criterion matter little at that ratio."]
    for g in a["agreement"]:
        if "skipped" in g:
            paras.append(f"ratio {g['ratio']:g}: skipped ({g['skipped']})")
            continue
        tables.append({"caption": f"kept-set overlap at ratio {g['ratio']:g}", "columns": ["criterion", *g["methods"]],
                       "rows": [[m, *(_r(v, 3) for v in row)] for m, row in zip(g["methods"], g["matrix"],
                                                                                 strict=True)]})
    return _section("agreement", "Criteria agreement", paras, images, "agreement", "kept-set overlap per ratio", tables)


def probe_section(a: dict[str, Any], images: dict[str, str]) -> Section:
    p = a["probe"]
    measured = "measured" in p
    doms = list(p.get("measured_per_domain", {}))
    rows = []
    for i, layer in enumerate(a["layers"]):
        for j, r in enumerate(p["ratios"]):
            row = [layer, r, " ".join(str(e) for e in p["dropped"][i][j]), _r(p["predicted"][i][j])]
            if measured:
                row += [_r(p["measured"][i][j])] + [_r(p["measured_per_domain"][d][i][j]) for d in doms]
            rows.append(row)
    cols = ["layer", "ratio", "dropped experts", "predicted"] + (["measured", *(f"measured {d}" for d in doms)]
                                                                 if measured else [])
    paras = ["Cheapest plan per layer: drop the experts with the least routed output mass Σ g·‖f‖. Predicted cost = "
             "the share of that mass removed; measured cost = ‖Z − MoE_S(X)‖² / ‖Z‖², the relative squared error of "
             "the layer's MoE output with those experts masked in its own router (their tokens re-route), on the "
             "block inputs cached during the calibration pass; each layer alone."]
    if measured and p.get("probe_tokens"):
        paras.append(f"Measured on at most {p['probe_tokens']} real tokens per domain and layer (an evenly strided "
                     "subset; `--probe-tokens 0` measures on every token).")
    if measured:
        paras.append(f"Cliff = the first ratio whose measured error exceeds {p['cliff_threshold']:g}. "
                     + "; ".join(f"layer {layer}: {'none' if c is None else c}" for layer, c in
                                 zip(a["layers"], p["cliff"], strict=True)) + ".")
    else:
        paras.append(p.get("measured_skipped", ""))
    if p.get("skipped_ratios"):
        paras += [f"ratio {r} skipped: {why}" for r, why in p["skipped_ratios"].items()]
    return _section("probe", "Redundancy probe: how far can this model be pruned?", paras, images, "probe",
                    "predicted vs measured cost over the ratio, per layer",
                    [{"caption": "cheapest plan per layer and ratio", "columns": cols, "rows": rows}])


def locality_section(a: dict[str, Any], images: dict[str, str]) -> Section:
    loc = a["locality"]
    if "skipped" in loc:
        return _section("locality", "Local routing consistency", [loc["skipped"]], images)
    sizes = loc["cache_sizes"]
    rows = [[layer, L, _r(loc["srp"][i][n]), _r(loc["srp_baseline"][i][n]), _r(loc["srp_global"][i][n])]
            + [f"{loc['sch'][i][n][j]:.3f} / {loc['sch_baseline'][i][n][j]:.3f} / {loc['sch_global'][i][n][j]:.3f}"
               for j in range(len(sizes))]
            for i, layer in enumerate(a["layers"]) for n, L in enumerate(loc["lengths"])]
    static = [[layer, *(_r(v, 3) for v in loc["static"][i])] for i, layer in enumerate(a["layers"])]
    v = loc["verdict"]
    return _section(
        "locality", "Local routing consistency: prune or offload?",
        ["SRP(L): best F1 of a router that picks experts once per L-token segment; SCH(L, m): best hit rate of an "
         "m-expert cache fixed per segment (arXiv 2505.16056). Baseline: the same traces with each sequence's tokens "
         f"shuffled ({loc['n_shuffles']} orders), i.e. no locality; global: tokens shuffled across all sequences, "
         "i.e. no per-sequence (domain) concentration either. Verdict rule at L = "
         f"{v.get('length')}, m = {v.get('cache_size')}: locality gain SCH − baseline ≥ {v.get('threshold', 0.1):g} "
         "→ offloading/dynamic loading can beat static pruning; else baseline − global ≥ "
         f"{v.get('threshold', 0.1):g} → choose experts per domain/request; else static pruning.", v["text"]],
        images, "locality", "SRP and SCH over segment length per layer (dashed: shuffled in sequence, dotted: "
        "shuffled across sequences)",
        [{"caption": "SRP and SCH (as routed / shuffled in sequence / shuffled across sequences) per layer and "
                     "segment length",
          "columns": ["layer", "L", "SRP", "SRP shuffled", "SRP global", *(f"SCH m={m}" for m in sizes)],
          "rows": rows},
         {"caption": "share of routed slots served by the best static set of m experts",
          "columns": ["layer", *(f"m={m}" for m in sizes)], "rows": static}])


def build_sections(a: dict[str, Any], images: dict[str, str]) -> dict[str, Any]:
    """analysis dict + {key: PNG name} -> the renderer's report dict (module docstring)."""
    src = a.get("source", {})
    name = Path(src.get("model") or src.get("stats_file") or "model").name
    doms = ", ".join(f"{d} ({a['tokens'][d]:,} tokens)" for d in a["domains"])
    builders = (overview, usage_section, balance_section, specialisation_section, coactivation_section,
                supers_section, agreement_section, probe_section, locality_section, offload_section)
    return {"title": f"Routing analysis: {name}",
            "subtitle": f"{a['model_type']}, {a['num_experts']} experts, top-{a['top_k']}, {len(a['layers'])} MoE "
                        f"layers; calibration: {doms}",
            "sections": [sec for b in builders if (sec := b(a, images)) is not None]}
