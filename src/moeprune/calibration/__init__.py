"""Calibration: local text -> seeded token batches (`data.py`), the layer-by-layer engine (`engine.py`), one run of
every set with routed-statistics collectors (`session.py`), `moeprune calibrate` (`run.py`) and its data-parallel
reduce (`distributed.py`). It knows no scoring method."""

from moeprune.calibration.data import CalibConfig, CalibSet, CalibSource, build_sets

__all__ = ["CalibConfig", "CalibSet", "CalibSource", "build_sets"]
