"""Generative tasks: scorers on hand-written completions, item building from held-out text (checked by brute force),
the native runner on a stub model with known outputs, the shipped lm-eval YAMLs, and refusals before any work."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch
import yaml

from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.eval import generative
from moeprune.eval.gen_tasks import TASKS, build_items, read_items
from moeprune.eval.lm_eval_tasks import YAML_DIR, write_task_folder
from moeprune.eval.run import EvalOptions, evaluate
from moeprune.eval.scorers import eval_expression, score
from moeprune.testbed.corpus import arithmetic, python_source, records
from moeprune.tiny import save_tiny

BUDGET = {"train": 2_000, "calib": 20_000, "heldout": 20_000}
REC = ('{"id": 1000, "name": "Ada Knuth", "email": "ada.knuth@example.org", "age": 30, "born": 1996, "city": "Oslo", '
       '"dept": "legal", "salary": 60000, "monthly": 5000}')


# ------------------------------------------------------------------------------------------------- scorers
def test_arithmetic_scorer():
    assert score("arithmetic", "12 + 30 =", " 42\n") == {"exact_match": 1.0, "well_formed": 1.0}
    assert score("arithmetic", "12 + 30 =", " 43")["exact_match"] == 0.0
    assert score("arithmetic", "12 + 30 =", " 42 is it")["exact_match"] == 1.0  # the first number counts
    assert score("arithmetic", "12 + 30 =", " 42 is it")["well_formed"] == 0.0
    assert score("arithmetic", "12 + 30 =", " forty-two") == {"exact_match": 0.0, "well_formed": 0.0}
    assert score("arithmetic", "416 - 697 =", " -281")["exact_match"] == 1.0
    assert score("arithmetic", "(3 + 4) * 5 =", " 35")["exact_match"] == 1.0
    assert score("arithmetic", "2318 / 61 =", " 38")["exact_match"] == 1.0
    assert score("arithmetic", "2318 / 61 =", " 38.0")["exact_match"] == 1.0  # first integer: 38
    for bad in ("7 / 2", "2 ** 3", "__import__('os')", "1.5 + 1", "x + 1", "1 +"):
        with pytest.raises(MoePruneError):
            eval_expression(bad)


def test_records_scorer():
    head, rest = REC[: REC.index(' "email"')], REC[REC.index(' "email"') :]
    assert score("records", head, rest + "\n{next") == {"strict": 1.0, "json": 1.0, "fields": 1.0, "email": 1.0,
                                                       "born": 1.0}
    wrong_email = rest.replace("ada.knuth", "ada.turing")
    assert score("records", head, wrong_email) == {"strict": 0.0, "json": 1.0, "fields": 1.0, "email": 0.0,
                                                  "born": 1.0}
    assert score("records", head, rest.replace('"born": 1996', '"born": 1995'))["strict"] == 0.0
    assert score("records", head, rest.replace('"monthly": 5000', '"monthly": 5001'))["strict"] == 0.0
    assert score("records", head, rest.replace(', "city": "Oslo"', "")) == {
        "strict": 0.0, "json": 1.0, "fields": 0.0, "email": 0.0, "born": 0.0}
    assert score("records", head, rest[:-1])["json"] == 0.0  # the line never closes


def test_python_scorer():
    prompt = "    def f(self, x):\n        y = x + 1"
    good = "\n        return y\n\n    def g(self):"
    assert score("python", prompt, good) == {"parses": 1.0, "finished": 1.0}
    assert score("python", prompt, "\n        return (y\n\n    def g(self):") == {"parses": 0.0, "finished": 1.0}
    # no line at the def's indentation: unfinished; its complete lines are parsed, the cut last line dropped
    assert score("python", prompt, "\n        z = y\n        return fo(") == {"parses": 1.0, "finished": 0.0}
    assert score("python", prompt, "\n        z = (y\n        return y") == {"parses": 0.0, "finished": 0.0}
    assert score("python", "def f():\n    return 1", "\nx = f(") == {"parses": 1.0, "finished": 1.0}
    with pytest.raises(MoePruneError, match="did you mean 'records'"):
        score("record", "", "")


# -------------------------------------------------------------------------------------------- task items
def test_items_are_deterministic_and_from_the_given_text():
    for task, make in (("arithmetic", arithmetic), ("records", records), ("python", python_source)):
        splits = make(BUDGET, 0).splits
        items = build_items(task, splits["heldout"], 12, seed=0)
        assert len(items) == 12 and items == build_items(task, splits["heldout"], 12, seed=0), task
        assert items != build_items(task, splits["heldout"], 12, seed=1), task
        for i in items:
            assert i["domain"] == task and i["prompt"] + i["target"] in splits["heldout"], task
            assert i["prompt"] + i["target"] not in splits["calib"], task


def test_item_answers_equal_a_brute_force_recomputation():
    text = arithmetic(BUDGET, 0).splits["heldout"]
    for i in build_items("arithmetic", text, 40):
        lhs = i["prompt"].removesuffix(" =")
        assert eval(lhs) == int(i["target"])  # the reference: Python itself (/ is exact in the corpus)
        assert score("arithmetic", i["prompt"], i["target"] + "\n")["exact_match"] == 1.0
    for i in build_items("records", records(BUDGET, 0).splits["heldout"], 40):
        assert i["prompt"].endswith(",") and re.match(r' "(?:name|email)":', i["target"]), i  # after id or name
        r = json.loads(i["prompt"] + i["target"])
        first, last = r["name"].split()
        assert r["email"] == f"{first.lower()}.{last.lower()}@example.org" and r["born"] == 2026 - r["age"]
        assert r["monthly"] == r["salary"] // 12
        assert score("records", i["prompt"], i["target"])["strict"] == 1.0
    for i in build_items("python", python_source(BUDGET, 0).splits["heldout"], 20):
        lines = (i["prompt"] + i["target"]).split("\n")
        indent = len(lines[0]) - len(lines[0].lstrip())
        assert len(lines[-1]) - len(lines[-1].lstrip()) <= indent and lines[-1].strip()  # the closing line
        compile(textwrap.dedent("\n".join(lines[:-1])), "<item>", "exec")
        assert score("python", i["prompt"], i["target"]) == {"parses": 1.0, "finished": 1.0}


# ------------------------------------------------------------------------------------------ native runner
class CharTokenizer:
    """Characters as ids (ord + 2; 0 pad, 1 eos)."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) + 2 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 2) for i in ids if i > 1)

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(r.tolist()) for r in rows]


