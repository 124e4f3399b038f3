"""``edgecap train-presence``'s options, torch-free so the CLI registers them at no cost."""

from __future__ import annotations

import argparse
from pathlib import Path

TARGET_RECALL = 0.95  # on every dev split: the threshold is the highest that keeps it

DESCRIPTION = ("Fit presence heads (person, dog, cat, vehicle, bicycle) for an `edgecap train "
               "--no-tune-encoder-head` run on its cached backbone features, with labels from "
               "the reference captions; writes presence.pt and presence.json into the run, and "
               "`edgecap export-trained` then adds the heads, the person gate and ImageNet tags "
               "to the exported encoder.")


def add_presence_arguments(parser: argparse.ArgumentParser) -> None:
    """``edgecap train-presence``'s arguments."""
    parser.add_argument("run", type=Path,
                        help="output folder of an `edgecap train --no-tune-encoder-head` run")
    parser.add_argument("--target-recall", type=float, default=TARGET_RECALL,
                        help="recall every dev split keeps at the chosen thresholds")
