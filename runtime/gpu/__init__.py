"""NVIDIA execution: provider options (CUDA, TensorRT) and the IO-bound device runner."""
