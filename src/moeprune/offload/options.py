"""`OffloadOptions`: what `moeprune analyze --offload` simulates, validated before any model is loaded.

    cache_sizes      m per MoE layer: ints or multiples of top-k ("k", "2k", "4k"); k <= m <= E
    bandwidth        link (PCIe / host) bandwidth in GB/s (10^9 bytes/s)
    tflops           device rate in TFLOP/s
    prefetch         experts the predictive policy prefetches per token and layer (None: k)
    heldout          NAME=PATH test text; without it the calibration sequences are split: even-numbered ones
                     train the predictor, odd-numbered ones are the simulated stream
    static_quality   {pruning ratio: held-out perplexity ratio} of static pruning, for the verdict
    quality_target   the perplexity ratio a deployment accepts (verdict)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from moeprune.errors import MoePruneError

DEFAULT_SIZES = ("k", "2k", "4k")


@dataclass(frozen=True)
class OffloadOptions:
    cache_sizes: tuple[str | int, ...] = DEFAULT_SIZES
    bandwidth: float = 25.0
    tflops: float = 100.0
    prefetch: int | None = None
    heldout: tuple[str, ...] = ()
    static_quality: Mapping[float, float] = field(default_factory=dict)
    quality_target: float = 1.05

    def __post_init__(self) -> None:
        if not self.cache_sizes:
            raise MoePruneError("--cache-sizes is empty; give sizes like k,2k,4k or 2,4,8.")
        for m in self.cache_sizes:
            _parse_size(m, 1)  # the form; the range needs k and E (`sizes`)
        for name, flag in (("bandwidth", "--bandwidth GB/s"), ("tflops", "--flops TFLOP/s")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < float("inf"):
                raise MoePruneError(f"{flag} {v!r}: give a positive finite number (e.g. --bandwidth 25 --flops 100).")
        if self.prefetch is not None and (isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int)
                                          or self.prefetch < 1):
            raise MoePruneError(f"--prefetch {self.prefetch!r}: give the number of experts to prefetch (>= 1).")
        for r, q in self.static_quality.items():
            if not 0 < float(r) < 1 or not float(q) > 0:
                raise MoePruneError(f"--static-quality {r}={q}: write RATIO=PERPLEXITY_RATIO with 0 < RATIO < 1 and a "
                                    "positive perplexity ratio, e.g. 0.25=1.05,0.5=1.9.")
        if not float(self.quality_target) >= 1.0:
            raise MoePruneError(f"--quality-target {self.quality_target}: a perplexity ratio >= 1 (1.05 = 5 % worse "
                                "than the original).")

    def sizes(self, top_k: int, num_experts: int) -> list[int]:
        """The cache sizes as ints, sorted, each checked against k <= m <= E."""
        out = sorted({_parse_size(m, top_k) for m in self.cache_sizes})
        bad = [m for m in out if not top_k <= m <= num_experts]
        if bad:
            raise MoePruneError(f"--cache-sizes {','.join(str(m) for m in self.cache_sizes)}: m = {bad} outside "
                                f"k = {top_k} <= m <= E = {num_experts} (a cache holds one token's k experts at least "
                                "and all experts at most).")
        return out

    def check(self, top_k: int, num_experts: int) -> None:
        """Every check that needs the model's k and E (cache sizes, prefetch count), before any work."""
        self.prefetch_count(top_k, self.sizes(top_k, num_experts)[0])

    def prefetch_count(self, top_k: int, smallest_cache: int) -> int:
        p = self.prefetch or top_k
        if p > smallest_cache:
            raise MoePruneError(f"--prefetch {p} does not fit the smallest cache (m = {smallest_cache}); prefetch "
                                "at most m experts.")
        return p


def _parse_size(m: str | int, top_k: int) -> int:
    if isinstance(m, int) and not isinstance(m, bool):
        return m
    match = re.fullmatch(r"\s*(\d*)\s*(k?)\s*", str(m))
    if match is None or not (match.group(1) or match.group(2)) or (match.group(1) and int(match.group(1)) < 1):
        raise MoePruneError(f"--cache-sizes: {m!r} is not a cache size; write an integer (4) or a multiple of top-k "
                            "(k, 2k, 4k).")
    n = int(match.group(1) or 1)
    return n * top_k if match.group(2) else n


def parse_quality(text: str | None) -> dict[float, float]:
    """'0.25=1.05,0.5=1.9' -> {0.25: 1.05, 0.5: 1.9}."""
    out: dict[float, float] = {}
    for part in (text or "").replace(" ", ",").split(","):
        if not part:
            continue
        r, sep, q = part.partition("=")
        try:
            out[float(r)] = float(q)
        except ValueError:
            raise MoePruneError(f"--static-quality {part!r}: write RATIO=PERPLEXITY_RATIO pairs, e.g. "
                                "--static-quality 0.25=1.05,0.5=1.9.") from None
        if not sep:
            raise MoePruneError(f"--static-quality {part!r}: write RATIO=PERPLEXITY_RATIO.")
    return out


def check_splittable(names: Sequence[str], sequences: Sequence[int]) -> None:
    """Without held-out text the calibration sequences are split in two; each half needs a sequence."""
    if sum(sequences) < 2:
        raise MoePruneError(f"--offload without --heldout splits the calibration sequences into training and test "
                            f"halves, but {', '.join(names)} give {sum(sequences)} sequence(s); add calibration "
                            "text or pass --heldout NAME=PATH.")
