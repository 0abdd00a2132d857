"""JSON files of output folders: `write_json_atomic` (temporary sibling, then rename) and `read_report` (a folder's
`moeprune_report.json`).

An export's report and the provenance block in its config.json are built stage by stage in `pipeline/export.py`
(`build_report`, `provenance`). `provenance` and `build_report` here are the older builders for one expert plan;
nothing in the package calls them now."""

from __future__ import annotations

import json
import time
from pathlib import Path

from moeprune import __version__
from moeprune.select.plan import PrunePlan

REPORT_NAME = "moeprune_report.json"


def provenance(plan: PrunePlan, source: Path) -> dict:
    """Small block stored under "moeprune" in the pruned config.json."""
    return {
        "version": __version__,
        "method": plan.method,
        "ratio": plan.ratio,
        "source": str(source),
        "plan_sha256": plan.sha256(),
        "num_experts_before": plan.num_experts,
        "num_experts_after": plan.kept_count,
    }


def build_report(plan: PrunePlan, source: Path, mode: str, bytes_before: int, bytes_after: int) -> dict:
    return {
        "moeprune_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": str(source),
        "model_type": plan.model_type,
        "method": plan.method,
        "ratio": plan.ratio,
        "plan_sha256": plan.sha256(),
        "apply_mode": mode,
        "num_experts": plan.num_experts,  # the original count, as in a plan
        "num_experts_before": plan.num_experts,
        "num_experts_after": plan.kept_count,
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": bytes_after,
        "kept_experts": {str(k): v for k, v in sorted(plan.kept_experts.items())},
        "dropped_experts": {str(k): plan.dropped(k) for k in plan.layers},
        "policy": plan.policy,
        "protected_experts": {str(k): v for k, v in sorted((plan.protected or {}).items())},
        "padded_experts": {str(k): v for k, v in sorted((plan.padded or {}).items())},
        "loadable_by_stock_config": True,  # every export is; a non-uniform selection is padded (see "note")
        "note": plan.note or "",
    }


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def read_report(folder: Path) -> dict | None:
    f = Path(folder) / REPORT_NAME
    return json.loads(f.read_text()) if f.is_file() else None
