"""`SteerPlan`: experts to switch off or force on, per MoE layer, as versioned JSON (`moeprune.steer/1`).

    {"format": "moeprune.steer/1", "model_type": str, "num_experts": E, "top_k": k, "routing": kind,
     "layers": [MoE layer indices], "router_sha256": str | null,
     "steer": [{"layer": l, "expert": j, "action": "off" | "on", "strength": s (action "on" only)}],
     "contrast": {...} | null,   # how the experts were found (sets, tokens, formula): informational
     "experts": [ExpertContrast rows, ranked] | null, "effect": {...} | null}   # informational

Only `steer` acts; everything else describes. "off": the expert can never be routed (as `masked_experts`); "on":
`strength` (> 0, finite) is added to the expert's router score — the logits, or the sigmoid scores for
sigmoid_grouped routers (`models.masking.steer_op`) — before the family's own selection and renormalisation.
The plan may be edited by hand; `from_dict` validates everything it relies on, and `check_model` that it fits the
model it is applied to.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moeprune.errors import MoePruneError
from moeprune.log import logger

STEER_FORMAT = "moeprune.steer/1"
ACTIONS = ("off", "on")
DEFAULT_STRENGTH = 10.0


@dataclass(frozen=True)
class SteerEntry:
    layer: int
    expert: int
    action: str
    strength: float | None = None

    def to_dict(self) -> dict:
        d = {"layer": self.layer, "expert": self.expert, "action": self.action}
        if self.action == "on":
            d["strength"] = self.strength
        return d


@dataclass(frozen=True)
class SteerPlan:
    model_type: str
    num_experts: int
    top_k: int
    routing: str
    layers: tuple[int, ...]
    steer: tuple[SteerEntry, ...] = ()
    router_sha256: str | None = None
    contrast: dict | None = None
    experts: list[dict] | None = None
    effect: dict | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        where = "steering plan"
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise MoePruneError(f"{where}: num_experts must be a positive integer, got {self.num_experts!r}.")
        seen: set[tuple[int, int]] = set()
        for e in self.steer:
            if e.action not in ACTIONS:
                raise MoePruneError(f"{where}: action {e.action!r} of layer {e.layer} expert {e.expert} is not one of "
                                    f"{', '.join(ACTIONS)}.")
            if e.layer not in self.layers:
                raise MoePruneError(f"{where}: layer {e.layer} is not a MoE layer of the model (MoE layers: "
                                    f"{list(self.layers)}).")
            if not (isinstance(e.expert, int) and 0 <= e.expert < self.num_experts):
                raise MoePruneError(f"{where}: expert {e.expert!r} of layer {e.layer} is not in "
                                    f"0..{self.num_experts - 1}.")
            if (e.layer, e.expert) in seen:
                raise MoePruneError(f"{where}: layer {e.layer} expert {e.expert} is listed twice; give each expert "
                                    "one action.")
            seen.add((e.layer, e.expert))
            if e.action == "on":
                if not isinstance(e.strength, (int, float)) or not math.isfinite(e.strength) or e.strength <= 0:
                    raise MoePruneError(f"{where}: layer {e.layer} expert {e.expert} is forced on with strength "
                                        f"{e.strength!r}; give a finite number > 0 (added to its router score).")
            elif e.strength is not None:
                raise MoePruneError(f"{where}: layer {e.layer} expert {e.expert} is switched off; a strength applies "
                                    "to action 'on' only. Drop it.")
        for layer in self.layers:
            off = sum(1 for e in self.steer if e.layer == layer and e.action == "off")
            if self.num_experts - off < self.top_k:
                raise MoePruneError(f"{where}: layer {layer} switches off {off} of {self.num_experts} experts; the "
                                    f"router needs at least top_k = {self.top_k} routable ones.")

    # ------------------------------------------------------------------ views
    def by_layer(self) -> dict[int, tuple[list[int], dict[int, float]]]:
        """{layer: (experts switched off, {expert forced on: strength})}, only layers the plan touches."""
        out: dict[int, tuple[list[int], dict[int, float]]] = {}
        for e in self.steer:
            off, on = out.setdefault(e.layer, ([], {}))
            if e.action == "off":
                off.append(e.expert)
            else:
                on[e.expert] = float(e.strength)
        return out

    def with_action(self, action: str, strength: float | None = None) -> SteerPlan:
        """The same experts, all with `action` (strength: DEFAULT_STRENGTH when forcing on without one)."""
        if action == "on" and strength is None:
            strength = DEFAULT_STRENGTH
        return replace(self, steer=tuple(SteerEntry(e.layer, e.expert, action, strength if action == "on" else None)
                                         for e in self.steer), effect=None)

    def describe(self) -> str:
        if not self.steer:
            return "empty steering plan (changes nothing)"
        return "; ".join(f"layer {e.layer} e{e.expert} {e.action}" + (f" +{e.strength:g}" if e.action == "on" else "")
                         for e in self.steer)

    # ------------------------------------------------------------------ model
    def check_model(self, adapter, router_sha256: str | None = None) -> None:
        """Refuse a plan made for another model (model type, expert count, MoE layers); warn when the routers
        differ from those the contrast was measured on (a plan may be meant for a fine-tune of the model)."""
        have = {"model_type": adapter.model_type, "num_experts": adapter.num_experts,
                "layers": tuple(adapter.moe_layers())}
        want = {"model_type": self.model_type, "num_experts": self.num_experts, "layers": self.layers}
        bad = [f"{k} {want[k]!r} in the plan, {have[k]!r} in the model" for k in have if have[k] != want[k]]
        if bad:
            raise MoePruneError(f"this steering plan was made for another model: {'; '.join(bad)}. Make a plan for "
                                "this model with `moeprune steer` (expert indices of a pruned model differ).")
        if router_sha256 and self.router_sha256 and router_sha256 != self.router_sha256:
            logger.warning("the steering plan was measured on other router weights (fingerprint %s…, model %s…); "
                           "its experts may not be the behaviour experts of this model", self.router_sha256[:12],
                           router_sha256[:12])

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {"format": STEER_FORMAT, "model_type": self.model_type, "num_experts": self.num_experts,
                "top_k": self.top_k, "routing": self.routing, "layers": list(self.layers),
                "router_sha256": self.router_sha256, "steer": [e.to_dict() for e in self.steer],
                "contrast": self.contrast, "experts": self.experts, "effect": self.effect}

    @classmethod
    def from_dict(cls, d: Any, source: str = "steering plan") -> SteerPlan:
        if not isinstance(d, dict) or d.get("format") != STEER_FORMAT:
            raise MoePruneError(f"{source} is not a moeprune steering plan ({STEER_FORMAT}); make one with "
                                "`moeprune steer`.")
        missing = [k for k in ("model_type", "num_experts", "top_k", "routing", "layers", "steer") if k not in d]
        if missing:
            raise MoePruneError(f"{source}: missing {', '.join(missing)}.")
        if not isinstance(d["steer"], list) or not isinstance(d["layers"], list):
            raise MoePruneError(f"{source}: 'steer' and 'layers' must be lists.")
        entries = []
        for i, e in enumerate(d["steer"]):
            if not isinstance(e, dict) or not {"layer", "expert", "action"} <= set(e):
                raise MoePruneError(f"{source}: steer[{i}] must be {{layer, expert, action[, strength]}}, got {e!r}.")
            extra = set(e) - {"layer", "expert", "action", "strength"}
            if extra:
                raise MoePruneError(f"{source}: steer[{i}] has unknown keys {sorted(extra)}.")
            if not all(isinstance(e[k], int) and not isinstance(e[k], bool) for k in ("layer", "expert")):
                raise MoePruneError(f"{source}: steer[{i}] layer and expert must be integers, got {e!r}.")
            strength = e.get("strength")
            if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))):
                raise MoePruneError(f"{source}: steer[{i}] strength must be a number, got {strength!r}.")
            entries.append(SteerEntry(e["layer"], e["expert"], e["action"],
                                      None if strength is None else float(strength)))
        try:
            return cls(str(d["model_type"]), d["num_experts"], int(d["top_k"]), str(d["routing"]),
                       tuple(int(x) for x in d["layers"]), tuple(entries), d.get("router_sha256"), d.get("contrast"),
                       d.get("experts"), d.get("effect"))
        except MoePruneError as err:
            raise MoePruneError(str(err).replace("steering plan:", f"{source}:", 1)) from None

    def save(self, path: str | Path) -> Path:
        from moeprune.io.report import write_json_atomic

        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> SteerPlan:
        path = Path(path).expanduser()
        if not path.is_file():
            raise MoePruneError(f"steering plan {path} does not exist; make one with `moeprune steer`.")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise MoePruneError(f"steering plan {path} is not readable JSON ({e}).") from e
        return cls.from_dict(data, source=f"steering plan {path}")


def as_plan(plan: SteerPlan | str | Path | dict) -> SteerPlan:
    """A SteerPlan from a plan, a plan file or its dict."""
    if isinstance(plan, SteerPlan):
        return plan
    if isinstance(plan, dict):
        return SteerPlan.from_dict(plan)
    if isinstance(plan, (str, Path)):
        return SteerPlan.load(plan)
    raise MoePruneError(f"steer= takes a SteerPlan, a plan file or its dict, got {type(plan).__name__}.")
