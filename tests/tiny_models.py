"""Tiny random-weight VisionEncoderDecoder models, built in-process (no download)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Research data beside the checkout (CI has it, a fresh clone does not): only the tests that need
# Flickr8k's scale read it, and they skip without it (see conftest.needs_flickr).
SHARED = REPO.parent / "shared"
FLICKR = SHARED / "data" / "flickr8k"
# The shipped default model's tokenizer holds GPT-2's full BPE (50257 tokens), so the tiny models
# need no BPE files from outside the repository.
GPT2_TOKENIZER_JSON = REPO / "runtime" / "models" / "default" / "tokenizer.json"
START_TOKEN = 32  # "A"


@dataclass(frozen=True)
class TinyConfig:
    name: str
    encoder: str = "vit"  # vit or deit
    image_size: int = 32
    patch_size: int = 8
    encoder_width: int = 32
    encoder_layers: int = 2
    encoder_heads: int = 2
    decoder_width: int = 32
    decoder_layers: int = 2
    decoder_heads: int = 2
    resample: int = 2  # PIL bilinear
    seed: int = 0
    eos_scale: float = 7.0
    tied: bool = True


CONFIGS = [
    TinyConfig("vit-2x2"),
    TinyConfig("vit-deep", image_size=48, patch_size=16, encoder_width=48, encoder_layers=3,
               encoder_heads=3, decoder_width=48, decoder_layers=3, decoder_heads=4, resample=3, seed=1),
    TinyConfig("deit-proj", encoder="deit", image_size=40, patch_size=10, encoder_width=24,
               encoder_layers=1, encoder_heads=2, decoder_width=64, decoder_layers=1, decoder_heads=4,
               seed=2, tied=False, eos_scale=2.0),
]


def gpt2_tokenizer():
    """GPT-2's tokenizer (EOS = BOS = UNK = <|endoftext|>) from the repository's own files."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(tokenizer_file=str(GPT2_TOKENIZER_JSON))


def build_model(cfg: TinyConfig, out_dir: Path) -> Path:
    """Build, save_pretrained() and return a model directory with processor and tokenizer."""
    import torch
    from transformers import (
        DeiTConfig, GPT2Config, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
    )

    torch.manual_seed(cfg.seed)
    enc_cls = DeiTConfig if cfg.encoder == "deit" else ViTConfig
    encoder = enc_cls(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.encoder_width,
        num_hidden_layers=cfg.encoder_layers, num_attention_heads=cfg.encoder_heads,
        intermediate_size=cfg.encoder_width * 2,
    )
    tokenizer = gpt2_tokenizer()
    eos = tokenizer.eos_token_id
    decoder = GPT2Config(
        n_embd=cfg.decoder_width, n_layer=cfg.decoder_layers, n_head=cfg.decoder_heads,
        n_positions=64, vocab_size=len(tokenizer), add_cross_attention=True, is_decoder=True,
        bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=cfg.tied,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    # With tied embeddings, starting from EOS would make EOS predict itself at step one.
    start = eos if not cfg.tied else START_TOKEN
    config.decoder_start_token_id = start
    config.pad_token_id = eos
    config.eos_token_id = eos
    model = VisionEncoderDecoderModel(config=config)
    # Random init gives near-uniform logits; sharper ones make decoding decisions well separated
    # (token-for-token comparisons should not hinge on 1e-6 ties).
    # Sharpen the random logits (final layer-norm gain x25, which leaves the input embeddings
    # alone) and make EOS likelier than a random token, so captions end after a varied number
    # of steps and every stopping rule gets exercised.
    with torch.no_grad():
        model.decoder.transformer.ln_f.weight.mul_(25.0)
        model.decoder.lm_head.weight[eos].mul_(cfg.eos_scale)
    model.generation_config.decoder_start_token_id = start
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.generation_config.max_length = 12
    model.save_pretrained(out_dir)
    processor = ViTImageProcessor(
        size={"height": cfg.image_size, "width": cfg.image_size}, resample=cfg.resample,
        image_mean=[0.48, 0.45, 0.40], image_std=[0.27, 0.26, 0.28],
    )
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
