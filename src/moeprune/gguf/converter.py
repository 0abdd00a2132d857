"""llama.cpp's own Hugging Face -> GGUF converter, found or fetched offline-safely from the package registry.

moeprune never writes GGUF by hand: it runs `convert_hf_to_gguf.py` (with its `conversion/` package and the
`gguf-py` library it ships) from the llama.cpp source that `llama-cpp-python` vendors. Where it comes from, first
match wins:

1. `$MOEPRUNE_LLAMA_CPP`: a llama.cpp source folder (a git checkout) holding `convert_hf_to_gguf.py`;
2. the user cache, `<cache>/llama.cpp-converter-<version>/`, where <version> is the installed llama-cpp-python's
   (so converter and runtime come from one llama.cpp commit), else `LLAMA_CPP_PYTHON`;
3. fetched once into that cache: `pip download --no-binary :all: llama-cpp-python==<version>` (PyPI only ships
   it as source) and only the converter's files are extracted from `vendor/llama.cpp/`.

`Converter.architectures()` reads which `…ForCausalLM` classes the converter registers from its source (`ast`,
nothing imported), so an unsupported family is refused before any work.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.testbed.build import cache_root

ENV = "MOEPRUNE_LLAMA_CPP"
LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose llama.cpp is used when llama-cpp-python is not installed
SCRIPT = "convert_hf_to_gguf.py"
# what the converter needs from a llama.cpp source tree (the rest, ~70 MB of C++, is not extracted)
NEEDED = (SCRIPT, "conversion", "gguf-py", "LICENSE")


@dataclass(frozen=True)
class Converter:
    root: Path  # folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/
    version: str  # llama-cpp-python version it came from, or "local" for $MOEPRUNE_LLAMA_CPP

    @cached_property
    def _registered(self) -> frozenset[str]:
        names: set[str] = set()
        for f in sorted((self.root / "conversion").glob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "register":
                    names.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
        return frozenset(names)

    def architectures(self) -> frozenset[str]:
        """HF architecture class names (config.json `architectures`) the converter has a model class for."""
        return self._registered

    def describe(self) -> str:
        return f"llama.cpp converter from llama-cpp-python {self.version} ({self.root})"


def installed_llama_cpp_python() -> str | None:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def _complete(root: Path) -> bool:
    return (root / SCRIPT).is_file() and (root / "conversion").is_dir() and (root / "gguf-py").is_dir()


def find_converter(fetch: bool = True) -> Converter:
    """The converter to use (see the module docstring); fetches it into the cache when allowed and missing."""
    local = os.environ.get(ENV)
    if local:
        root = Path(local).expanduser()
        if not (root / SCRIPT).is_file():
            raise MoePruneError(f"${ENV}={root} holds no {SCRIPT}; point it at a llama.cpp source folder (its "
                                "top level, where convert_hf_to_gguf.py is), or unset it to use the cached one.")
        return Converter(root.resolve(), "local")
    version = installed_llama_cpp_python() or LLAMA_CPP_PYTHON
    root = cache_root() / f"llama.cpp-converter-{version}"
    if not _complete(root):
        if not fetch:
            raise MoePruneError(f"llama.cpp's converter is not cached at {root}; run `python -m "
                                "moeprune.gguf` (fetches it from the package registry) or set "
                                f"${ENV} to a llama.cpp source folder.")
        fetch_converter(version, root)
    return Converter(root, version)


def fetch_converter(version: str, dest: Path) -> Path:
    """Download llama-cpp-python's source distribution and extract the converter's files into `dest` (atomic)."""
    logger.info("fetching llama.cpp's GGUF converter (llama-cpp-python %s source, ~75 MB, once) into %s",
                version, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise MoePruneError(f"could not download llama-cpp-python {version}'s source to get llama.cpp's GGUF "
                                f"converter ({(done.stderr or done.stdout).strip()[-400:]}). Set ${ENV} to a llama.cpp "
                                "source folder instead.")
        staged = Path(tmp) / "converter"
        _extract(archives[0], staged)
        if not _complete(staged):
            raise MoePruneError(f"{archives[0].name} has no vendor/llama.cpp/{SCRIPT} with conversion/ and gguf-py/; "
                                f"set ${ENV} to a llama.cpp source folder instead.")
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    return dest


def _extract(archive: Path, out: Path) -> None:
    """Only `<sdist>/vendor/llama.cpp/{NEEDED}` -> `out/` (tarfile's `data` filter: no links out, no devices)."""
    with tarfile.open(archive) as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if len(parts) > 3 and parts[1:3] == ("vendor", "llama.cpp") and parts[3] in NEEDED:
                m.name = str(Path(*parts[3:]))
                members.append(m)
        tar.extractall(out, members=members, filter="data")
