"""Benchmarks: run `python -m benchmarks` (see README)."""
