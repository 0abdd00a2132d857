"""Exact, executable checks of greedy completions: one pure scorer per generative task, registered by name.

A scorer maps (prompt, completion) -> {metric: 0.0 or 1.0}; a task's score is the mean over its items. The
completion is what the model wrote after the prompt, already cut at the task's `until` strings (the native runner
and lm-eval's `generate_until` both cut there; see `eval/generative.py`).

| task         | prompt                               | primary metric | rule                                         |
|--------------|--------------------------------------|----------------|----------------------------------------------|
| `arithmetic` | `"417 + 2896 ="`                     | `exact_match`  | first integer of the completion == the value |
|              |                                      |                | of the expression (computed with `ast`);     |
|              |                                      |                | `well_formed`: the completion is one integer |
| `records`    | a record line up to the `,` after    | `strict`       | prompt + completion parses as a JSON object  |
|              | its id or its name                   |                | with every field in order, email = first.last|
|              |                                      |                | @example.org, born = 2026 − age, monthly =   |
|              |                                      |                | salary // 12; softer: `json` (parses as an   |
|              |                                      |                | object), `fields` (and keeps the fields, in  |
|              |                                      |                | order, typed), `email`, `born` (that rule)   |
| `python`     | a `def` line and its first lines     | `parses`       | see below; `finished`: the function ended    |

Python: the function ends before the first non-empty line indented at or below its `def` line. A completion that
reaches that line is cut there; one that does not (the token budget ran out, or the model stopped) keeps only its
complete lines: the last line, which the budget may have cut mid-token, is dropped. `parses` = 1 iff the kept
text, dedented, passes `ast.parse`. Measured on the testbed (64 items, 128 tokens): the original finished 12.5 % of
its functions within the budget, so counting an unfinished function as a failure would score it near 0 and leave
no room to see a loss, while its kept text parses in 72 % of items. A model that loops on valid lines still
passes `parses`; `finished` (reported next to it) is what falls then.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import textwrap
from collections.abc import Callable

from moeprune.errors import MoePruneError

Scorer = Callable[[str, str], dict[str, float]]

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_NUMBER = re.compile(r"-?\d+")
_ANSWER = re.compile(r" -?\d+ *")


def eval_expression(expr: str) -> int:
    """Exact integer value of `expr`: int literals, + - * /, parentheses, unary minus; `/` must divide exactly
    (the corpus writes only exact quotients). Anything else raises MoePruneError. Never calls `eval`."""

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            a, b = value(node.left), value(node.right)
            if b == 0 or a % b:
                raise MoePruneError(f"{expr!r}: {a} / {b} is not an exact integer division.")
            return a // b
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise MoePruneError(f"{expr!r}: only integers, + - * / and parentheses are allowed in arithmetic prompts.")

    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise MoePruneError(f"{expr!r} is not an arithmetic expression ({e.msg}).") from e
    return value(tree.body)


def arithmetic(prompt: str, completion: str) -> dict[str, float]:
    """prompt `"<expr> ="`: `exact_match` = 1 iff the completion's first integer equals the expression's value;
    `well_formed` = 1 iff the completion (cut at its newline) is one integer after a space, as the corpus writes."""
    expr, sep, _ = prompt.rpartition("=")
    if not sep:
        raise MoePruneError(f"arithmetic prompt {prompt!r} must end with '='.")
    m = _NUMBER.search(completion)
    return {"exact_match": float(m is not None and int(m.group()) == eval_expression(expr)),
            "well_formed": float(_ANSWER.fullmatch(completion.split("\n", 1)[0]) is not None)}


RECORD_FIELDS = ("id", "name", "email", "age", "born", "city", "dept", "salary", "monthly")
INT_FIELDS = ("id", "age", "born", "salary", "monthly")
STR_FIELDS = ("name", "email", "city", "dept")


def record_checks(rec: list[tuple[str, object]]) -> dict[str, bool]:
    """`fields`: keys are RECORD_FIELDS in order (no duplicate), integers and strings where the corpus has them;
    with the fields kept: `email` = "<first>.<last>@example.org" (lower case) from name "<first> <last>",
    `born` = 2026 − age, `monthly` = salary // 12."""
    r = dict(rec)
    fields = (tuple(k for k, _ in rec) == RECORD_FIELDS and all(type(r[k]) is int for k in INT_FIELDS)
              and all(isinstance(r[k], str) for k in STR_FIELDS))
    if not fields:
        return dict.fromkeys(("fields", "email", "born", "monthly"), False)
    parts = r["name"].split(" ")
    email = len(parts) == 2 and r["email"] == f"{parts[0].lower()}.{parts[1].lower()}@example.org"
    return {"fields": True, "email": email, "born": r["born"] == 2026 - r["age"],
            "monthly": r["monthly"] == r["salary"] // 12}


def record_ok(rec: list[tuple[str, object]]) -> bool:
    """Every rule of `record_checks` holds."""
    return all(record_checks(rec).values())


def records(prompt: str, completion: str) -> dict[str, float]:
    """prompt + completion up to its first newline: `json` = parses as a JSON object; `strict` = and `record_ok`;
    `fields`, `email`, `born`: that check of `record_checks` (0 when it does not parse)."""
    line = (prompt + completion).split("\n", 1)[0]
    try:
        pairs = json.loads(line, object_pairs_hook=lambda p: p)
    except ValueError:
        pairs = None
    if not isinstance(pairs, list):  # the hook turns every object into its (key, value) list
        return {"strict": 0.0, "json": 0.0, "fields": 0.0, "email": 0.0, "born": 0.0}
    c = record_checks(pairs)
    return {"strict": float(all(c.values())), "json": 1.0, "fields": float(c["fields"]), "email": float(c["email"]),
            "born": float(c["born"])}


def function_text(prompt: str, completion: str) -> str | None:
    """The function that `prompt` (its first line a `def`) starts, cut before the first non-empty line of the
    completion indented at or below the `def` line; None when no such line comes (the function never ended)."""
    indent = len(prompt) - len(prompt.lstrip(" "))
    lines = (prompt + completion).split("\n")
    head = prompt.count("\n") + 1  # lines of the prompt: the completion's first line continues the last one
    for i in range(head, len(lines)):
        s = lines[i]
        if s.strip() and len(s) - len(s.lstrip(" \t")) <= indent:
            return "\n".join(lines[:i])
    return None


def python(prompt: str, completion: str) -> dict[str, float]:
    """`finished` = the function ended within the completion; `parses` = the function (when it ended) or else the
    prompt and the completion's complete lines (all but the last), dedented, pass `ast.parse`."""
    text = function_text(prompt, completion)
    finished = text is not None
    if text is None:
        text = (prompt + completion).rsplit("\n", 1)[0] if "\n" in completion else prompt
    try:
        ast.parse(textwrap.dedent(text))
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return {"parses": 0.0, "finished": float(finished)}
    return {"parses": 1.0, "finished": float(finished)}


SCORERS: dict[str, Scorer] = {"arithmetic": arithmetic, "records": records, "python": python}
PRIMARY = {"arithmetic": "exact_match", "records": "strict", "python": "parses"}


def get_scorer(task: str) -> Scorer:
    """The scorer of `task`; unknown names get a did-you-mean MoePruneError."""
    if task not in SCORERS:
        import difflib

        close = difflib.get_close_matches(task, SCORERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MoePruneError(f"no generative task {task!r}{hint}; tasks: {', '.join(SCORERS)}. English text has "
                            "no exact check, so it has no generative task (see docs/generation.md).")
    return SCORERS[task]


def score(task: str, prompt: str, completion: str) -> dict[str, float]:
    return get_scorer(task)(prompt, completion)
