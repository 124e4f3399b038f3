"""Export, training and evaluation toolchain (needs the [export] extra: torch, transformers, onnx)."""
