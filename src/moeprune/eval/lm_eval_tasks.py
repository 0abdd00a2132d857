"""The lm-eval path of the generative tasks: a task folder for `moeprune lm-eval --include-path`.

`write_task_folder(out, items)` writes, for every task among `items`:

    <task>.jsonl             its items (`{"domain", "prompt", "target"}`)
    moeprune_<task>.yaml     the shipped YAML (`eval/lm_eval_yaml/`), DATA_FILE -> the absolute path of <task>.jsonl
    utils.py                 `process_results`, which calls `eval/scorers.py` (the native runner's scorers)
    tasks.jsonl              every item, for `moeprune eval --generate --generate-tasks`

The YAMLs ask lm-eval for `generate_until` with the task's `until` strings and `max_gen_toks` (equal to
`gen_tasks.TASKS`), so lm-eval's greedy completions, cut where it cuts them, are scored by the same functions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from moeprune.eval.gen_tasks import get_task, write_items
from moeprune.io.atomic import atomic_dir, check_output

YAML_DIR = Path(__file__).parent / "lm_eval_yaml"


def task_name(task: str) -> str:
    return f"moeprune_{task}"


def write_task_folder(out: str | Path, items: list[dict], overwrite: bool = False) -> tuple[Path, list[str]]:
    """(the folder, its lm-eval task names) for `items`; written atomically, never over foreign files."""
    out_path = check_output(out, [], overwrite)
    tasks = list(dict.fromkeys(i["domain"] for i in items))
    for t in tasks:
        get_task(t)
    with atomic_dir(out_path) as tmp:
        for t in tasks:
            write_items(tmp / f"{t}.jsonl", [i for i in items if i["domain"] == t])
            text = (YAML_DIR / f"{task_name(t)}.yaml").read_text(encoding="utf-8")
            (tmp / f"{task_name(t)}.yaml").write_text(text.replace("DATA_FILE", str(out_path / f"{t}.jsonl")))
        shutil.copyfile(YAML_DIR / "utils.py", tmp / "utils.py")
        write_items(tmp / "tasks.jsonl", items)
    return out_path, [task_name(t) for t in tasks]
