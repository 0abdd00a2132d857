"""Quantization of the routed experts: storage sizes, importance tables and mixed-precision bit allocation."""
