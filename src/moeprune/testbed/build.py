"""`moeprune testbed build`: corpus -> tokenizer -> trained Qwen3-MoE -> held-out scores and routing report.

The folder (default: the user cache, see `cache_root`) is a normal HF checkpoint plus

    testbed.json            config, versions, domains, held-out scores, routing shares and specialisation
    routing.png             domains × experts heat map per layer
    data/<domain>.calib.txt      calibration text (disjoint from training and held-out text)
    data/<domain>.heldout.txt    held-out evaluation text

It is written atomically (temp folder, then rename) and reused when present; `force=True` rebuilds it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moeprune.errors import MoePruneError
from moeprune.io.atomic import atomic_dir, check_replaceable
from moeprune.log import logger
from moeprune.testbed.corpus import build_corpus
from moeprune.testbed.routing import format_routing, plot_routing, routing_shares, specialisation
from moeprune.testbed.tokenizer import train_tokenizer
from moeprune.testbed.train import TestbedConfig, train_model

TESTBED_FILE = "testbed.json"
SCHEMA = "moeprune.testbed/1"
# bump when the corpus, tokenizer or training recipe changes: the default cache folder moves with it, so an old
# testbed is never reused for a new recipe (configs alone cannot tell)
RECIPE = 1
CALIB, HELDOUT = "calib", "heldout"


def cache_root() -> Path:
    """$MOEPRUNE_CACHE, else $XDG_CACHE_HOME/moeprune, else ~/.cache/moeprune."""
    if os.environ.get("MOEPRUNE_CACHE"):
        return Path(os.environ["MOEPRUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "moeprune"


def default_dir() -> Path:
    """Where `moeprune testbed build` puts the default testbed: one per recipe and Python minor version (the
    standard library's source is training data)."""
    major, minor, _ = platform.python_version_tuple()
    return cache_root() / f"testbed-r{RECIPE}-py{major}{minor}"


@dataclass(frozen=True)
class Testbed:
    __test__ = False  # not a pytest class

    path: Path
    meta: dict

    @classmethod
    def load(cls, path: str | Path) -> Testbed:
        path = Path(path).expanduser().resolve()
        f = path / TESTBED_FILE
        if not f.is_file():
            raise MoePruneError(f"{path} is not a moeprune testbed (no {TESTBED_FILE}); build one with "
                                "`moeprune testbed build`.")
        meta = json.loads(f.read_text())
        if meta.get("schema") != SCHEMA:
            raise MoePruneError(f"{f}: schema {meta.get('schema')!r}, expected {SCHEMA!r}; rebuild it with "
                                "`moeprune testbed build --force`.")
        return cls(path, meta)

    @property
    def home(self) -> Path:
        """The folder that holds the data files (a pruned copy of the testbed points back at its origin)."""
        return Path(self.meta["home"])

    @property
    def seq_len(self) -> int:
        return int(self.meta["config"]["seq_len"])

    def data(self, split: str) -> dict[str, Path]:
        """{domain: text file} of the `calib` or `heldout` split; errors when the files are gone."""
        out = {}
        for name, d in self.meta["domains"].items():
            p = self.path / d["files"][split]
            if not p.is_file():
                p = self.home / d["files"][split]
            if not p.is_file():
                raise MoePruneError(f"testbed data {d['files'][split]} is missing (looked in {self.path} and "
                                    f"{self.home}); rebuild with `moeprune testbed build --force`.")
            out[name] = p
        return out

    def specs(self, split: str) -> tuple[str, ...]:
        """('python=/…/python.heldout.txt', …) — ready for `--data` / `--calib`."""
        return tuple(f"{name}={p}" for name, p in self.data(split).items())


def find_testbed(model: str | Path | None = None) -> Testbed | None:
    """The testbed that the folder `model` is or was made from, else None; with no `model`, the cached default.

    A folder counts as the testbed or one of its derivatives when it holds `testbed.json`: the build writes it,
    and every export (prune, apply, merge, neuron pruning) copies it along as a side file, so the mark survives
    chains of exports and copies of the folder. (Config provenance `moeprune.source` is not used: it names only the
    previous step and goes stale when a folder moves.) Any other model gets None, never the cached default: its
    domains are unknown, so scoring it on the testbed's text would mean nothing."""
    cand = Path(model).expanduser() if model is not None else default_dir()
    return Testbed.load(cand) if (cand / TESTBED_FILE).is_file() else None


def _token_stream(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids + [tokenizer.eos_token_id], dtype=torch.long)


def _versions() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def build_testbed(out: str | Path | None = None, force: bool = False, cfg: TestbedConfig | None = None) -> Testbed:
    """Build (or reuse) the testbed in `out` (default `default_dir()`).

    An existing testbed is reused when `cfg` is None or equals its recorded config; a different `cfg` is refused
    unless `force` (never silently hand back a model other than the one asked for)."""
    target = Path(out).expanduser().resolve() if out is not None else default_dir().resolve()
    if target.exists() and not force:
        if (target / TESTBED_FILE).is_file():
            tb = Testbed.load(target)
            if cfg is not None and tb.meta["config"] != cfg.to_dict():
                diff = {k: (tb.meta["config"].get(k), v) for k, v in cfg.to_dict().items()
                        if tb.meta["config"].get(k) != v}
                raise MoePruneError(f"{target} holds a testbed built with another config (recorded, asked: {diff});"
                                    " pass --force to rebuild it or choose another --out.")
            logger.info("reusing the testbed in %s (pass --force to rebuild)", target)
            return tb
        raise MoePruneError(f"{target} exists and is not a testbed; choose another --out (--force replaces only an "
                            "empty folder or a previous moeprune output).")
    if target.exists() and not target.is_dir():
        raise MoePruneError(f"{target} exists and is not a folder.")
    if target.exists():
        check_replaceable(target)  # --force: never delete someone else's files
    if out is None:
        target.parent.mkdir(parents=True, exist_ok=True)
    elif not target.parent.is_dir():
        raise MoePruneError(f"the parent folder of {target} does not exist; create it first.")
    cfg = cfg or TestbedConfig()
    t0 = time.perf_counter()
    logger.info("building the testbed in %s (about 8 minutes on one CPU core)", target)
    with atomic_dir(target) as tmp:
        meta = _build_into(tmp, target, cfg)
        meta["build_seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / TESTBED_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    tb = Testbed.load(target)
    print(describe(tb))
    return tb


def _build_into(tmp: Path, target: Path, cfg: TestbedConfig) -> dict:
    from moeprune.calibration.data import CalibConfig, CalibSource, build_sets
    from moeprune.calibration.session import collect
    from moeprune.eval.perplexity import evaluate_sets
    from moeprune.models import get_adapter

    corpus = build_corpus(cfg.budget(), cfg.seed)
    (tmp / "data").mkdir()
    domains = {}
    for d in corpus:
        files = {}
        for split in (CALIB, HELDOUT):
            rel = f"data/{d.name}.{split}.txt"
            (tmp / rel).write_text(d.splits[split], encoding="utf-8")
            files[split] = rel
        domains[d.name] = {"origin": d.origin, "chars": {k: len(v) for k, v in d.splits.items()}, "files": files}
    logger.info("testbed: training the BPE tokenizer (vocabulary %d)", cfg.vocab_size)
    tokenizer = train_tokenizer([d.splits["train"][: cfg.tokenizer_chars] for d in corpus], cfg.vocab_size)
    streams = [_token_stream(tokenizer, d.splits["train"]) for d in corpus]
    model, log = train_model(cfg, tokenizer, streams)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)

    def sets_of(split: str, samples: int):
        sources = tuple(CalibSource(d.name, tmp / domains[d.name]["files"][split]) for d in corpus)
        return build_sets(CalibConfig(sources, samples=samples, seq_len=cfg.seq_len, warn_short=False), tokenizer)

    scores = evaluate_sets(model, sets_of(HELDOUT, 1 << 20))
    adapter = get_adapter(model.config, model=model)
    counts = collect(model, adapter, sets_of(CALIB, 64)).stats
    shares = routing_shares({d: {layer: s.sums["count"].numpy() for layer, s in by.items()}
                             for d, by in counts.items()})
    layers = sorted(next(iter(counts.values())))
    plot_routing(shares, layers, tmp / "routing.png")
    heldout = {n: {**s.to_dict(), "loss": s.nll_sum / s.tokens} for n, s in scores.items()}
    return {
        "schema": SCHEMA, "recipe": RECIPE, "home": str(target), "config": cfg.to_dict(), "versions": _versions(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "domains": domains,
        "heldout": heldout,
        "heldout_loss_mean": sum(h["loss"] for h in heldout.values()) / len(heldout),
        "routing": {"layers": layers, "shares": {d: m.round(5).tolist() for d, m in shares.items()},
                    "specialisation": specialisation(shares)},
        "train_log": {str(k): [round(v, 5) for v in vals] for k, vals in log.items()},
    }


def describe(tb: Testbed) -> str:
    """Human summary: size, held-out scores per domain, routing per domain and specialisation."""
    import numpy as np

    m = tb.meta
    c = m["config"]
    lines = [f"testbed {tb.path}",
             f"  qwen3_moe: {c['num_layers']} layers, {c['num_experts']} experts top-{c['top_k']}, hidden "
             f"{c['hidden_size']}, expert width {c['moe_intermediate_size']}, vocab {c['vocab_size']}, "
             f"{m['parameters']:,} parameters; {c['steps']} steps × {c['batch_size']} × {c['seq_len']} tokens, "
             f"built in {m.get('build_seconds', 0):.0f} s",
             f"  {'held-out':<11} {'perplexity':>10} {'accuracy':>9} {'tokens':>8}"]
    lines += [f"  {n:<11} {h['perplexity']:10.3f} {h['accuracy']:9.3f} {h['tokens']:8d}"
              for n, h in m["heldout"].items()]
    lines.append(f"  mean held-out loss {m['heldout_loss_mean']:.4f} nats/token")
    shares = {d: np.asarray(v) for d, v in m["routing"]["shares"].items()}
    lines.append(format_routing(shares, m["routing"]["layers"]))
    lines.append(f"  plot: {tb.path / 'routing.png'}")
    return "\n".join(lines)
