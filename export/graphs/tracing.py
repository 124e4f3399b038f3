"""What every graph export shares: the opset, the error it raises, sample inputs and the
TorchScript export call."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from edgecap.manifest import Preprocessing
from torch import nn

OPSET = 17
# fp32 graphs vs torch: kernels differ in summation order only, so anything above this is a bug.
PARITY_TOLERANCE = 1e-3


class ExportError(RuntimeError):
    """The export could not be produced, or its graphs disagree with PyTorch."""


def sample_pixels(pre: Preprocessing, batch: int) -> torch.Tensor:
    """Fixed random pixels: the same trace and parity inputs on every export."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, pre.height, pre.width, generator=generator)


def export_traced(module: nn.Module, args: tuple, path: Path, inputs, outputs,
                  dynamic_axes) -> None:
    """Trace ``module`` on ``args`` into an ONNX file at ``path``."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer chatter
        torch.onnx.export(
            module, args, str(path), input_names=inputs, output_names=outputs,
            dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )
