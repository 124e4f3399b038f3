"""What one training run is told: ``TrainConfig`` and the ``edgecap train`` arguments that fill it.

Kept apart from ``training`` (which imports torch) so the CLI can register its arguments for
free, and so neither the CLI module nor the recipe has to import the other.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgecap.cli.arg_types import positive_int

# Per backbone and data folder beneath: <cache>/<backbone>/<folder name>-<path hash>/<image>.npy
DEFAULT_CACHE_DIR = Path.home() / ".cache/edgecap/features"
BACKBONES = ("efficientnet-lite0", "efficientnet-lite2")
# Model families: how the image reaches the GPT-2 decoder.
CROSS_ATTENTION, PREFIX = "cross-attention", "prefix"
ARCHS = (CROSS_ATTENTION, PREFIX)


@dataclass
class TrainConfig:
    """Every setting of a training run; written to train_config.json, and recorded (paths cut
    to their names) in the provenance of an export of the checkpoint."""

    # One data folder or several (see edgecap.export.datasets for the layout); the first one's
    # dev split picks the best epoch.
    data_dir: str | Path | Sequence[str | Path]
    out_dir: str | Path  # checkpoint folder written (created)
    epochs: int = 6  # maximum epochs; early stopping may end sooner
    batch_size: int = 64  # captions per training step
    lr: float = 5e-4  # peak AdamW learning rate
    weight_decay: float = 0.01  # AdamW decay, on matrices only (not biases or norms)
    warmup_steps: int = 300  # linear warm-up, then cosine decay
    n_layer: int = 4  # decoder layers
    n_embd: int = 384  # decoder width
    n_head: int = 6  # decoder attention heads
    # cross-attention: the decoder attends to the image tokens in every layer; prefix (ClipCap
    # style): a mapper turns them into input embeddings placed before the caption.
    arch: str = CROSS_ATTENTION
    prefix_length: int = 10  # prefix only: embeddings the mapper writes per image
    mapper_layers: int = 2  # prefix only: transformer blocks of the mapper
    backbone: str = "efficientnet-lite2"  # ImageNet encoder, run at 224x224 (49 tokens)
    tune_encoder_head: bool = True  # also train the backbone's last 1x1 conv (on cached blocks)
    # cross-attention only: the backbone's top-k ImageNet classes as extra tokens the decoder
    # attends to (needs the frozen head, whose classifier they come from); 0: none
    tags: int = 0
    label_smoothing: float = 0.1  # cross-entropy label smoothing (training loss only)
    dropout: float = 0.1  # decoder dropout: embeddings, attention, residuals
    bf16: bool = False  # bf16 autocast for training steps (fp32 master weights)
    max_caption_tokens: int = 32  # longer training captions are cut
    dev_images: int = 250  # dev images of each folder scored (CIDEr-D) after each epoch
    patience: int = 2  # epochs without dev gain before stopping
    max_train_images: int | None = None  # first N train images of each folder, for smoke runs
    max_steps: int | None = None  # stop after this many steps
    time_budget_min: float | None = None  # wall-clock budget; the lr schedule decays to fit it
    seed: int = 0  # python, numpy and torch seeds, and the batch order
    threads: int = 2  # torch CPU threads
    cache_dir: str | Path = DEFAULT_CACHE_DIR  # frozen-backbone feature cache, outside the repo
    bpe_dir: str | Path | None = None  # GPT-2 BPE files; None: <data_dir>/../gpt2-bpe
    log_every: int = 20  # steps between progress lines; 0: none
    checkpoint_every: int = 200  # steps between resumable states (last.pt); epochs end with one
    resume: bool = False  # continue from <out_dir>/last.pt instead of starting afresh
    command_line: str | None = None  # recorded as given; None: this process's own command line


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``edgecap train`` options; ``config_from_args`` turns them into a ``TrainConfig``."""
    defaults = TrainConfig("", "")
    parser.add_argument("--data", required=True, action="append",
                        help="data folder: images/ + captions.txt (Flickr8k), captions.tsv or "
                        "captions.jsonl, optional split_*.txt; repeat for several (the first "
                        "one's dev split picks the best epoch); format in docs/training.md")
    parser.add_argument("--out", required=True, help="output checkpoint dir")
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help="maximum epochs (early stopping may end sooner)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                        help="linear warm-up, then cosine decay")
    _add_model_arguments(parser, defaults)
    _add_run_arguments(parser, defaults)


