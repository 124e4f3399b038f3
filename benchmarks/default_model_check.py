"""Every measure the default model's ship rule guards, for one or more exports, in one run.

For each model: Flickr8k test and web held-out test (beam 3, the shipped decoding), scored with
the COCO caption toolkit, plus how often captions name a person on person-free images (false
alarms) and on person images (recall), judged by the references; and the model card's photos,
counted by whether the caption names the photo's subject (the rule below, written down before
counting; the camera photo is left out because its subject is a person with a camera).

    python -m benchmarks.default_model_check MODEL_DIR [MODEL_DIR ...] \
        --web ~/.cache/edgecap/datasets/webcaps --out benchmarks/results/default_model_check.json

Latency is measured separately, alternating the models: ``python -m benchmarks.default_latency``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgecap.grounding import caption_words

REPO = Path(__file__).resolve().parents[1]
FLICKR = REPO.parent / "shared" / "data" / "flickr8k"
PHOTOS = REPO / "tests" / "data"
# Photo -> words any one of which names its subject.
SUBJECTS = {
    "cat": {"cat", "cats", "kitten", "kitty"},
    "coffee": {"cup", "coffee", "mug", "espresso"},
    "astronaut": {"astronaut", "man", "woman", "person", "boy", "girl", "child", "people"},
    "rocket": {"rocket", "shuttle", "missile"},
    "hubble": {"galaxy", "galaxies", "stars", "space", "sky"},
    "retina": {"eye", "retina"},
    "clock": {"clock"},
    "brick": {"brick", "bricks"},
    "grass": {"grass", "lawn"},
    "gravel": {"gravel", "stones", "pebbles", "rocks"},
}


def score_split(captioner, data: Path, split: str, batch_size: int, meteor: bool) -> dict:
    from edgecap.export.evaluate import caption_all, load_folder, person_mentions, score_captions

    images, references = load_folder(data, split)
    results = caption_all(captioner, images, batch_size, num_beams=3)
    hypotheses = {img.name: r.text for img, r in zip(images, results)}
    scores = score_captions(hypotheses, references, meteor=meteor)
    scores.update(person_mentions(hypotheses, references))
    return {k: round(v, 4) for k, v in scores.items()}


def photo_captions(captioner) -> dict[str, dict]:
    out = {}
    for name, words in SUBJECTS.items():
        text = captioner.caption(PHOTOS / f"{name}.jpg").text
        out[name] = {"caption": text, "named": not caption_words(text).isdisjoint(words)}
    return out


def main(argv: list[str] | None = None) -> int:
    from edgecap import Captioner

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="export directories")
    parser.add_argument("--web", type=Path, help="the web caption folder (webcaps)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-meteor", action="store_true")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    report = {}
    for model in args.models:
        captioner = Captioner(model)
        started = time.perf_counter()
        entry = {"flickr8k_test": score_split(captioner, FLICKR, "test", args.batch_size,
                                              not args.no_meteor)}
        if args.web:
            entry["web_test"] = score_split(captioner, args.web, "test", args.batch_size,
                                            not args.no_meteor)
        entry["photos"] = photo_captions(captioner)
        entry["photos_named"] = sum(p["named"] for p in entry["photos"].values())
        entry["size_mb"] = round(sum(f.stat().st_size for f in model.iterdir()) / 1e6, 1)
        entry["seconds"] = round(time.perf_counter() - started, 1)
        report[str(model)] = entry
        print(json.dumps({str(model): {k: v for k, v in entry.items() if k != "photos"}}),
              flush=True)
    if args.out:
        from .environment import environment

        report["environment"] = environment()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
