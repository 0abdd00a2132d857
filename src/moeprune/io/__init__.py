"""Disk I/O: checkpoints, safetensors bytes, loading (stock, lazy, non-uniform widths), atomic output folders, JSON
files. Verification lives in `pipeline/verify.py`."""
