"""`RoutingPlan`: a routing policy with its per-layer thresholds, as data (JSON `moeprune.routing/1`).

    {"format": "moeprune.routing/1", "method": "top_p", "top_k": 8, "layers": [1, 2],
     "thresholds": {"1": 0.62, "2": 0.58}, "k_min": 1, "k_max": 8, "target_active": 3.0, "scope": "global", ...}

`thresholds[ℓ]` is top_p's p, or naee_skip's β (already scaled to the target when one was given); `topk` has `k`
and no thresholds. A dynamic plan is stored in an export's config.json under `moeprune_routing`
(`moeprune.load_model` applies it); a static `topk` plan is a stock config change and writes no block.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moeprune.errors import MoePruneError
from moeprune.routing import rules

ROUTING_FORMAT = "moeprune.routing/1"
BLOCK_KEY = "moeprune_routing"
METHODS = ("topk", "top_p", "naee_skip", "otp")
SCOPES = ("global", "per_layer")


@dataclass
class RoutingPlan:
    method: str
    top_k: int  # the model's own k
    layers: list[int]
    k: int | None = None  # topk
    thresholds: dict[int, float] = field(default_factory=dict)  # top_p: p per layer; naee_skip: β per layer
    k_min: int = 1  # top_p
    k_max: int | None = None  # top_p (None: the model's k)
    target_active: float | None = None
    scope: str | None = None  # how target_active was met: one threshold (global) or one per layer
    beta: dict[int, float] = field(default_factory=dict)  # naee_skip: the calibrated medians before scaling
    scale: float | None = None  # naee_skip with target_active (global): β_ℓ = scale · median_ℓ
    calibrated_active: dict[int, float] = field(default_factory=dict)  # on calibration text, original routing
    model_type: str = ""
    ratio: float = 0.0  # stages' common field: routing removes no weight
    # otp: {"selector_file", "selector_sha256", "shift", "cost"}; the selector tensors are `self.selectors`
    # (not JSON: `routing/otp.py` reads them from the side file, `attach_selectors`)
    otp: dict = field(default_factory=dict)

    @property
    def dynamic(self) -> bool:
        return self.method != "topk"

    def decide(self):
        """(w [N, k], σ [N, k], layer) -> keep [N, k] (`models/dynamic.Decide`)."""
        if self.method == "topk":
            return lambda w, sel, layer: rules.keep_topk(sel, self.k)
        if self.method == "top_p":
            return lambda w, sel, layer: rules.keep_top_p(w, self.thresholds[layer], self.k_min, self.k_max)
        if self.method == "otp":
            from moeprune.routing.otp import OTPDecide

            if getattr(self, "selectors", None) is None:
                raise MoePruneError("routing plan otp: its selector weights are not loaded (read the plan with "
                                    "routing.apply.read_routing or from an export with moeprune.load_model).")
            return OTPDecide(self.selectors)
        return lambda w, sel, layer: rules.keep_naee(w, self.thresholds[layer])

    def validate(self, adapter) -> None:
        if self.method not in METHODS:
            raise MoePruneError(f"routing plan: method {self.method!r} is not one of {', '.join(METHODS)}.")
        moe = set(adapter.moe_layers())
        if not set(self.layers) <= moe:
            raise MoePruneError(f"routing plan: layers {sorted(set(self.layers) - moe)} are not MoE layers of this "
                                f"model ({sorted(moe)}).")
        if self.top_k != adapter.top_k and not (self.method == "topk" and adapter.top_k == self.k):
            raise MoePruneError(f"routing plan was made for top-{self.top_k}; this model routes top-{adapter.top_k}.")
        if self.method == "topk" and not (isinstance(self.k, int) and 1 <= self.k <= self.top_k):
            raise MoePruneError(f"routing plan: topk needs 1 <= k <= {self.top_k}, got {self.k!r}.")
        if self.dynamic and set(self.thresholds) != set(self.layers):
            raise MoePruneError(f"routing plan: thresholds for layers {sorted(self.thresholds)}, but the plan covers "
                                f"{sorted(self.layers)}.")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("thresholds", "beta", "calibrated_active"):
            d[key] = {str(k): v for k, v in sorted(d[key].items())}
        return {"format": ROUTING_FORMAT, **d}

    @classmethod
    def from_dict(cls, raw: dict, source: str = "routing plan") -> RoutingPlan:
        if not isinstance(raw, dict) or raw.get("format") != ROUTING_FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise MoePruneError(f"{source}: not a routing plan (format {got!r}, expected {ROUTING_FORMAT!r}).")
        body = {k: v for k, v in raw.items() if k != "format"}
        try:
            for key in ("thresholds", "beta", "calibrated_active"):
                body[key] = {int(k): float(v) for k, v in (body.get(key) or {}).items()}
            body["layers"] = [int(x) for x in body["layers"]]
            return cls(**body)
        except (TypeError, ValueError, KeyError) as e:
            raise MoePruneError(f"{source}: malformed routing plan ({e}).") from None

    def save(self, path: str | Path) -> None:
        from moeprune.io.report import write_json_atomic

        d = self.to_dict()
        if self.method == "otp":  # the selectors next to the JSON: NAME.otp.safetensors
            from moeprune.routing.otp import save_selectors

            side = Path(path).with_name(Path(path).name.removesuffix(".json") + ".otp.safetensors")
            save_selectors(self.selectors, side)
            d["otp"] = {**d["otp"], "selector_file": side.name}
        write_json_atomic(Path(path), d)

    def attach_selectors(self, folder: str | Path) -> RoutingPlan:
        """otp: read the selector tensors from the side file `otp.selector_file` in `folder` (checked against the
        recorded sha256); other methods: nothing."""
        if self.method == "otp":
            from moeprune.routing.otp import load_selectors

            name = self.otp.get("selector_file")
            if not isinstance(name, str):
                raise MoePruneError("routing plan otp: it names no selector file (otp.selector_file).")
            self.selectors = load_selectors(Path(folder) / name, self.layers, self.top_k,
                                            self.otp.get("selector_sha256"))
        return self

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def describe(self) -> str:
        if self.method == "topk":
            return f"topk: {self.top_k} -> {self.k} experts per token"
        if self.method == "otp":
            target = f", target {self.target_active:g} active" if self.target_active is not None else ""
            return f"otp: learned selector per layer{target}"
        what = "p" if self.method == "top_p" else "β"
        vals = list(self.thresholds.values())
        rng = f"{min(vals):.3g}..{max(vals):.3g}" if vals else "-"
        target = f", target {self.target_active:g} active ({self.scope})" if self.target_active is not None else ""
        return f"{self.method}: {what} {rng}{target}"


def mean_active(plan: RoutingPlan, weights: dict[int, torch.Tensor]) -> dict[int, float]:
    """Per layer: the average experts per token the plan keeps on captured weights {layer: w [N, k]}."""
    sel = {layer: w for layer, w in weights.items()}  # topk ranks by σ; on captured w the count is k either way
    if plan.method == "topk":
        return {layer: float(min(plan.k, w.shape[-1])) for layer, w in sel.items()}
    if plan.method == "otp":
        raise MoePruneError("mean_active: otp decides from the hidden states too (routing/otp.active_counts).")
    keep = plan.decide()
    return {layer: float(keep(w, w, layer).sum(dim=-1).double().mean()) for layer, w in weights.items()}
