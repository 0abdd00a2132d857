"""compat.py: every transformers internal moeprune needs is present in the installed transformers; a missing one is
an error that names it and the transformers version; nothing else in the package imports those internals."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers

from moeprune import compat
from moeprune.errors import MoePruneError

SRC = Path(__file__).resolve().parents[1] / "src" / "moeprune"
# transformers modules that are implementation, not API: only compat.py may import from them
INTERNAL_MODULES = ("transformers.conversion_mapping", "transformers.core_model_loading", "transformers.initialization",
                    "transformers.integrations", "transformers.modeling_utils", "transformers.models.auto",
                    "transformers.utils.generic")


@pytest.mark.parametrize(("module_name", "attr"), compat.REQUIRED, ids=[f"{m}.{a}" for m, a in compat.REQUIRED])
def test_required_symbol_is_present(module_name, attr):
    assert compat.require(module_name, attr) is not None


@pytest.mark.parametrize("name", sorted(compat.EXPORTS))
def test_exports_resolve_to_the_transformers_object(name):
    module_name, attr = compat.EXPORTS[name]
    assert getattr(compat, name) is getattr(sys.modules[module_name], attr)
    assert name in dir(compat)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_symbol'"):
        compat.not_a_symbol  # noqa: B018


def test_missing_export_names_symbol_and_version(monkeypatch):
    import transformers.modeling_utils

    monkeypatch.delattr(transformers.modeling_utils, "_get_dtype")
    monkeypatch.setattr(transformers, "__version__", "9.9.9")
    with pytest.raises(MoePruneError, match=r"transformers\.modeling_utils\._get_dtype") as e:
        from moeprune.compat import get_dtype  # noqa: F401
    assert "transformers 9.9.9" in str(e.value)


def test_missing_symbol_in_fake_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers.fake_internals", types.ModuleType("transformers.fake_internals"))
    with pytest.raises(MoePruneError) as e:
        compat.require("transformers.fake_internals", "Loader.gone")
    assert "transformers.fake_internals.Loader.gone" in str(e.value)
    assert f"transformers {transformers.__version__}" in str(e.value)


def test_missing_module_names_it():
    with pytest.raises(MoePruneError, match=r"transformers\.no_such_module\.thing") as e:
        compat.require("transformers.no_such_module", "thing")
    assert f"transformers {transformers.__version__}" in str(e.value)


def test_import_does_not_import_transformers():
    code = "import sys, moeprune.compat; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(SRC.parent)})


def _internal_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
            names = [a.name for a in node.names]
            if node.module.startswith(INTERNAL_MODULES) or any(n.startswith("_") for n in names):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} from {node.module} import {', '.join(names)}")
            elif node.module == "transformers" and any(f"transformers.{n}".startswith(INTERNAL_MODULES) for n in names):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} from transformers import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            found += [f"{path.relative_to(SRC)}:{node.lineno} import {a.name}" for a in node.names
                      if a.name.startswith(INTERNAL_MODULES)]
    return found


def test_only_compat_imports_transformers_internals():
    found = [hit for path in sorted(SRC.rglob("*.py")) if path.name != "compat.py" for hit in _internal_imports(path)]
    assert not found, f"import these through moeprune.compat instead: {found}"


def test_revert_weight_conversion_gives_the_names_save_pretrained_writes(tmp_path):
    """The layer-by-layer export writes what `revert_weight_conversion` returns: for a model whose experts are fused
    in memory, it must give exactly the on-disk tensors (names, shapes, values) that save_pretrained writes."""
    from safetensors.torch import load_file

    from moeprune.compat import revert_weight_conversion
    from moeprune.tiny import tiny_model

    model = tiny_model("mixtral", seed=3)
    assert any(n.endswith("experts.gate_up_proj") for n in model.state_dict())  # precondition: fused in memory
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    reverted = revert_weight_conversion(model, dict(model.state_dict()))
    assert sorted(reverted) == sorted(saved)
    assert any(".block_sparse_moe.experts.0.w1.weight" in k for k in reverted)
    for name, t in saved.items():
        assert torch.equal(reverted[name].contiguous(), t), name
