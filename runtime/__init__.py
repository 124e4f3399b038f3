"""edgecap: caption images with ONNX Runtime; no PyTorch at serve time."""

from .captioner import Captioner
from .errors import EdgecapError, ImageError, ModelError, OptionsError
from .manifest import GenerationOptions
from .results import CaptionFailure, CaptionResult

__all__ = [
    "Captioner", "CaptionResult", "CaptionFailure", "GenerationOptions",
    "EdgecapError", "ImageError", "ModelError", "OptionsError",
]
__version__ = "0.1.0"
