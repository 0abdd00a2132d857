"""Disk I/O: checkpoints, safetensors bytes, loading, atomic saving, verification."""
