"""JSON files moeprune writes next to its outputs: atomic writes, and reading an export's `moeprune_report.json`
(what goes into a report is built by `pipeline/export.py`)."""

from __future__ import annotations

import json
from pathlib import Path

REPORT_NAME = "moeprune_report.json"


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def read_report(folder: Path) -> dict | None:
    f = Path(folder) / REPORT_NAME
    return json.loads(f.read_text()) if f.is_file() else None
