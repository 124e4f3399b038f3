"""Benchmark models built in-process: the classic vit-gpt2 captioner layout with random weights.

ViT-base/16 at 224 (12 layers, 768 wide) + GPT-2 small (12 layers, 768 wide, 50,257 tokens) with
cross-attention: the shape of the well-known vit-gpt2-image-captioning checkpoint, so latency,
memory and size match it even though the captions are noise.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger("edgecap.bench")

PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "data"
# GPT-2's full byte-level BPE, as the shipped default model's tokenizer holds it.
GPT2_TOKENIZER = Path(__file__).resolve().parents[1] / "runtime" / "models" / "default" / "tokenizer.json"


def build_vit_gpt2(out_dir: Path, seed: int = 0, tiny: bool = False) -> Path:
    """save_pretrained() a random-weight ViT-base + GPT-2 small VisionEncoderDecoderModel.

    ``tiny``: the same layout at 2 + 2 layers, 32 wide (49 patches of 32 pixels, GPT-2's full
    vocabulary), for the smoke run in the tests: every code path, no meaningful timings.
    """
    import torch
    from transformers import (
        GPT2Config, GPT2TokenizerFast, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
    )

    if (out_dir / "config.json").is_file():
        return out_dir
    torch.manual_seed(seed)
    tokenizer = GPT2TokenizerFast(tokenizer_file=str(GPT2_TOKENIZER), eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    eos = tokenizer.eos_token_id
    small = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                 patch_size=32) if tiny else {}
    small_lm = dict(n_layer=2, n_embd=32, n_head=2, n_positions=64) if tiny else {}
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(image_size=224, **({"patch_size": 16} | small)),
        GPT2Config(add_cross_attention=True, is_decoder=True, bos_token_id=eos, eos_token_id=eos,
                   **small_lm),
    )
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = eos
    model = VisionEncoderDecoderModel(config=config)
    generation = model.generation_config
    generation.decoder_start_token_id = generation.eos_token_id = generation.pad_token_id = eos
    generation.num_beams, generation.max_length = 4, 16  # the public checkpoint's defaults
    model.save_pretrained(out_dir)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


MODES = ("none", "int8-dynamic", "int8-block", "int4")
CALIBRATED_MODES = ("int8-dynamic", "int8-block")  # the formats that take --calibration


def ensure_exports(root: Path, modes: tuple[str, ...] = MODES, tiny: bool = False) -> dict[str, Path]:
    """Build the HF model and its edgecap exports under ``root``.

    Exports are reused while they match what this version of edgecap writes (the decoder graph
    kind); a stale fp32 export is redone and every quantized one with it.
    """
    import shutil

    from edgecap.export.graphs.onnx_export import export_pretrained
    from edgecap.export.quantize.variants import quantize_export
    from edgecap.manifest import Manifest

    hf_dir = build_vit_gpt2(root / "hf", tiny=tiny)
    paths = {"hf": hf_dir}
    fp32 = root / "edgecap-fp32"
    if not _current(fp32):
        for stale in [fp32] + [root / f"edgecap-{mode}" for mode in modes if mode != "none"]:
            shutil.rmtree(stale, ignore_errors=True)
        started = time.perf_counter()
        export_pretrained(hf_dir, fp32)
        log.info("fp32 export: %.0f s", time.perf_counter() - started)
    paths["none"] = fp32
    for mode in modes:
        if mode == "none":
            continue
        target = root / f"edgecap-{mode}"
        if not (target / "manifest.json").is_file() or Manifest.read(target).quantization["mode"] != mode:
            # int8-dynamic and int8-block calibrate their activation scales (the batch-invariant
            # formats' fast path) on the photos that ship in tests/data.
            calibration = PHOTOS if mode in CALIBRATED_MODES else None
            quantize_export(fp32, target, mode=mode, calibration=calibration)
        paths[mode] = target
    return paths


def _current(export: Path) -> bool:
    """An export this version of edgecap would write the same way (fused graph, same revision)."""
    from edgecap.export.graphs.fused_step import FUSED_GRAPH_REVISION
    from edgecap.manifest import Manifest

    if not (export / "manifest.json").is_file():
        return False
    provenance = Manifest.read(export).provenance
    return provenance.get("decoder_graph") == "fused" and \
        provenance.get("fused_revision") == FUSED_GRAPH_REVISION


def file_sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}


if __name__ == "__main__":
    import json
    import resource
    import sys

    logging.basicConfig(level=logging.INFO)
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path.home() / ".cache/edgecap/bench")
    started = time.perf_counter()
    paths = ensure_exports(root)
    report = {name: file_sizes(path) for name, path in paths.items()}
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(report, indent=2))
