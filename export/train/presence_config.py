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
                        help="recall every dev split (with enough positives) keeps at the chosen "
                        "thresholds")
    parser.add_argument("--operating-point", type=label_probability, action="append",
                        metavar="LABEL=P", help="use this head probability as LABEL's threshold "
                        "instead (e.g. person=0.3, chosen on dev captions); repeatable")


def label_probability(text: str) -> tuple[str, float]:
    """``person=0.3`` -> ("person", 0.3)."""
    label, sep, value = text.partition("=")
    try:
        probability = float(value)
    except ValueError:
        probability = -1.0
    if not sep or not label or not 0.0 < probability < 1.0:
        raise argparse.ArgumentTypeError(f"expected LABEL=P with P between 0 and 1, got {text!r}")
    return label.strip(), probability
