"""The systems ``python -m benchmarks.gpu`` times, each captioning one image greedily.

edgecap on a device and precision, PyTorch ``generate()`` in fp16 on CUDA, optimum's
``ORTModelForVision2Seq`` on CUDA. A loader returns a ``System`` or raises ``Unavailable`` with
the reason: a GPU system that would quietly run on the CPU is never measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
NEEDED = {"cuda": CUDA, "tensorrt": TENSORRT}


class Unavailable(Exception):
    """This system cannot run here; the message says why."""


@dataclass
class System:
    name: str
    caption: Callable  # PIL image -> tokenizer ids of its greedy caption, end token excluded
    load_s: float = 0.0  # includes building TensorRT engines when none were cached
    notes: dict = field(default_factory=dict)


def greedy(max_new_tokens: int) -> dict:
    """The same plain greedy search for every system (transformers' names)."""
    return dict(num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                no_repeat_ngram_size=0, repetition_penalty=1.0)


def edgecap_system(name: str, model: Path, device: str, precision: str, *,
                   io_binding: str = "auto", engine_cache: Path | None = None,
                   max_new_tokens: int = 20) -> System:
    import onnxruntime as ort

    from edgecap import Captioner

    needed = NEEDED.get(device)
    if needed and needed not in ort.get_available_providers():
        extra = " and TensorRT's libraries" if device == "tensorrt" else ""
        raise Unavailable(f"onnxruntime {ort.__version__} offers no {needed} "
                          f"(install onnxruntime-gpu{extra})")
    began = time.perf_counter()
    captioner = Captioner(model, device=device, precision=precision, engine_cache=engine_cache,
                          io_binding=io_binding)
    providers = captioner.runner.decoder.get_providers()
    if needed and providers[0] != needed:
        raise Unavailable(f"{needed} did not start; onnxruntime fell back to {providers[0]}")
    options = captioner.options(**greedy(max_new_tokens))

    def caption(image) -> list[int]:
        return captioner.caption_loaded([image], options, ["image"])[0].token_ids

    caption(_grey())  # the first run builds TensorRT engines and CUDA kernels: part of loading
    return System(name, caption, time.perf_counter() - began,
                  {"providers": providers, "runner": type(captioner.runner).__name__})


def pytorch_system(hf_dir: Path, device: str = "cuda", max_new_tokens: int = 20) -> System:
    """transformers' generate(): weights in fp16 on CUDA, or fp32 on the CPU (the smoke run's
    check that its tokens are read the way edgecap's are)."""
    torch = _torch_on(device)
    from transformers import ViTImageProcessor, VisionEncoderDecoderModel

    dtype = torch.float16 if device == "cuda" else torch.float32
    began = time.perf_counter()
    model = VisionEncoderDecoderModel.from_pretrained(hf_dir, torch_dtype=dtype)
    model = model.to(device).eval()
    processor = ViTImageProcessor.from_pretrained(hf_dir)
    eos = model.generation_config.eos_token_id

    def caption(image) -> list[int]:
        pixels = processor(image, return_tensors="pt").pixel_values.to(device, dtype)
        with torch.no_grad():
            out = model.generate(pixels, do_sample=False, **greedy(max_new_tokens))
        return until_end(out[0].tolist()[1:], eos)

    caption(_grey())
    name = f"pytorch-{device}-{'fp16' if device == 'cuda' else 'fp32'}"
    return System(name, caption, time.perf_counter() - began, {"torch": torch.__version__})


def optimum_system(hf_dir: Path, optimum_dir: Path | None, work_dir: Path, device: str = "cuda",
                   max_new_tokens: int = 20) -> System:
    """optimum's own export of the same weights (fp32, its default) on the CUDA provider, or on
    the CPU for the smoke run."""
    import onnxruntime as ort

    try:
        from optimum.onnxruntime import ORTModelForVision2Seq
    except ImportError:
        raise Unavailable("optimum is not installed (the [bench] extra)") from None
    provider = CUDA if device == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        raise Unavailable(f"onnxruntime {ort.__version__} offers no {provider}")
    torch = _torch_on(device)
    from transformers import ViTImageProcessor

    began = time.perf_counter()
    if optimum_dir is None:
        optimum_dir = work_dir / "optimum-fp32"
        if not (optimum_dir / "encoder_model.onnx").is_file():
            ORTModelForVision2Seq.from_pretrained(hf_dir, export=True).save_pretrained(optimum_dir)
    model = ORTModelForVision2Seq.from_pretrained(optimum_dir, provider=provider)
    processor = ViTImageProcessor.from_pretrained(hf_dir)
    eos = model.generation_config.eos_token_id

    def caption(image) -> list[int]:
        pixels = processor(image, return_tensors="pt").pixel_values.to(model.device)
        with torch.no_grad():
            out = model.generate(pixels, do_sample=False, **greedy(max_new_tokens))
        return until_end(out[0].tolist()[1:], eos)

    caption(_grey())
    return System(f"optimum-{device}-fp32", caption, time.perf_counter() - began,
                  {"providers": [provider]})


def until_end(tokens: list[int], eos: int | list[int]) -> list[int]:
    """The tokens before the first end token (generate() pads finished rows with it)."""
    ends = set(eos if isinstance(eos, list) else [eos])
    for i, token in enumerate(tokens):
        if token in ends:
            return tokens[:i]
    return tokens


def _torch_on(device: str):
    try:
        import torch
    except ImportError:
        raise Unavailable("torch is not installed") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("torch sees no CUDA device")
    return torch


def _grey():
    from PIL import Image

    return Image.new("RGB", (224, 224), (127, 127, 127))
