"""Family x verb coverage of the installed transformers' MoE families (issue 16).

    python benchmarks/families.py [--out benchmarks/results/families.md] [--only qwen3_moe,mixtral] [--workers 1]

Families are enumerated from the installed transformers (`moeprune.tiny_families.moe_model_types`: its model
registry and modeling files, then the built model), not from a hand list. For each, a tiny random model is built
from the family's own config class and every verb runs on it:

- info:      `moeprune info` reports the MoE layers and expert count the model really has;
- prune:     keep-all plan reproduces the logits bit for bit; a 25 % criterion plan (aimer) -> save -> stock
             `from_pretrained` equals the original with the removed experts masked in its own router
             (max |Δ| <= 1e-4 · max |logit|), differs clearly from the unmasked original, config counts follow;
- streaming: the shard-editing apply writes the same tensors, bit for bit, as the in-memory apply;
- naee:      NAEE's reconstruction search, 25 %, exported and verified against the masked original;
- neurons:   CAMERA-P 50 % of each expert's neurons, exported and verified against the masked original;
- merge:     M-SMoE 25 %, exported and verified against the original with the merge expressed as a reference;
- lazy:      layer-by-layer calibration gives the statistics of the in-memory calibration, and HEAPr's neuron sums
             with gradients (top-down backward from the model's own head) those of one whole-model backward.

A verb the family's layout does not allow says so ("n/a: ..."), with the reason moeprune gives; a family moeprune
refuses or does not know shows its error on every verb. The table goes to the README.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

VERBS = ("info", "prune", "streaming", "naee", "neurons", "merge", "repair", "lazy")
WORDS = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "kappa", "theta", "lambda", "zeta"]
TOL = 1e-4  # relative to max |logit|, as tests/test_families.py


class NotApplicable(Exception):
    """The family's layout does not allow this verb (the message says why)."""


def _write_text(root: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    path = root / "web.txt"
    path.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (1500,), generator=g)))
    return path


def _calib(text: Path, **kw):
    from moeprune.api import CalibrateOptions

    return CalibrateOptions((f"web={text}",), samples=4, seq_len=32, held_out=0, **kw)


def _load(path: Path, **kwargs):
    """The stock class's `from_pretrained`; a wrapper without a forward of its own (Qwen3-Omni-MoE) runs through the
    sub-model holding its text model (`io/stock.runnable`, checked against the stock thinker's logits in
    tests/test_omni_wrapper.py)."""
    from transformers import AutoConfig

    from moeprune.io.stock import auto_class, runnable

    config = AutoConfig.from_pretrained(str(path))
    return runnable(auto_class(config).from_pretrained(str(path), dtype=torch.float32, **kwargs).eval())


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        if not f.name.startswith("moeprune_"):
            out.update(load_file(f))
    return out


def _inputs(vocab: int):
    from moeprune.pipeline.verify import seeded_inputs

    return seeded_inputs(vocab_size=min(vocab, 96), batch=2, seq_len=24, seed=3)


def check_info(ctx: dict) -> str:
    from moeprune import api

    s = api.info(ctx["original"])
    adapter = ctx["adapter"]
    assert s.num_experts == adapter.num_experts and s.moe_layers == adapter.moe_layers(), (s.num_experts,
                                                                                           s.moe_layers)
    assert s.routed_params > 0 and len(s.per_layer_expert_params) == len(adapter.moe_layers())
    assert all(v > 0 for v in s.per_layer_expert_params.values()), s.per_layer_expert_params
    return f"{len(s.moe_layers)} MoE layers, {s.routing}"


