"""`python -m moeprune.gguf`: fetch llama.cpp's GGUF converter into the cache now (scripts/install.sh runs it)."""

from moeprune.gguf.converter import find_converter

print(find_converter().describe())
