"""`moeprune info`: a model's MoE structure and what pruning would save, from config + safetensors headers only
(no weights are read, so it is instant on any size of checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.models import get_adapter
from moeprune.select.uniform import drop_count

KINDS = ("expert", "fused", "router", "shared", "other")


@dataclass
class ModelSummary:
    path: str
    model_type: str
    family: str
    num_layers: int
    moe_layers: list[int]
    num_experts: int
    top_k: int
    routing: str
    expert_width: int | None
    params: dict[str, int]  # by KeyRole kind: routed experts split as "expert"+"fused"
    bytes: dict[str, int]
    per_layer_expert_params: dict[int, int]
    savings: dict[str, dict] = field(default_factory=dict)
    layer_widths: dict[int, int] | None = None  # non-uniform expert widths (moeprune loader only), else None
    verbs: dict[str, str | None] = field(default_factory=dict)  # verb -> None (supported) or why not

    @property
    def routed_params(self) -> int:
        return self.params["expert"] + self.params["fused"]

    @property
    def routed_bytes(self) -> int:
        return self.bytes["expert"] + self.bytes["fused"]

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(routed_params=self.routed_params, routed_bytes=self.routed_bytes, total_params=self.total_params,
                 total_bytes=self.total_bytes)
        return d


def summarize(path: str) -> ModelSummary:
    ckpt = Checkpoint.open(path)
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    params = dict.fromkeys(KINDS, 0)
    nbytes = dict.fromkeys(KINDS, 0)
    per_layer: dict[int, int] = dict.fromkeys(adapter.moe_layers(), 0)
    quant = ckpt.quantization
    for e in ckpt.entries:
        role = adapter.classify_key(e.name)
        n = quant.params(e) if quant is not None else e.numel  # FP8 / MXFP4: scales are no params, 2 per byte
        params[role.kind] += n
        nbytes[role.kind] += e.nbytes
        if role.kind in ("expert", "fused"):
            per_layer[role.layer] += n
    routing = adapter.routing()
    summary = ModelSummary(
        path=str(ckpt.path), model_type=adapter.model_type, family=adapter.family, num_layers=adapter.num_layers,
        moe_layers=adapter.moe_layers(), num_experts=adapter.num_experts, top_k=adapter.top_k,
        routing=routing.describe(), expert_width=adapter.expert_width, params=params, bytes=nbytes,
        per_layer_expert_params=per_layer,
    )
    from moeprune.io.nonuniform_config import is_nonuniform, widths
    from moeprune.models.capabilities import meta_experts, problems

    experts = meta_experts(adapter)
    if experts is not None:
        summary.verbs = problems(adapter, experts, ckpt.config_dict)

    if is_nonuniform(ckpt.config_dict):
        summary.layer_widths = widths(ckpt.config_dict)
    for ratio in (0.25, 0.5):
        try:
            n_drop = drop_count(ratio, adapter.num_experts, routing)
        except MoePruneError as e:
            summary.savings[f"{ratio:.0%}"] = {"possible": False, "why": str(e)}
            continue
        saved = summary.routed_bytes * n_drop // adapter.num_experts
        summary.savings[f"{ratio:.0%}"] = {
            "possible": True, "experts_dropped_per_layer": n_drop, "bytes_saved": saved,
            "fraction_of_checkpoint": saved / max(summary.total_bytes, 1),
        }
    return summary


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.3g} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000 if unit != "B" else 1024
    return str(n)


def format_summary(s: ModelSummary) -> str:
    lines = [
        f"model        {s.path}",
        f"family       {s.family} (model_type {s.model_type})",
        f"layers       {s.num_layers} decoder layers, {len(s.moe_layers)} MoE: {_ranges(s.moe_layers)}",
        f"experts      E={s.num_experts} routed per MoE layer, top-{s.top_k}, width {s.expert_width}",
        f"routing      {s.routing}",
    ]
    if s.verbs:
        ok = [v for v, why in s.verbs.items() if why is None]
        lines.append(f"methods      {', '.join(ok)}" + "".join(f"; no {v}: {why}" for v, why in s.verbs.items()
                                                           if why is not None))
    if s.layer_widths:
        lines.append(f"NON-UNIFORM  expert width per layer {s.layer_widths}: load with moeprune.load_model; stock "
                     "from_pretrained and vLLM refuse this folder")
    lines += [
        "",
        f"{'part':<16}{'params':>14}{'bytes':>14}{'share':>9}",
    ]
    rows = [("routed experts", s.routed_params, s.routed_bytes), ("routers", s.params["router"], s.bytes["router"]),
            ("shared experts", s.params["shared"], s.bytes["shared"]), ("rest", s.params["other"], s.bytes["other"])]
    for name, p, b in rows:
        lines.append(f"{name:<16}{_human(p, ''):>14}{_human(b):>14}{b / max(s.total_bytes, 1):>9.1%}")
    lines.append(f"{'total':<16}{_human(s.total_params, ''):>14}{_human(s.total_bytes):>14}{1:>9.0%}")
    lines.append("")
    lines.append(f"{'layer':>6}{'E':>6}{'top-k':>7}  {'routing':<16}{'routed params':>15}")
    kind = s.routing.split(",")[0]
    for layer in range(s.num_layers):
        if layer in s.per_layer_expert_params:
            params = _human(s.per_layer_expert_params[layer], "")
            lines.append(f"{layer:>6}{s.num_experts:>6}{s.top_k:>7}  {kind:<16}{params:>15}")
        else:
            lines.append(f"{layer:>6}{'-':>6}{'-':>7}  {'dense':<16}{'-':>15}")
    lines.append("")
    lines.append("removing routed experts (uniform per layer):")
    for ratio, info in s.savings.items():
        if info["possible"]:
            lines.append(
                f"  {ratio:>4}: drop {info['experts_dropped_per_layer']}/{s.num_experts} per layer, saves "
                f"{_human(info['bytes_saved'])} ({info['fraction_of_checkpoint']:.1%} of the checkpoint)"
            )
        else:
            lines.append(f"  {ratio:>4}: not possible — {info['why']}")
    return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)
