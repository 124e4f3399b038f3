"""The ONNX graphs edgecap exports (encoder, decoder step, prefix family) and their checks
against PyTorch."""
