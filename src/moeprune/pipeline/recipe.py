"""Recipes: an ordered list of stages, each `{method: ..., ratio: ..., <options>}` (the CLI flags without dashes).

    stages:
      - {method: tcess_top1, ratio: 0.25}
      - {method: heapr, ratio: 0.25, budget: expert}

`parse_recipe` reads YAML/JSON files, dicts or lists into typed `StageSpec`s (unknown methods and options refused,
naming the stage); `check_chain` checks each stage against the model as the stages before it leave it (counts,
widths, top-k) before any work; `read_chain` reads the plans of an export (or of a recipe file whose stages name
their plans) for `apply --recipe` and `verify`. Exports hold `moeprune_recipe.json` (format `moeprune.recipe/1`)
and every stage's plan under `moeprune_plans/`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import moeprune.stages  # noqa: F401  (registers the stages)
from moeprune.errors import MoePruneError
from moeprune.io.report import REPORT_NAME
from moeprune.models.base import MoEAdapter
from moeprune.select.plan import PLAN_FORMAT, PrunePlan, read_plan_json
from moeprune.stages.base import Need, Stage, StageOptions, adapter_after, stage_for_format, stage_for_method

RECIPE_FORMAT = "moeprune.recipe/1"
RECIPE_NAME = "moeprune_recipe.json"
PLANS_DIR = "moeprune_plans"
META_KEYS = ("kind", "plan")  # written into exports' recipes next to the options


@dataclass(frozen=True)
class StageSpec:
    stage: Stage
    options: StageOptions
    index: int  # 1-based

    @property
    def where(self) -> str:
        return f"stage {self.index} ({self.options.method})"

    @property
    def needs(self) -> set[Need]:
        return self.stage.needs(self.options)

    def to_dict(self) -> dict:
        return {"kind": self.stage.kind, **self.options.given()}


Chain = list[tuple[Stage, Any]]  # (stage, plan) in recipe order


def parse_recipe(recipe: str | Path | Mapping | Sequence, source: str = "recipe") -> list[StageSpec]:
    """Typed stages from a recipe file (YAML or JSON), a {"stages": [...]} mapping or a list of stage dicts.
    `source` names the recipe in messages ("" for the single-method flags)."""
    if isinstance(recipe, (str, Path)):
        source = str(recipe)
        recipe = _read_file(Path(recipe).expanduser())
    entries = recipe.get("stages") if isinstance(recipe, Mapping) else recipe
    if not isinstance(entries, Sequence) or isinstance(entries, (str, bytes)) or not entries:
        raise MoePruneError(f"{source or 'recipe'}: a recipe is a non-empty list of stages, e.g. "
                            "{stages: [{method: tcess_top1, ratio: 0.25}, {method: heapr, ratio: 0.25}]}.")
    specs = []
    for n, entry in enumerate(entries, 1):
        where = f"{source}: stage {n}" if source else f"stage {n}"
        if not isinstance(entry, Mapping):
            raise MoePruneError(f"{where}: each stage is a mapping like {{method: reap, ratio: 0.25}}, got {entry!r}.")
        raw = {k: v for k, v in entry.items() if k not in META_KEYS}
        if raw.get("method") is None and raw.get("policy") == "reconstruction":
            raw["method"] = "naee"
        if "method" not in raw:
            raise MoePruneError(f"{where}: give a method (e.g. method: reap).")
        stage = stage_for_method(raw["method"], where)
        if entry.get("kind") not in (None, stage.kind) and stage.kind_option and stage.kind_option not in raw:
            raw[stage.kind_option] = entry["kind"]  # {method: repair, kind: obs}: the repair's own kind
        elif entry.get("kind") not in (None, stage.kind):
            raise MoePruneError(f"{where}: kind {entry['kind']!r} does not match method {raw['method']!r}, a "
                                f"{stage.kind} method.")
        specs.append(StageSpec(stage, stage.parse(raw, f"{where} ({raw['method']})"), n))
    return specs


def check_chain(specs: list[StageSpec], adapter: MoEAdapter, before: Sequence[StageSpec] = ()) -> list[MoEAdapter]:
    """Adapters of the model before each stage and after the last; refuses a chain that cannot work. `before`: the
    recipe's stages ahead of `specs` (re-checking the rest of a recipe after some stages are planned)."""
    adapters = [adapter]
    for n, (prev, spec) in enumerate(zip([None, *specs[:-1]], specs, strict=True)):
        reason = prev.stage.final_only(prev.options) if prev is not None else None
        if reason:
            raise MoePruneError(f"{spec.where}: follows {prev.where}, whose {reason}.")
        try:
            spec.stage.check_previous(spec.options, [*before, *specs[:n]])
        except MoePruneError as e:
            raise type(e)(f"{spec.where}: {e}") from None
        adapters.append(next_adapter(spec, adapters[-1]))
    return adapters


