"""Calibration: the data path only (local text -> token batches; the layer-by-layer engine comes next)."""

from moeprune.calibration.data import CalibConfig, CalibSet, CalibSource, build_sets

__all__ = ["CalibConfig", "CalibSet", "CalibSource", "build_sets"]
