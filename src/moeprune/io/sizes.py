"""Byte sizes written by people: '5GB' -> 5·10⁹ (transformers' convention for shard sizes), '500MiB' -> 500·2²⁰."""

from __future__ import annotations

from moeprune.errors import MoePruneError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int, what: str = "--max-shard-size") -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500·2^20; ints are bytes. `what` names the option in errors."""
    if isinstance(size, int):
        value = size
    else:
        s = str(size).strip().upper()
        num = s.rstrip("KMGIB")
        unit = s[len(num):]
        if unit not in _UNITS or not num:
            raise MoePruneError(f"{what}: cannot read size {size!r}; write it like 5GB, 500MB or 2GiB.")
        try:
            value = int(float(num) * _UNITS[unit])
        except ValueError:
            raise MoePruneError(f"{what}: cannot read size {size!r}; write it like 5GB, 500MB or 2GiB.") from None
    if value <= 0:
        raise MoePruneError(f"{what} must be positive, got {size!r}.")
    return value