def _add_model_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The model's shape: decoder size, family, backbone and what it attends to."""
    parser.add_argument("--n-layer", type=int, default=defaults.n_layer, help="decoder layers")
    parser.add_argument("--n-embd", type=int, default=defaults.n_embd, help="decoder width")
    parser.add_argument("--n-head", type=int, default=defaults.n_head,
                        help="decoder attention heads")
    parser.add_argument("--arch", choices=ARCHS, default=defaults.arch,
                        help="model family: cross-attention (the decoder attends to the image "
                        "tokens in every layer; the default model's) or prefix (ClipCap style: a "
                        "mapper turns the image tokens into embeddings placed before the caption "
                        "of a plain GPT-2)")
    parser.add_argument("--prefix-length", type=positive_int, default=defaults.prefix_length,
                        help="--arch prefix: embeddings the mapper writes per image")
    parser.add_argument("--mapper-layers", type=positive_int, default=defaults.mapper_layers,
                        help="--arch prefix: transformer blocks of the mapper (queries attend "
                        "to the backbone's grid tokens)")
    parser.add_argument("--backbone", choices=BACKBONES, default=defaults.backbone,
                        help="ImageNet image encoder (frozen up to its head)")
    parser.add_argument("--no-tune-encoder-head", dest="tune_encoder_head",
                        action="store_false",
                        help="keep the backbone's last 1x1 conv frozen too (caches its output)")
    parser.add_argument("--tags", type=int, default=defaults.tags,
                        help="also let the decoder attend to the backbone's K most likely "
                        "ImageNet classes (cross-attention, with --no-tune-encoder-head)")


def _add_run_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """Regularisation, stopping, budgets, caches and checkpoints."""
    parser.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    parser.add_argument("--dropout", type=float, default=defaults.dropout,
                        help="decoder dropout (embeddings, attention, residuals)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for training steps")
    parser.add_argument("--dev-images", type=int, default=defaults.dev_images,
                        help="dev images of each folder scored per epoch (CIDEr-D)")
    parser.add_argument("--patience", type=int, default=defaults.patience,
                        help="epochs without dev gain before stopping")
    parser.add_argument("--max-train-images", type=int, default=None,
                        help="first N train images of each folder (smoke runs)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--time-budget-min", type=float, default=None,
                        help="wall-clock budget for training; the lr schedule decays to fit it")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--cache-dir", default=None,
                        help="frozen-encoder feature cache (default ~/.cache/edgecap/features)")
    parser.add_argument("--bpe-dir", default=None,
                        help="GPT-2 BPE files (default: <first --data>/../gpt2-bpe)")
    parser.add_argument("--log-every", type=int, default=defaults.log_every,
                        help="steps between progress lines on stderr; 0: none")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                        help="steps between resumable states (<out>/last.pt)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last.pt (same options)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` an ``edgecap train`` command line asks for."""
    return TrainConfig(
        data_dir=list(args.data), out_dir=args.out, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, n_layer=args.n_layer, n_embd=args.n_embd,
        n_head=args.n_head, arch=args.arch, prefix_length=args.prefix_length,
        mapper_layers=args.mapper_layers, backbone=args.backbone, tune_encoder_head=args.tune_encoder_head,
        tags=args.tags,
        label_smoothing=args.label_smoothing,
        dropout=args.dropout, bf16=args.bf16, dev_images=args.dev_images, patience=args.patience,
        max_train_images=args.max_train_images, max_steps=args.max_steps,
        time_budget_min=args.time_budget_min, seed=args.seed, threads=args.threads,
        cache_dir=args.cache_dir or DEFAULT_CACHE_DIR, bpe_dir=args.bpe_dir,
        log_every=args.log_every, checkpoint_every=args.checkpoint_every, resume=args.resume,
    )


def data_dirs(config: TrainConfig) -> list[Path]:
    """The run's data folders, in order (``data_dir`` may be one path or several)."""
    if isinstance(config.data_dir, (str, Path)):
        return [Path(config.data_dir)]
    return [Path(d) for d in config.data_dir]
