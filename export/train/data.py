"""What a training run feeds on: caption token sequences with a style token, the pruned
vocabulary, and the frozen backbone's features cached per image outside the repo.

Pruned ids 0..2 are fixed: 0 is GPT-2's end-of-text (end and pad token), 1 starts a
``describe`` caption, 2 an ``alt-text`` caption (``STYLE_IDS``). A training sequence is
``[style] + caption + [EOS]``; the exported decoder starts from id 1, so default decoding writes
a plain description. The tokenizer knows both style tokens as special tokens (GPT-2 ids 50257
and 50258), so decoding with ``skip_special_tokens`` never prints them.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

from ..captioner_model import BACKBONE_CHANNELS, GPT2_EOS_ID, FeatureEncoder
from ..datasets import ALT_TEXT, DESCRIBE, STYLE_TOKENS, CaptionSource, normalize_caption

IMAGE_SIZE = (224, 224)
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0  # in 0..255 units, as every EfficientNet-Lite was trained
PREPROCESS = {
    "size": list(IMAGE_SIZE),
    "resample": "bilinear",
    "rescale_factor": 1.0,
    "mean": [PIXEL_MEAN] * 3,
    "std": [PIXEL_STD] * 3,
}
EOS_ID = 0  # pruned id of GPT-2's end-of-text: ends every caption, pads batches
STYLE_IDS = {DESCRIBE: 1, ALT_TEXT: 2}  # pruned id that starts a caption of each style
# The backbone's last 1x1 conv and its norm: what ``tune_encoder_head`` trains on top of the
# cached output of the last MBConv block.
HEAD_MODULES = ("_conv_head", "_bn1")


@dataclass
class SplitData:
    """One split, over one or several sources: features, training rows and references."""

    feats: torch.Tensor  # (images, tokens, channels) fp16 backbone features
    rows: list[tuple[int, list[int]]]  # (image index, [style] + caption + [EOS]) in pruned ids
    refs: list[list[str]]  # every caption of each image, as written (for CIDEr)
    start_ids: list[int]  # per image: the style id to decode it with (its first caption's)


# ---------------------------------------------------------------- tokens


def build_tokenizer(bpe_dir: Path) -> Tokenizer:
    """GPT-2's byte-level BPE from encoder.json + vocab.bpe, plus the style tokens."""
    tok = Tokenizer(models.BPE.from_file(str(bpe_dir / "encoder.json"), str(bpe_dir / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(STYLE_TOKENS[s], special=True) for s in STYLE_IDS])
    return tok


def build_id_map(tokenizer: Tokenizer, token_lists: list[list[int]]) -> list[int]:
    """Pruned id -> tokenizer id: EOS, the style tokens, then every GPT-2 token the training
    captions use (in GPT-2 id order)."""
    used = sorted({t for ids in token_lists for t in ids} - {GPT2_EOS_ID})
    styles = [tokenizer.token_to_id(STYLE_TOKENS[s]) for s in STYLE_IDS]
    return [GPT2_EOS_ID] + styles + used


def encode_captions(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """GPT-2 ids of each caption in training form, with GPT-2's leading space."""
    return [e.ids for e in tokenizer.encode_batch([" " + normalize_caption(t) for t in texts])]


# ---------------------------------------------------------------- features


def load_pixels(path: Path) -> np.ndarray:
    """PIL RGB -> 224x224 bilinear -> (x - 127) / 128, CHW float32."""
    img = Image.open(path).convert("RGB")
    if img.size != IMAGE_SIZE:
        img = img.resize(IMAGE_SIZE, Image.BILINEAR)
    x = (np.asarray(img, dtype=np.float32) - PIXEL_MEAN) / PIXEL_STD
    return x.transpose(2, 0, 1)


def block_features(encoder: FeatureEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, 224, 224) -> (B, 49, C) output of the backbone's last MBConv block: its
    ``extract_features`` without the head (C is 352 for Lite2, 320 for Lite0)."""
    net = encoder.backbone
    x = net._swish(net._bn0(net._conv_stem(pixels)))
    for idx, block in enumerate(net._blocks):
        rate = net._global_params.drop_connect_rate  # as extract_features passes it
        x = block(x, drop_connect_rate=rate * idx / len(net._blocks) if rate else rate)
    return x.flatten(2).transpose(1, 2)


def head_features(encoder: FeatureEncoder, block_tokens: torch.Tensor) -> torch.Tensor:
    """(B, 49, C) block tokens -> (B, 49, 1280): the backbone's head as ``extract_features``
    runs it, so the export (which traces the whole backbone) computes the same tokens."""
    batch, count, channels = block_tokens.shape
    side = math.isqrt(count)
    x = block_tokens.transpose(1, 2).reshape(batch, channels, side, side)
    net = encoder.backbone
    return net._swish(net._bn1(net._conv_head(x))).flatten(2).transpose(1, 2)


def image_tokens(encoder: FeatureEncoder, cached: torch.Tensor) -> torch.Tensor:
    """Decoder-ready tokens from cached features of either kind: the backbone's 1280-channel
    output goes straight to the projection, narrower block output runs the head first."""
    feats = cached.float()
    if feats.shape[-1] != BACKBONE_CHANNELS:
        feats = head_features(encoder, feats)
    return encoder.project(feats)


def feature_cache_dir(cache_root: Path, backbone: str, source_root: Path,
                      blocks: bool = False) -> Path:
    """Where one folder's features live: per backbone and kind (``blocks``: the last block's
    output, for a tuned head), and per folder (its name plus a hash of its resolved path, so
    two folders of the same name never share files)."""
    path_hash = hashlib.sha256(str(source_root.resolve()).encode()).hexdigest()[:10]
    kind = f"{backbone}-blocks" if blocks else backbone
    return cache_root / kind / f"{source_root.resolve().name}-{path_hash}"


def cached_features(names: list[str], images_dir: Path, cache_dir: Path,
                    encoder: FeatureEncoder, batch: int = 32,
                    featurize: Callable | None = None) -> torch.Tensor:
    """(N, 49, C) fp16 tokens, one `<image>.npy` per image in `cache_dir`; images without a
    cached file are run through ``featurize(encoder, pixels)`` first (default: the whole
    backbone, C = 1280; ``block_features`` stops before its head)."""
    featurize = featurize or (lambda enc, pixels: enc.backbone_features(pixels))
    missing = [n for n in dict.fromkeys(names) if not (cache_dir / f"{n}.npy").exists()]
    if missing:
        encoder.eval()
        bar = tqdm(total=len(missing), desc=f"features {cache_dir.name}", file=sys.stderr,
                   mininterval=10)
        for i in range(0, len(missing), batch):
            chunk = missing[i : i + batch]
            pixels = torch.from_numpy(np.stack([load_pixels(images_dir / n) for n in chunk]))
            with torch.inference_mode():
                feats = featurize(encoder, pixels).to(torch.float16).numpy()
            for n, f in zip(chunk, feats):
                final = cache_dir / f"{n}.npy"
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = final.with_name(final.name + ".tmp.npy")  # a killed run leaves no half file
                np.save(tmp, f)
                tmp.replace(final)
            bar.update(len(chunk))
        bar.close()
    if not names:
        return torch.zeros(0, 0, 0, dtype=torch.float16)
    return torch.from_numpy(np.stack([np.load(cache_dir / f"{n}.npy") for n in names]))


# ---------------------------------------------------------------- splits


def split_names(source: CaptionSource, split: str, limit: int | None) -> list[str]:
    """The first ``limit`` names of a source's split (all when None)."""
    return source.splits.get(split, [])[:limit]


def build_split(source: CaptionSource, names: list[str], tokenizer: Tokenizer,
                to_pruned: dict[int, int], max_tokens: int, feats: torch.Tensor) -> SplitData:
    """Rows and references of ``names`` from ``source``, with their features.

    Caption tokens outside the pruned vocabulary are dropped (only dev captions have any).
    """
    captions = [(image, c) for image, name in enumerate(names) for c in source.captions[name]]
    token_lists = encode_captions(tokenizer, [c.text for _, c in captions])
    rows = []
    for (image, caption), ids in zip(captions, token_lists):
        body = [to_pruned[t] for t in ids if t in to_pruned][:max_tokens]
        rows.append((image, [STYLE_IDS[caption.style]] + body + [EOS_ID]))
    refs = [[c.text for c in source.captions[n]] for n in names]
    start_ids = [STYLE_IDS[source.captions[n][0].style] for n in names]
    return SplitData(feats, rows, refs, start_ids)


def train_token_lists(sources: list[CaptionSource], names: list[list[str]],
                      tokenizer: Tokenizer) -> list[list[int]]:
    """GPT-2 ids of every training caption (what the pruned vocabulary must cover)."""
    texts = [c.text for source, part in zip(sources, names) for n in part
             for c in source.captions[n]]
    return encode_captions(tokenizer, texts)
