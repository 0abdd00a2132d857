"""The testbed: a small *trained* multi-domain Qwen3-MoE built offline on CPU, the default model of `moeprune demo`
and the yardstick of every method (held-out text per domain for evaluation, calibration text per domain)."""

from moeprune.testbed.build import Testbed, build_testbed, cache_root, default_dir, describe, find_testbed
from moeprune.testbed.train import TestbedConfig

__all__ = ["Testbed", "TestbedConfig", "build_testbed", "cache_root", "default_dir", "describe", "find_testbed"]
