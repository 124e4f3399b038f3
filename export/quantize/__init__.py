"""Quantized variants of an export, batch-invariant int8, calibration data, and the quality
report that measures what quantization cost."""
