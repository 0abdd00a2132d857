"""GGUF for llama.cpp: convert a stock-loadable export with llama.cpp's own converter, check the file, and run it.

`export_gguf` (export.py), `check_gguf` (check.py), `find_converter` (converter.py), `LlamaCpp` / `verify_gguf`
(llama.py); `GGUF_FAMILIES` (families.py) lists the families moeprune has measured in llama.cpp.
"""

from moeprune.gguf.export import GgufOptions, export_gguf
from moeprune.gguf.families import GGUF_FAMILIES

__all__ = ["GGUF_FAMILIES", "GgufOptions", "export_gguf"]