class StubModel(torch.nn.Module):
    """`generate` appends a fixed completion per prompt (found by decoding the unpadded row)."""

    def __init__(self, answers: dict[str, str]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.answers, self.tok = answers, CharTokenizer()

    def generate(self, ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for row, mask in zip(ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = self.tok.decode([t for t, m in zip(row, mask, strict=True) if m])
            rows.append(self.tok(self.answers[prompt])["input_ids"][:max_new_tokens])
        width = max(map(len, rows))
        return torch.cat([ids, torch.tensor([r + [0] * (width - len(r)) for r in rows])], dim=1)


def test_native_runner_scores_known_completions():
    head = REC[: REC.index(' "salary"')]  # the rest fits the records budget (96 tokens) as characters
    answers = {"12 + 30 =": " 42\n7 + 1 = 8", "5 * 5 =": " 24\n", "100 / 4 =": " 25",
               head: REC[len(head) :] + "\n{", head.replace("1000", "1001"): REC[len(head) :].replace("5000", "5001")}
    items = [{"domain": "records" if p.startswith("{") else "arithmetic", "prompt": p} for p in answers]
    got = generative.evaluate_generative(StubModel(answers), CharTokenizer(), items, batch_size=2)
    assert list(got) == ["arithmetic", "records"]
    assert got["arithmetic"].metrics == {"exact_match": pytest.approx(2 / 3), "well_formed": 1.0}
    assert got["arithmetic"].completions == [" 42", " 24", " 25"]  # cut at the newline, in item order
    assert got["records"].metrics["strict"] == 0.5 and got["records"].metrics["json"] == 1.0
    assert got["records"].items == 2 and got["records"].primary == "strict"


# ----------------------------------------------------------------------------------- lm-eval YAMLs, files
def test_shipped_yamls_match_the_task_table(tmp_path):
    loader = type("L", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda ld, node: ld.construct_scalar(node))
    for name, spec in TASKS.items():
        y = yaml.load((YAML_DIR / f"moeprune_{name}.yaml").read_text(), Loader=loader)
        assert y["generation_kwargs"]["until"] == list(spec.until)
        assert y["generation_kwargs"]["max_gen_toks"] == spec.max_new_tokens
        assert y["process_results"] == "utils.process_results"
        assert {m["metric"] for m in y["metric_list"]} == set(score(name, *_sample(name)))
    items = [{"domain": "arithmetic", "prompt": "1 + 1 =", "target": " 2"}]
    out, names = write_task_folder(tmp_path / "tasks", items)
    assert names == ["moeprune_arithmetic"] and read_items(out / "tasks.jsonl") == items
    assert f"test: {out / 'arithmetic.jsonl'}" in (out / "moeprune_arithmetic.yaml").read_text()


def _sample(task: str) -> tuple[str, str]:
    return {"arithmetic": ("1 + 1 =", " 2"), "records": (REC[:12], REC[12:]), "python": ("def f():", "")}[task]


def test_refusals_before_any_work(tmp_path, monkeypatch, capsys):
    from moeprune.eval import run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    ckpt = save_tiny("qwen3_moe", tmp_path / "m", with_tokenizer=True)
    web = tmp_path / "web.txt"
    web.write_text("some words here. " * 20)
    with pytest.raises(MoePruneError, match="no generative items.*--generate-tasks"):
        evaluate(ckpt, EvalOptions((f"web={web}",), generate=True))
    with pytest.raises(MoePruneError, match="apply to the generative tasks only"):
        EvalOptions((f"web={web}",), gen_items=5)
    with pytest.raises(MoePruneError, match="Drop one of them"):
        EvalOptions(generate=True, generate_tasks="x.jsonl", gen_items=5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"domain": "arithmetics", "prompt": "1 + 1 ="}) + "\n")
    with pytest.raises(MoePruneError, match="did you mean 'arithmetic'"):
        evaluate(ckpt, EvalOptions((f"web={web}",), generate=True, generate_tasks=str(bad)))
    with pytest.raises(MoePruneError, match="does not exist"):
        evaluate(ckpt, EvalOptions((f"web={web}",), generate=True, generate_tasks=str(tmp_path / "none.jsonl")))
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "empty-cache"))
    assert main(["eval", str(ckpt), "--generate"]) == 2  # no data at all: not the testbed
    assert main(["gen-tasks", str(ckpt), "--out", str(tmp_path / "t")]) == 2
    assert main(["compare", str(ckpt), str(ckpt), "--data", f"web={web}", "--generate", "--out",
                 str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "no evaluation data" in err and "no generative items" in err and not (tmp_path / "t").exists()


def test_eval_json_compare_and_analyze_results_carry_the_generative_scores(tmp_path, capsys):
    from moeprune import api
    from moeprune.analysis.results import results_sections

    ckpt = save_tiny("qwen3_moe", tmp_path / "m", seed=2, with_tokenizer=True, max_position_embeddings=256)
    pruned = tmp_path / "pruned"
    api.prune(ckpt, pruned, method="aimer", ratio=0.5, run_verify=False)
    web, tasks = tmp_path / "web.txt", tmp_path / "tasks.jsonl"
    web.write_text("word is word. " * 10)
    tasks.write_text("".join(json.dumps({"domain": "arithmetic", "prompt": p}) + "\n" for p in ("1 + 1 =", "2 * 3 =")))
    flags = ["--data", f"web={web}", "--seq-len", "16", "--generate", "--generate-tasks", str(tasks)]
    assert main(["eval", str(pruned), *flags, "--json", str(tmp_path / "e.json")]) == 0
    data = json.loads((tmp_path / "e.json").read_text())
    assert set(data) == {"web", "arithmetic"} and data["arithmetic"]["generate"]["items"] == 2
    assert "generative (items)" in capsys.readouterr().out
    assert main(["compare", str(ckpt), str(pruned), *flags, "--out", str(tmp_path / "cmp")]) == 0
    gen = json.loads((tmp_path / "cmp" / "compare.json").read_text())["generative"]
    opts = EvalOptions((f"web={web}",), seq_len=16, generate=True, generate_tasks=str(tasks))
    before, after = (evaluate(p, opts).generative["arithmetic"].metrics for p in (ckpt, pruned))
    assert [(g["metric"], g["before"], g["after"]) for g in gen] == [(m, before[m], after[m]) for m in before]
    assert gen[0]["primary"] and gen[0]["perplexity_ratio"] is None  # no --data set named arithmetic
    assert "| arithmetic |" in (tmp_path / "cmp" / "compare.md").read_text()
    (tmp_path / "rep").mkdir()
    section = results_sections([tmp_path / "cmp"], tmp_path / "rep")[0]
    table = section["tables"][1]
    assert table["columns"][:4] == ["task", "metric", "before", "after"]
    assert [r[:4] for r in table["rows"]] == [["arithmetic", m, before[m], after[m]] for m in before]
