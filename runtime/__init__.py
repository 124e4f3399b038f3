"""edgecap: caption images with ONNX Runtime; no PyTorch at serve time."""

from .captioner import Captioner, CaptionResult
from .errors import EdgecapError, ImageError, ModelError, OptionsError
from .manifest import GenerationOptions

__all__ = [
    "Captioner", "CaptionResult", "GenerationOptions",
    "EdgecapError", "ImageError", "ModelError", "OptionsError",
]
__version__ = "0.1.0"
