"""UNCURL's per-task reduction sweep (`moeprune sweep`): block error and held-out quality per task and ratio from
one calibration pass, the knee per task and the ratios to put in a task pack."""
