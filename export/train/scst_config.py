"""``edgecap train-scst`` options: the ``ScstConfig`` dataclass and its command line.

Torch-free, like ``train_config``, so registering the command costs nothing at serve time.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from edgecap.cli.arg_types import at_least


@dataclass
class ScstConfig:
    """Settings of an SCST fine-tuning run (see ``edgecap.export.scst``)."""

    checkpoint: str | Path  # an `edgecap train` output folder: the start, its data and options
    out_dir: str | Path  # the fine-tuned checkpoint (created)
    steps: int = 1000  # SCST steps at most
    time_budget_min: float | None = None  # stop when training has run this long
    lr: float = 1e-5  # constant AdamW learning rate (far below cross-entropy's peak)
    samples: int = 5  # captions sampled per image; each one's baseline is its siblings' mean
    images_per_step: int = 16
    max_new_tokens: int = 20
    eval_every: int = 100  # steps between dev scores (the best one is kept)
    log_every: int = 10
    bf16: bool = False  # bf16 autocast for sampling and the loss (fp32 master weights)
    first_folder_only: bool = False  # sample only the first --data folder's training images
    # CHAIR-style: taken off the reward of a sample that names a person no reference names
    person_penalty: float = 0.0
    threads: int = 2
    seed: int = 0


def add_scst_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ScstConfig("", "")
    parser.add_argument("checkpoint", type=Path,
                        help="folder written by `edgecap train` (its data folders, feature cache "
                        "and vocabulary are reused)")
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint dir")
    parser.add_argument("--steps", type=at_least(1), default=defaults.steps,
                        help="SCST steps at most")
    parser.add_argument("--time-budget-min", type=float, default=None,
                        help="stop once training has run this many minutes")
    parser.add_argument("--lr", type=float, default=defaults.lr,
                        help="constant AdamW learning rate")
    parser.add_argument("--samples", type=at_least(2), default=defaults.samples,
                        help="captions sampled per image (the others' mean is each one's "
                        "baseline)")
    parser.add_argument("--images-per-step", type=at_least(1), default=defaults.images_per_step)
    parser.add_argument("--max-new-tokens", type=at_least(1), default=defaults.max_new_tokens)
    parser.add_argument("--eval-every", type=at_least(1), default=defaults.eval_every,
                        help="steps between dev scores; the best model is kept")
    parser.add_argument("--log-every", type=int, default=defaults.log_every,
                        help="steps between progress lines; 0: none")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast for sampling and the loss")
    parser.add_argument("--first-folder-only", action="store_true",
                        help="train on the images of the run's first --data folder only (the "
                        "one whose dev split picks the best model)")
    parser.add_argument("--person-penalty", type=float, default=defaults.person_penalty,
                        help="subtract this from the reward of a sampled caption that names a "
                        "person when none of the image's references does (0: off)")
    parser.add_argument("--threads", type=at_least(1), default=defaults.threads,
                        help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def scst_config_from_args(args: argparse.Namespace) -> ScstConfig:
    return ScstConfig(
        checkpoint=args.checkpoint, out_dir=args.out, steps=args.steps,
        time_budget_min=args.time_budget_min, lr=args.lr, samples=args.samples,
        images_per_step=args.images_per_step, max_new_tokens=args.max_new_tokens,
        eval_every=args.eval_every, log_every=args.log_every, bf16=args.bf16,
        first_folder_only=args.first_folder_only, person_penalty=args.person_penalty,
        threads=args.threads, seed=args.seed)
