"""Export, training and evaluation toolchain (needs the [export] extra: torch, transformers, onnx)."""

from __future__ import annotations

from typing import Any

__all__ = ["export_prefix_captioner"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m edgecap.export.<tool>` does not pay for the exporter's imports.
    if name == "export_prefix_captioner":
        from .graphs.prefix_export import export_prefix_captioner

        return export_prefix_captioner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