def check_prune(ctx: dict) -> str:
    from moeprune import api
    from moeprune.models import get_adapter
    from moeprune.models.masking import masked_experts
    from moeprune.pipeline.verify import logits_of
    from moeprune.select.plan import PrunePlan
    from moeprune.surgery.in_memory import apply_plan

    original, root = ctx["original"], ctx["root"]
    plan = api.make_plan(original, "aimer", 0.25)
    ctx["plan"] = plan
    mem = ctx["mem"] = api.apply_plan(original, plan, root / "mem").out
    model = _load(original)
    adapter = get_adapter(model.config)
    inputs = _inputs(model.config.get_text_config().vocab_size)
    unmasked = logits_of(model, inputs)
    with masked_experts(model, adapter, {layer: plan.dropped(layer) for layer in plan.layers}) as hits:
        want = logits_of(model, inputs)
    assert all(c["hits"] >= 1 for c in hits.values()), f"mask never hit: {hits}"
    keep = inputs["attention_mask"].bool()
    if want.shape[:2] != keep.shape:  # a block-diffusion model scores its canvas, not the prompt positions
        keep = torch.ones(want.shape[:2], dtype=torch.bool)
    scale = want[keep].abs().max()
    got_model = _load(mem)
    got = logits_of(got_model, inputs)
    diff = float((got - want)[keep].abs().max())
    assert diff <= TOL * scale, f"reload differs from the masked original by {diff:.3g} (scale {float(scale):.3g})"
    assert float(got.abs().max()) > 0.1, "outputs are all ~zero"
    assert float((unmasked - want)[keep].abs().max()) > 100 * TOL * scale, "removing experts changed nothing"
    assert get_adapter(got_model.config).num_experts == plan.kept_count, "config count not updated"
    # keep-all: bit-exact. Both sides on freshly allocated copies of the weights: a CPU matmul's last bits can
    # depend on the alignment of its operands, and loaded (memory-mapped) tensors may sit at other offsets than
    # the copies surgery makes (Gemma-4: 8e-7 between the loaded experts and identical copies of them)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    before = logits_of(model, inputs)
    keep_all = PrunePlan({layer: list(range(plan.num_experts)) for layer in plan.layers}, plan.num_experts)
    apply_plan(model, adapter, keep_all)
    assert torch.equal(logits_of(model, inputs), before), "keep-all plan changed the logits"
    return f"max|Δ| {diff / float(scale):.1e} of scale"


def check_streaming(ctx: dict) -> str:
    from moeprune import api

    if "mem" not in ctx:
        raise AssertionError("needs the in-memory export of the prune verb")
    stream = api.apply_plan(ctx["original"], ctx["plan"], ctx["root"] / "stream", streaming=True,
                            max_shard_size="40KB").out
    a, b = _tensors(ctx["mem"]), _tensors(stream)
    assert sorted(a) == sorted(b), f"different tensor names: {sorted(set(a) ^ set(b))[:4]}"
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"tensors differ: {bad[:4]}"
    return f"{len(a)} tensors bit-identical"


def _prune_verified(ctx: dict, method: str | None, ratio: float, name: str, **options) -> str:
    from moeprune import api
    from moeprune.errors import UnsupportedLayout

    try:
        _, result = api.prune(ctx["original"], ctx["root"] / name, method=method, ratio=ratio,
                              calib=_calib(ctx["text"]), **options)
    except UnsupportedLayout as e:
        raise NotApplicable(str(e).split("\n")[0][:160]) from e
    assert result is not None and result.passed, f"verify failed: {result}"
    return f"verify max|Δ| {result.max_abs_diff:.1e}"


def check_naee(ctx: dict) -> str:
    return _prune_verified(ctx, None, 0.25, "naee", policy="reconstruction")


def check_neurons(ctx: dict) -> str:
    return _prune_verified(ctx, "camera", 0.5, "neurons")


def check_merge(ctx: dict) -> str:
    return _prune_verified(ctx, "msmoe", 0.25, "merge")


def check_repair(ctx: dict) -> str:
    """Experts removed, then every closed-form repair; verified, and no layer's calibration block error grew."""
    from moeprune import api
    from moeprune.errors import UnsupportedLayout

    try:
        applied, result = api.prune(ctx["original"], ctx["root"] / "repair", method="frequency", ratio=0.25,
                                    calib=_calib(ctx["text"]), repair="all")
    except UnsupportedLayout as e:
        raise NotApplicable(str(e).split("\n")[0][:160]) from e
    assert result is not None and result.passed, f"verify failed: {result}"
    layers = applied.report["stages"][-1]["summary"]["layers"]
    grew = {k: v for k, v in layers.items() if v["error_after"] > v["error_before"] * (1 + 1e-9)}
    assert not grew, f"repair increased the block error of layers {sorted(grew)}"
    ratio = applied.report["stages"][-1]["summary"]["ratio"]
    return f"block error ×{ratio:.2f}, verify max|Δ| {result.max_abs_diff:.1e}"


