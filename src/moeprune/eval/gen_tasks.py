"""Generative task items, built deterministically from held-out text; the task table (`TASKS`) by name.

An item is `{"domain": task, "prompt": str, "target": str}`: the model completes `prompt` greedily and
`scorers.score(domain, prompt, completion)` judges it; `target` is what the held-out text itself continues with
(for people reading the items; a target always scores 1, see the tests). `build_items(task, text, n, seed)` finds
every candidate in the text, then draws `n` of them with `random.Random(f"{task}:{seed}")` (all when fewer).

| task         | candidates in the text                                    | prompt ends            | until | budget |
|--------------|-----------------------------------------------------------|------------------------|-------|--------|
| `arithmetic` | lines `<expr> = <int>` whose value `ast` confirms          | after ` =`             | `\\n` | 16     |
| `records`    | JSON lines that keep every record rule                    | after the `,` of a     | `\\n` | 96     |
|              |                                                           | seeded field (id or    |       |        |
|              |                                                           | name)                  |       |        |
| `python`     | one-line `def`s whose function (cut as in `scorers`)      | after the `def` line   | —     | 128    |
|              | parses and whose rest after the prompt is ≤ 600 chars     | and 2 body lines       |       |        |

The budget (new tokens) leaves room: a record's rest after its id is at most 60 testbed tokens; a python function
may run past 128 tokens (its complete lines are then scored, see `scorers`).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.eval import scorers
from moeprune.eval.scorers import RECORD_FIELDS

DEFAULT_ITEMS = 64
CUT_FIELDS = ("id", "name")  # a records prompt ends after one of these (seeded per item): the model writes the rest
PROMPT_BODY_LINES = 2
MAX_REST_CHARS = 600

_ARITH = re.compile(r"([0-9+\-*/() ]+) = (-?\d+)")
_DEF = re.compile(r"( *)(?:async )?def \w+\(.*\)(?: -> .+)?:\s*")


def arithmetic_candidates(text: str, rng: random.Random) -> list[dict]:
    out = []
    for line in text.splitlines():
        m = _ARITH.fullmatch(line.strip())
        if m is None:
            continue
        try:
            ok = scorers.eval_expression(m.group(1)) == int(m.group(2))
        except MoePruneError:
            ok = False
        if ok:
            out.append({"prompt": f"{m.group(1).strip()} =", "target": f" {m.group(2)}"})
    return out


def records_candidates(text: str, rng: random.Random) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            pairs = json.loads(line, object_pairs_hook=lambda p: p)
        except ValueError:
            continue
        if not isinstance(pairs, list) or not scorers.record_ok(pairs):
            continue
        nxt = RECORD_FIELDS[RECORD_FIELDS.index(rng.choice(CUT_FIELDS)) + 1]
        cut = line.find(f', "{nxt}":')
        if cut < 0:  # another spacing than the corpus writes
            continue
        out.append({"prompt": line[: cut + 1], "target": line[cut + 1 :]})
    return out


def python_candidates(text: str, rng: random.Random) -> list[dict]:
    out = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if _DEF.fullmatch(line) is None:
            continue
        head = lines[i : i + 1 + PROMPT_BODY_LINES]
        if len(head) < 1 + PROMPT_BODY_LINES or not all(s.strip() for s in head[1:]):
            continue
        prompt = "\n".join(head)
        rest = "\n" + "\n".join(lines[i + 1 + PROMPT_BODY_LINES : i + 1 + PROMPT_BODY_LINES + 40])
        fn = scorers.function_text(prompt, rest)
        if fn is None or fn == prompt:  # never ends in reach, or ends right after the prompt
            continue
        # the target: the function's rest and the line that ends it (the scorer needs to see the end)
        end = rest.find("\n", len(fn) - len(prompt) + 1)
        target = rest if end < 0 else rest[:end]
        if len(target) <= MAX_REST_CHARS and scorers.python(prompt, target)["parses"] == 1.0:
            out.append({"prompt": prompt, "target": target})
    return out


@dataclass(frozen=True)
class TaskSpec:
    """How a task's items are found, cut and scored: `until` strings cut a completion (and stop generation);
    `max_new_tokens` is the greedy token budget; `ends(prompt, text)` stops generation early where the scorer
    has seen all it reads (it never changes a score, only saves tokens)."""

    name: str
    candidates: Callable[[str, random.Random], list[dict]]
    until: tuple[str, ...]
    max_new_tokens: int
    ends: Callable[[str, str], bool] | None = None

    def done(self, prompt: str, text: str) -> bool:
        return any(u in text for u in self.until) or (self.ends is not None and self.ends(prompt, text))

    @property
    def primary(self) -> str:
        return scorers.PRIMARY[self.name]


TASKS: dict[str, TaskSpec] = {
    "arithmetic": TaskSpec("arithmetic", arithmetic_candidates, ("\n",), 16),
    "records": TaskSpec("records", records_candidates, ("\n",), 96),
    "python": TaskSpec("python", python_candidates, (), 128,
                       ends=lambda prompt, text: scorers.function_text(prompt, text) is not None),
}
assert set(TASKS) == set(scorers.SCORERS)


def get_task(name: str) -> TaskSpec:
    scorers.get_scorer(name)  # did-you-mean error for unknown names
    return TASKS[name]


def build_items(task: str, text: str, n: int = DEFAULT_ITEMS, seed: int = 0) -> list[dict]:
    """`n` items of `task` drawn (seeded) from every candidate in `text`, in text order; [] when none."""
    spec = get_task(task)
    rng = random.Random(f"{task}:{seed}")
    cands = spec.candidates(text, rng)
    seen, unique = set(), []
    for c in cands:  # one item per prompt (generated lines can repeat)
        if c["prompt"] not in seen:
            seen.add(c["prompt"])
            unique.append(c)
    picked = sorted(rng.sample(range(len(unique)), min(n, len(unique))))
    return [{"domain": task, **unique[i]} for i in picked]


def cut(completion: str, until: tuple[str, ...]) -> str:
    """The completion before the first occurrence of any `until` string (lm-eval's generate_until does the same)."""
    for u in until:
        completion = completion.split(u, 1)[0]
    return completion


def read_items(path: str | Path) -> list[dict]:
    """Items from a JSONL file (one `{"domain", "prompt", ...}` object a line); every domain must be a task."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MoePruneError(f"--generate-tasks {p} does not exist; write it with `moeprune gen-tasks`.")
    items = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise MoePruneError(f"--generate-tasks {p}:{n} is not JSON ({e}).") from e
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or "domain" not in item:
            raise MoePruneError(f"--generate-tasks {p}:{n}: each line needs \"domain\" and a string \"prompt\".")
        get_task(item["domain"])
        items.append(item)
    if not items:
        raise MoePruneError(f"--generate-tasks {p} holds no items.")
    return items


def write_items(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
