"""Expert merging end to end through the CLI: `prune --method msmoe|hcsmoe|submoe|dern` writes a checkpoint with
fewer experts that stock `from_pretrained` loads and that equals the original merged in memory by the same plan;
`plan` + `apply` reproduce it; `verify` catches a tampered export; bad input is refused before any work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moeprune.cli import main
from moeprune.merge.plan import MergePlan
from moeprune.models import get_adapter
from moeprune.pipeline.verify import logits_of, seeded_inputs
from moeprune.surgery.merge import apply_merge_plan
from moeprune.tiny import save_tiny

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
CALIB = ["--samples", "6", "--seq-len", "48"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_cli")
    g = torch.Generator().manual_seed(0)
    (root / "web.txt").write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, 10, (2500,), generator=g)))
    for family in ("qwen3_moe", "deepseek_v3", "gpt_oss"):
        save_tiny(family, root / family, seed=1, with_tokenizer=True)
    return root


def merged_in_memory(src, plan: MergePlan, inputs) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    apply_merge_plan(model, get_adapter(model.config, model=model), plan)
    return logits_of(model, inputs)


@pytest.mark.parametrize("family, method", [("qwen3_moe", m) for m in ("msmoe", "hcsmoe", "submoe", "dern")]
                         + [("deepseek_v3", "hcsmoe"), ("deepseek_v3", "dern"), ("gpt_oss", "submoe"),
                            ("gpt_oss", "msmoe")])
def test_prune_merge_writes_a_smaller_stock_checkpoint(root, tmp_path, family, method):
    src, out = root / family, tmp_path / "out"
    assert main(["prune", str(src), "--method", method, "--ratio", "0.5", "--calib", f"web={root / 'web.txt'}",
                 *CALIB, "--out", str(out)]) == 0
    plan = MergePlan.load(out / "moeprune_merge.json")
    report = json.loads((out / "moeprune_report.json").read_text())
    before = AutoModelForCausalLM.from_pretrained(src)
    adapter = get_adapter(before.config, model=before)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # stock transformers
    assert getattr(reloaded.config.get_text_config(), adapter.count_key) == adapter.num_experts // 2
    assert report["num_experts_after"] == 4 and report["verify"]["passed"]
    assert report["weight_bytes_after"] < report["weight_bytes_before"]
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in before.parameters())
    inputs = seeded_inputs(96, batch=2, seq_len=20, seed=3)
    want = merged_in_memory(src, plan, inputs)
    assert torch.allclose(logits_of(reloaded, inputs), want, atol=1e-5)
    # the merge changed the model (it is not the original with experts masked or untouched)
    assert not torch.allclose(logits_of(before, inputs), want, atol=1e-3)
    assert (out / "moeprune_stats.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_plan_then_apply_equals_prune_and_verify_catches_tampering(root, tmp_path):
    src = root / "qwen3_moe"
    stats, plan_file = tmp_path / "s.safetensors", tmp_path / "merge.json"
    assert main(["calibrate", str(src), "--calib", f"web={root / 'web.txt'}", *CALIB, "--out", str(stats)]) == 0
    assert main(["plan", str(stats), "--method", "msmoe", "--ratio", "0.25", "--router", "weighted",
                 "--out", str(plan_file)]) == 0
    plan = MergePlan.load(plan_file)
    assert plan.router == "weighted" and plan.merge == "average" and len(plan.groups[1]) == 6
    assert main(["apply", str(src), "--plan", str(plan_file), "--out", str(tmp_path / "a")]) == 0
    assert main(["verify", str(src), str(tmp_path / "a")]) == 0
    # weighted router rows: row g = usage-weighted mean of the members' original rows
    before = load_file(str(src / "model.safetensors"))
    after = load_file(str(tmp_path / "a" / "model.safetensors"))
    key = next(k for k in after if k.endswith("layers.1.mlp.gate.weight"))
    for g, (members, w) in enumerate(zip(plan.groups[1], plan.weights[1], strict=False)):
        f = torch.tensor(w, dtype=torch.float64)
        want = (f[:, None] * before[key][members].double()).sum(0) / f.sum()
        assert torch.allclose(after[key][g].double(), want, atol=1e-6)
    # tamper with one merged expert: verify must fail
    name = next(k for k in after if "layers.1.mlp.experts" in k)
    after[name] = after[name] + 0.5
    save_file(after, str(tmp_path / "a" / "model.safetensors"), metadata={"format": "pt"})
    assert main(["verify", str(src), str(tmp_path / "a")]) == 1


def test_bad_merge_input_is_refused_before_work(root, tmp_path, capsys):
    src = root / "qwen3_moe"
    web = f"web={root / 'web.txt'}"
    cases = [
        (["prune", str(src), "--method", "msmoe", "--ratio", "0.5", "--out", str(tmp_path / "o")], "--calib"),
        (["prune", str(src), "--method", "hcsmoe", "--ratio", "0.5", "--calib", web, "--budget", "expert",
          "--out", str(tmp_path / "o")], "--budget"),
        (["prune", str(src), "--method", "msmoe", "--ratio", "0.9", "--calib", web, "--out", str(tmp_path / "o")],
         "top-2"),
        (["prune", str(src), "--method", "dern", "--ratio", "0.5", "--calib", web, "--policy", "global",
          "--out", str(tmp_path / "o")], "--policy"),
        (["plan", str(src), "--method", "msmoe", "--ratio", "0.5"], "statistics"),
        (["prune", str(src), "--method", "msmoe", "--ratio", "0.5", "--calib", web, "--out", str(src)], "input"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        assert needle in capsys.readouterr().err, (argv, needle)
    assert not (tmp_path / "o").exists()