def _max_rel(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    """The largest max |got − want| / max |want| over the fields of two statistics' sums (same fields, shapes)."""
    worst = 0.0
    for field, a in want.items():
        b = got[field]
        assert a.shape == b.shape, field
        if a.numel():
            worst = max(worst, float((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-12)))
    return worst


def check_lazy(ctx: dict) -> str:
    from moeprune import api

    eager = api.calibrate(ctx["original"], _calib(ctx["text"], lazy=False))
    lazy = api.calibrate(ctx["original"], _calib(ctx["text"], lazy=True))
    assert eager.layers == lazy.layers and set(eager.sets) == set(lazy.sets)
    worst = max(_max_rel(stats.sums, lazy.sets[name][layer].sums) for name, layers in eager.sets.items()
                for layer, stats in layers.items())
    assert worst <= 1e-5, f"lazy statistics differ from eager by {worst:.2e} (relative)"
    freq = sum(float(s.sums["count"].sum()) for s in eager.combined().values())
    assert freq > 0, "no token was routed"
    grad = _lazy_gradients(ctx)
    return f"max rel Δ {worst:.1e}, HEAPr gradients {grad:.1e}"


def _lazy_gradients(ctx: dict) -> float:
    """HEAPr's neuron sums with gradients, layer by layer (top-down backward from the model's own head) against one
    whole-model forward and backward: the largest relative difference over every field."""
    from moeprune.calibration.data import build_sets
    from moeprune.calibration.run import load_tokenizer
    from moeprune.models import get_adapter
    from moeprune.stats.neurons import collect_neuron_stats
    from moeprune.stats.neurons_layered import collect_neuron_stats_layered

    opts = _calib(ctx["text"])
    sets = build_sets(opts.calib_config(), load_tokenizer(ctx["original"], None))
    lazy = collect_neuron_stats_layered(ctx["original"], sets, gradients=True, batch_size=opts.batch_size)
    model = _load(ctx["original"])
    whole = collect_neuron_stats(model, get_adapter(model.config, model=model), sets, gradients=True,
                                 batch_size=opts.batch_size)
    assert lazy.keys() == whole.keys()
    worst = max(_max_rel(stats.sums, lazy[layer].sums) for layer, stats in whole.items())
    assert worst <= 1e-5, f"layer-by-layer HEAPr sums differ from the whole-model pass by {worst:.2e} (relative)"
    assert any(float(s.sums["grad_sq"].abs().max()) > 0 for s in whole.values()), "no gradient reached the experts"
    return worst


CHECKS = {"info": check_info, "prune": check_prune, "streaming": check_streaming, "naee": check_naee,
          "neurons": check_neurons, "merge": check_merge, "repair": check_repair, "lazy": check_lazy}


def check_family(model_type: str, root: Path, verbs: tuple[str, ...] = VERBS) -> dict[str, tuple[str, str]]:
    """verb -> (status, detail); status in pass / fail / n/a / unsupported / not built."""
    from transformers import AutoConfig

    from moeprune.errors import MoePruneError
    from moeprune.models import get_adapter
    from moeprune.tiny import tiny_tokenizer
    from moeprune.tiny_families import NOT_BUILDABLE, tiny_family_model

    if model_type in NOT_BUILDABLE:
        return dict.fromkeys(verbs, ("not built", NOT_BUILDABLE[model_type]))
    original = root / "original"
    try:
        model = tiny_family_model(model_type, seed=1)
        model.save_pretrained(original)
        tiny_tokenizer().save_pretrained(original)
        del model
    except Exception as e:  # noqa: BLE001  (a family of this transformers that cannot be built tiny)
        return dict.fromkeys(verbs, ("not built", f"{type(e).__name__}: {e}"[:160]))
    try:
        adapter = get_adapter(AutoConfig.from_pretrained(str(original)))
    except MoePruneError as e:
        return dict.fromkeys(verbs, ("unsupported", str(e).split("\n")[0][:160]))
    ctx = {"original": original, "root": root, "adapter": adapter, "text": _write_text(root)}
    out = {}
    for verb in verbs:
        try:
            out[verb] = ("pass", CHECKS[verb](ctx))
        except NotApplicable as e:
            out[verb] = ("n/a", str(e))
        except Exception as e:  # noqa: BLE001  (the table reports every failure)
            tb = traceback.extract_tb(e.__traceback__)[-1]
            out[verb] = ("fail", f"{type(e).__name__}: {str(e)[:140]} ({Path(tb.filename).name}:{tb.lineno})")
    return out


SYMBOL = {"pass": "✓", "fail": "✗", "n/a": "–", "unsupported": "unsupported", "not built": "not built",
          "skipped": "skipped"}


def table(results: dict[str, dict[str, tuple[str, str]]]) -> str:
    lines = ["| family | " + " | ".join(VERBS) + " |", "|---" * (len(VERBS) + 1) + "|"]
    for mt, row in sorted(results.items()):
        lines.append(f"| {mt} | " + " | ".join(SYMBOL[row[v][0]] if v in row else "" for v in VERBS) + " |")
    return "\n".join(lines)


def families_to_check() -> list[str]:
    """Every MoE family of the installed transformers (`moe_model_types`), plus the installed model types moeprune
    refuses (a refused family may lack the `experts` module the enumeration looks for: jetmoe)."""
    from moeprune.compat import CONFIG_MAPPING_NAMES
    from moeprune.models.families import REFUSED
    from moeprune.tiny_families import moe_model_types

    return sorted({*moe_model_types(), *(mt for mt in REFUSED if mt in CONFIG_MAPPING_NAMES)})


def not_installed() -> dict[str, tuple[str, str]]:
    """Model types moeprune has an adapter or a refusal for that the installed transformers does not define
    (families of an older or newer transformers inside the supported range): skipped, with the reason."""
    import transformers

    from moeprune.compat import CONFIG_MAPPING_NAMES
    from moeprune.models.families import REFUSED
    from moeprune.models.registry import ADAPTERS

    why = f"not defined by the installed transformers {transformers.__version__}"
    return {mt: ("skipped", why) for mt in sorted({*ADAPTERS, *REFUSED}) if mt not in CONFIG_MAPPING_NAMES}


def main() -> int:
    import transformers

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write the table and details (markdown) here")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    p.add_argument("--only", default="", help="comma-separated model types (default: every MoE family)")
    args = p.parse_args()
    types = [t for t in args.only.split(",") if t] or families_to_check()
    results, t0 = {}, time.time()
    for i, mt in enumerate(types):
        t = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            results[mt] = check_family(mt, Path(tmp))
        marks = " ".join(f"{v}:{SYMBOL[s][:11]}" for v, (s, _) in results[mt].items())
        print(f"[{i + 1}/{len(types)}] {mt:28s} {time.time() - t:5.1f}s  {marks}", flush=True)
    if not args.only:
        for mt, status in not_installed().items():
            results[mt] = dict.fromkeys(VERBS, status)
    passing = [mt for mt, row in results.items() if all(s in ("pass", "n/a") for s, _ in row.values())]
    summary = (f"transformers {transformers.__version__}: {len(types)} MoE families, {len(passing)} pass every "
               f"verb their layout allows ({time.time() - t0:.0f} s).")
    details = [f"- {mt} / {v}: {s}: {d}" for mt, row in sorted(results.items()) for v, (s, d) in row.items()
               if s not in ("pass",)]
    text = f"{summary}\n\n{table(results)}\n\n" + "\n".join(details) + "\n"
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