def next_adapter(spec: StageSpec, adapter: MoEAdapter) -> MoEAdapter:
    try:
        return adapter_after(adapter, spec.stage.check(spec.options, adapter))
    except MoePruneError as e:
        shape = f"{adapter.num_experts} experts (top-{adapter.top_k}), width {adapter.expert_width}"
        # same class (UnsupportedLayout stays one: the family x verb table shows it as n/a)
        raise type(e)(f"{spec.where}, on the model as the stages before leave it ({shape}): {e}") from None


def chain_adapters(chain: Chain, adapter: MoEAdapter) -> list[MoEAdapter]:
    """Validate each plan against the model as the plans before it leave it; adapters before each and after."""
    adapters = [adapter]
    for n, (stage, plan) in enumerate(chain, 1):
        try:
            stage.validate_plan(plan, adapters[-1])
        except MoePruneError as e:
            raise MoePruneError(f"plan {n} ({stage.kind}, {plan.method}): {e}") from None
        adapters.append(adapter_after(adapters[-1], stage.next_config(plan, adapters[-1])))
    return adapters


# ---------------------------------------------------------------------------------------------- plans on disk
def plan_file(n: int, stage: Stage) -> str:
    return f"{PLANS_DIR}/{n}-{stage.kind}.json"


def load_plan(path: Path) -> tuple[Stage, Any]:
    raw = read_plan_json(path, "plan")
    if not isinstance(raw, dict):
        raise MoePruneError(f"plan {path} must hold a JSON object.")
    fmt = raw.get("format")
    if fmt is None and "kept_experts" in raw:  # plans of the first release carried no format
        fmt = PLAN_FORMAT
    stage = stage_for_format(fmt, str(path))
    return stage, stage.load_plan(raw, str(path))


def read_chain(path: str | Path) -> Chain:
    """The plans to replay or verify: an export folder, a recipe file whose stages name their plans, or one plan.

    Exports of older releases hold one plan under its own name (moeprune_merge.json, moeprune_neurons.json, or the
    kept experts in moeprune_report.json); those are read too."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / RECIPE_NAME).is_file():
            return _chain_from_recipe(path / RECIPE_NAME)
        return _legacy_chain(path)
    raw = read_plan_json(path, "plan")  # a clear error for a missing or malformed file
    if isinstance(raw, dict) and raw.get("format") == RECIPE_FORMAT:
        return _chain_from_recipe(path)
    return [load_plan(path)]


def _chain_from_recipe(file: Path) -> Chain:
    raw = read_plan_json(file, "recipe")
    stages = raw.get("stages") if isinstance(raw, dict) else None
    if not isinstance(stages, list) or not stages:
        raise MoePruneError(f"{file}: no 'stages' list.")
    chain = []
    for n, entry in enumerate(stages, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("plan"), str):
            raise MoePruneError(f"{file}: stage {n} names no plan file ('plan': \"{PLANS_DIR}/{n}-<kind>.json\"); "
                                "only recipes written into exports can be replayed — run `moeprune prune --recipe` "
                                "to make the plans.")
        chain.append(load_plan(file.parent / entry["plan"]))
    return chain


def _legacy_chain(folder: Path) -> Chain:
    from moeprune.stages.experts import EXPERTS
    from moeprune.stages.merge import MERGE, MERGE_PLAN_NAME
    from moeprune.stages.neurons import NEURON_PLAN_NAME, NEURONS

    report = _json_or_none(folder / REPORT_NAME)
    if (folder / MERGE_PLAN_NAME).is_file():
        return [(MERGE, MERGE.load_plan(read_plan_json(folder / MERGE_PLAN_NAME, "merge plan"),
                                        str(folder / MERGE_PLAN_NAME)))]
    chain: Chain = []
    if report is not None and isinstance(report.get("kept_experts"), dict):
        chain.append((EXPERTS, PrunePlan.from_dict(report, source=str(folder / REPORT_NAME))))
    if (folder / NEURON_PLAN_NAME).is_file():
        chain.append((NEURONS, NEURONS.load_plan(read_plan_json(folder / NEURON_PLAN_NAME, "neuron plan"),
                                                 str(folder / NEURON_PLAN_NAME))))
    if not chain:
        raise MoePruneError(f"{folder} holds no moeprune plans ({RECIPE_NAME}, {REPORT_NAME} with kept_experts, "
                            f"{MERGE_PLAN_NAME} or {NEURON_PLAN_NAME}); pass --plan PLAN.json.")
    return chain


def is_export(folder: Path) -> bool:
    return any((Path(folder) / n).is_file() for n in (RECIPE_NAME, REPORT_NAME))


def _json_or_none(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except ValueError as e:
        raise MoePruneError(f"{file} is not valid JSON ({e}).") from e
    return data if isinstance(data, dict) else None


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise MoePruneError(f"recipe {path} does not exist.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MoePruneError(f"recipe {path} is not valid YAML: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MoePruneError(f"recipe {path} is not valid JSON: {e} (YAML recipes end in .yaml or .yml)") from e
