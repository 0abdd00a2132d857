"""Remote-code checkpoints: refused without `--trust-remote-code`, pruned correctly with it.

The test writes its own remote-code model into a local folder (nothing is downloaded): `configuration_legacy.py`
and `modeling_legacy.py`, mapped in config.json by `auto_map`. Its MoE blocks are the old layout (router `gate`
nn.Linear, `experts` an nn.ModuleList of MLPs, softmax top-k routing in a Python loop), which only moeprune's
structural fallback adapter knows. The reference is the stock-loaded original with the removed experts masked in
its own router; the export is reloaded by transformers' `AutoModelForCausalLM(..., trust_remote_code=True)`.
"""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moeprune import api
from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.remote import trust_remote_code
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.pipeline.verify import logits_of, seeded_inputs
from moeprune.tiny import tiny_config
from test_modulelist_generic import LegacyMoeBlock

CONFIGURATION = '''
from transformers import Qwen3MoeConfig


class LegacyConfig(Qwen3MoeConfig):
    model_type = "legacy_moe"
'''

MODELING_TEMPLATE = '''
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP

from .configuration_legacy import LegacyConfig


{block}

class LegacyForCausalLM(Qwen3MoeForCausalLM):
    config_class = LegacyConfig

    def __init__(self, config):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            if i not in (config.mlp_only_layers or []):
                layer.mlp = LegacyMoeBlock(config)
        self.post_init()
'''
# the legacy block of test_modulelist_generic, written into the remote module (one definition of that block)
MODELING = MODELING_TEMPLATE.replace("{block}", inspect.getsource(LegacyMoeBlock))



@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A saved remote-code checkpoint (auto_map -> the folder's .py files), random weights with sharp routers."""
    root = tmp_path_factory.mktemp("remote")
    folder = root / "legacy"
    folder.mkdir()
    (folder / "configuration_legacy.py").write_text(textwrap.dedent(CONFIGURATION))
    (folder / "modeling_legacy.py").write_text(textwrap.dedent(MODELING))
    import importlib.util
    import sys

    sys.path.insert(0, str(root))
    (root / "legacy" / "__init__.py").write_text("")
    try:
        spec = importlib.util.spec_from_file_location("legacy.modeling_legacy", folder / "modeling_legacy.py",
                                                      submodule_search_locations=None)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["legacy.modeling_legacy"] = mod
        spec.loader.exec_module(mod)
        cfg_mod = sys.modules["legacy.configuration_legacy"]
        config = cfg_mod.LegacyConfig(**tiny_config("qwen3_moe").to_dict() | {"model_type": "legacy_moe"})
        torch.manual_seed(0)
        model = mod.LegacyForCausalLM(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p.normal_(0, 4 / p.shape[1] ** 0.5)
                elif ".experts." in name:
                    p.normal_(0, 0.1)
        model.config.auto_map = {"AutoConfig": "configuration_legacy.LegacyConfig",
                                 "AutoModelForCausalLM": "modeling_legacy.LegacyForCausalLM"}
        model.save_pretrained(folder)
    finally:
        sys.path.remove(str(root))
        (root / "legacy" / "__init__.py").unlink()
        for name in [n for n in sys.modules if n.startswith("legacy")]:
            del sys.modules[name]
    assert json.loads((folder / "config.json").read_text())["auto_map"]
    return folder


def _reload(folder):
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True,
                                                dtype=torch.float32).eval()


def test_refused_without_the_opt_in(remote, capsys):
    with pytest.raises(MoePruneError, match="--trust-remote-code") as err:
        Checkpoint.open(remote)
    assert "runs that code" in str(err.value)
    assert main(["info", str(remote)]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err


def test_cli_info_with_the_opt_in_after_the_command(remote, capsys):
    assert main(["info", str(remote), "--trust-remote-code"]) == 0
    out = capsys.readouterr().out
    assert "generic" in out and "8" in out


def test_lazy_refused_for_remote_code(remote, tmp_path):
    with trust_remote_code(), pytest.raises(MoePruneError, match="remote-code"):
        api.prune(remote, tmp_path / "out", method="aimer", ratio=0.25, lazy=True)


def test_pruned_export_equals_masked_original(remote, tmp_path):
    with trust_remote_code():
        plan = api.make_plan(remote, "aimer", 0.25)
        mem = api.apply_plan(remote, plan, tmp_path / "mem").out
        stream = api.apply_plan(remote, plan, tmp_path / "stream", streaming=True).out
        original = _reload(remote)
        adapter = get_adapter(original.config, model=original)
        assert adapter.family == "generic" and adapter.moe_layers() == [1, 2]
        inputs = seeded_inputs(vocab_size=96, batch=2, seq_len=24, seed=3)
        unmasked = logits_of(original, inputs)
        with masked_experts(original, adapter, {layer: plan.dropped(layer) for layer in plan.layers}):
            want = logits_of(original, inputs)
        got = logits_of(_reload(mem), inputs)
        assert json.loads((mem / "config.json").read_text())["auto_map"]  # still loads as remote code
        assert (mem / "modeling_legacy.py").is_file()  # the code travels with the export
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-4 * scale
    assert (unmasked - want).abs().max() > 1e-2 * scale  # the removal mattered
    a = {k: v for f in mem.glob("*.safetensors") if not f.name.startswith("moeprune_")
         for k, v in load_file(f).items()}
    b = {k: v for f in stream.glob("*.safetensors") if not f.name.startswith("moeprune_")
         for k, v in load_file(f).items()}
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_verify_passes_with_the_opt_in(remote, tmp_path):
    with trust_remote_code():
        _, result = api.prune(remote, tmp_path / "out", method="aimer", ratio=0.25)
    assert result is not None and result.passed
