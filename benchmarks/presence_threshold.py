"""Pick a grounded model's person operating point on dev captions, where the gate acts.

Captions each dev image once with the gate off (beam 3). For any threshold the gated outcome
follows without captioning again: an image whose person score is at or above the threshold
keeps its ungated caption; one below it loses every person word. So one pass gives, for every
threshold, how often captions name a person on person-free images (false alarms) and on person
images (recall), judged by the references, per data folder. It prints the highest threshold that
keeps ``--target-recall`` on every folder, as a head probability that
``edgecap train-presence RUN --operating-point person=P`` takes.

    python -m benchmarks.presence_threshold MODEL_DIR --data FLICKR --data WEB --split dev
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def caption_folder(captioner, data: Path, split: str) -> dict[str, np.ndarray]:
    from edgecap.export.evaluate import caption_all, load_folder
    from edgecap.grounding import names_label

    images, references = load_folder(data, split)
    results = caption_all(captioner, images, 16, num_beams=3, presence_gate=False)
    return {
        "score": np.array([r.tag_score("person") for r in results], np.float64),
        "named": np.array([names_label(r.text, "person") for r in results]),
        "truth": np.array([any(names_label(t, "person") for t in references[i.name])
                           for i in images]),
    }


def outcome(folder: dict[str, np.ndarray], threshold: float) -> tuple[float, float]:
    """(false alarm rate, recall) of gated captions at ``threshold``."""
    named = folder["named"] & (folder["score"] >= threshold)
    truth = folder["truth"]
    return float(named[~truth].mean()), float(named[truth].mean())


def main(argv: list[str] | None = None) -> int:
    from edgecap import Captioner

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a grounded export")
    parser.add_argument("--data", type=Path, action="append", required=True)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--target-recall", type=float, default=0.92)
    args = parser.parse_args(argv)
    captioner = Captioner(args.model)
    if captioner.grounding is None:
        parser.error(f"{args.model} has no presence heads")
    folders = {d.name: caption_folder(captioner, d, args.split) for d in args.data}
    grid = np.round(np.arange(0.02, 0.99, 0.02), 2)
    rows = {float(t): {name: outcome(f, t) for name, f in folders.items()} for t in grid}
    for t, by_folder in rows.items():
        print(f"{t:.2f} " + "  ".join(f"{n}: false alarms {fa:.3f} recall {r:.3f}"
                                      for n, (fa, r) in by_folder.items()), file=sys.stderr)
    ok = [t for t, by in rows.items() if all(r >= args.target_recall for _, r in by.values())]
    if not ok:
        print(f"no threshold keeps recall {args.target_recall} on every folder, even ungated: "
              "the decoder itself names too few people", file=sys.stderr)
        return 1
    best = max(ok)
    # The export's scores are folded (0.5 = its current operating point): map back to the head's
    # own probability, which train-presence takes.
    current = captioner.manifest.grounding.get("operating_points", {}).get("person")
    raw = best  # unfolded heads: the scores are the heads' own probabilities
    if current is not None:
        logit = math.log(best / (1 - best)) + math.log(current / (1 - current))
        raw = round(1 / (1 + math.exp(-logit)), 4)
    print(json.dumps({"threshold": best, "operating_point": raw, "at_threshold": rows[best],
                      "ungated": {n: outcome(f, 0.0) for n, f in folders.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
