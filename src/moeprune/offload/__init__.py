"""Expert offloading simulation (ExpertFlow): an m-expert cache per MoE layer on the fast device, LRU / LFU /
Belady / predictive prefetch, time per token for a link bandwidth and device rate, and a verdict against static
pruning. `simulate_offload` runs it on routing traces; `moeprune analyze --offload` adds it to the report."""

from moeprune.offload.cache import EVICTIONS, CacheRun, simulate
from moeprune.offload.options import OffloadOptions
from moeprune.offload.predictor import TransitionPredictor, accuracy, oracle
from moeprune.offload.run import POLICIES, simulate_offload
from moeprune.offload.timing import TimingModel

__all__ = ["EVICTIONS", "POLICIES", "CacheRun", "OffloadOptions", "TimingModel", "TransitionPredictor", "accuracy",
           "oracle", "simulate", "simulate_offload"]
