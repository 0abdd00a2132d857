"""Testbed text: four clearly different domains, every byte from the local CPython install or a seeded generator.

| domain       | source                                                                  |
|--------------|-------------------------------------------------------------------------|
| `python`     | the standard library's own `.py` files (no tests, no site-packages)     |
| `english`    | the English reference documentation CPython ships (`pydoc_data.topics`) |
| `arithmetic` | generated integer arithmetic with correct results (`417 + 2896 = 3313`)  |
| `records`    | generated JSON records whose fields depend on each other (name -> email) |

Each domain is split into `train`, `calib` and `heldout` parts that share no document: files and topics are
assigned by a hash of their name, generated text uses a different seed per split. The split is a pure function
of the installed CPython, the seed and the budgets, so two builds on one machine see the same bytes.
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moeprune.errors import MoePruneError

SPLITS = ("train", "calib", "heldout")
# fraction of documents (by name hash) per split for the two real-text domains
SPLIT_SHARES = {"train": 0.80, "calib": 0.08, "heldout": 0.12}
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__", "ensurepip", "turtledemo"}


@dataclass(frozen=True)
class DomainText:
    name: str
    splits: dict[str, str]  # split -> text (documents separated by "\n\n")
    origin: str


def _split_of(key: str, seed: int) -> str:
    """Deterministic split by hash of a document's name: sha256(seed:key) as a number in [0, 1)."""
    u = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16**12
    acc = 0.0
    for split in SPLITS:
        acc += SPLIT_SHARES[split]
        if u < acc:
            return split
    return SPLITS[-1]


def _take(docs: list[tuple[str, str]], budget: dict[str, int], seed: int) -> dict[str, str]:
    """Sorted (name, text) documents -> per-split text, each split capped at its character budget.

    A paragraph that already appeared in an earlier document is dropped (CPython repeats some reference
    paragraphs and licence headers verbatim), so no paragraph is in two splits."""
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    used = dict.fromkeys(SPLITS, 0)
    seen: set[str] = set()
    for name, text in docs:
        split = _split_of(name, seed)
        if used[split] >= budget[split]:
            continue
        paras = [p for p in text.split("\n\n") if p.strip() not in seen]
        seen.update(p.strip() for p in paras)
        text = "\n\n".join(paras)
        if not text.strip():
            continue
        text = text[: budget[split] - used[split]]
        parts[split].append(text)
        used[split] += len(text)
    return {s: "\n\n".join(p) for s, p in parts.items()}


def python_source(budget: dict[str, int], seed: int) -> DomainText:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    if len(files) < 50:
        raise MoePruneError(f"the testbed needs CPython's standard library source; found only {len(files)} .py files "
                            f"under {root}. Use a CPython install that ships its .py files.")
    # interleave files by a hash so that the budget samples the whole library, not only its first packages
    files.sort(key=lambda p: hashlib.sha256(f"order:{seed}:{p.relative_to(root)}".encode()).hexdigest())
    docs = [(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in files]
    return DomainText("python", _take(docs, budget, seed), f"{root}/**/*.py")


def english_docs(budget: dict[str, int], seed: int) -> DomainText:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip pydoc_data
        raise MoePruneError("the testbed's English domain reads CPython's pydoc_data.topics, which this Python "
                            "lacks; install a full CPython (e.g. python3-full / python.org build).") from e
    # topics are long reference pages; cut them into paragraphs-sized documents so the split is fine-grained
    docs = []
    for key in sorted(topics):
        paras = [p for p in topics[key].split("\n\n") if len(p.strip()) > 40]
        for i in range(0, len(paras), 6):
            docs.append((f"{key}/{i}", "\n\n".join(paras[i:i + 6])))
    docs.sort(key=lambda d: hashlib.sha256(f"order:{seed}:{d[0]}".encode()).hexdigest())
    return DomainText("english", _take(docs, budget, seed), "pydoc_data.topics")


def _arith_line(rng: random.Random) -> str:
    kind = rng.randrange(5)
    a, b = rng.randint(0, 999), rng.randint(1, 999)
    if kind == 0:
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        return f"{a} - {b} = {a - b}"
    if kind == 2:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a} * {b} = {a * b}"
    if kind == 3:
        q, b = rng.randint(0, 99), rng.randint(1, 30)
        return f"{q * b} / {b} = {q}"
    c = rng.randint(1, 9)
    return f"({a} + {b}) * {c} = {(a + b) * c}"


FIRST = ("Ada Alan Grace Linus Guido Barbara Ken Dennis Margaret Edsger Donald Frances John Radia Tim Sophie "
         "Hedy Claude Niklaus Leslie Shafi Yukihiro Bjarne Anders Rasmus Larry Brendan James Katherine Mary").split()
LAST = ("Lovelace Turing Hopper Torvalds Rossum Liskov Thompson Ritchie Hamilton Dijkstra Knuth Allen Backus "
        "Perlman Berners-Lee Wilson Lamarr Shannon Wirth Lamport Goldwasser Matsumoto Stroustrup Hejlsberg "
        "Lerdorf Wall Eich Gosling Johnson Jackson").split()
CITIES = ("Amsterdam Berlin Cairo Dublin Edinburgh Florence Geneva Helsinki Istanbul Jakarta Kyoto Lisbon Madrid "
          "Nairobi Oslo Paris Quito Rome Seoul Toronto Utrecht Vienna Warsaw Zurich").split()
DEPTS = ("engineering", "research", "sales", "support", "finance", "legal", "design", "operations")


def _record_line(rng: random.Random, ident: int) -> str:
    first, last, city = rng.choice(FIRST), rng.choice(LAST), rng.choice(CITIES)
    age = rng.randint(21, 70)
    dept = rng.choice(DEPTS)
    salary = rng.randint(30, 180) * 1000
    return (f'{{"id": {ident}, "name": "{first} {last}", "email": "{first.lower()}.{last.lower()}@example.org", '
            f'"age": {age}, "born": {2026 - age}, "city": "{city}", "dept": "{dept}", "salary": {salary}, '
            f'"monthly": {salary // 12}}}')


def _generated(name: str, make: Callable[[random.Random, int], str], budget: dict[str, int], seed: int,
               origin: str) -> DomainText:
    splits = {}
    for i, split in enumerate(SPLITS):
        rng = random.Random(f"{name}:{seed}:{i}")
        lines, used, n = [], 0, 0
        while used < budget[split]:
            line = make(rng, 1000 + 7919 * n % 90000)
            lines.append(line)
            used += len(line) + 1
            n += 1
        splits[split] = "\n".join(lines)
    return DomainText(name, splits, origin)


def arithmetic(budget: dict[str, int], seed: int) -> DomainText:
    return _generated("arithmetic", lambda rng, _: _arith_line(rng), budget, seed, "generated: integer arithmetic")


def records(budget: dict[str, int], seed: int) -> DomainText:
    return _generated("records", _record_line, budget, seed, "generated: JSON records")


DOMAINS: dict[str, Callable[[dict[str, int], int], DomainText]] = {
    "python": python_source, "english": english_docs, "arithmetic": arithmetic, "records": records,
}


def build_corpus(budget: dict[str, int], seed: int) -> list[DomainText]:
    """Every domain's train/calib/heldout text under the per-split character budget."""
    return [make(budget, seed) for make in DOMAINS.values()]
