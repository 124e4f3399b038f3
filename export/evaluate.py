"""``edgecap eval``: caption a dataset split and score it with the COCO caption toolkit.

Metrics come from pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr) after its PTB tokenizer, the
same pipeline published Flickr8k / COCO numbers use. METEOR and the PTB tokenizer run Java; when
Java is missing, captions are tokenized in Python and METEOR is skipped (said in the output).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

from edgecap import Captioner
from edgecap.options import runtime_from_args


def load_folder(data_dir: Path, split: str) -> tuple[list[Path], dict[str, list[str]]]:
    """(image paths in split order, image name -> reference captions) of any caption folder
    ``edgecap train`` reads (Flickr8k's, captions.tsv, captions.jsonl; see ``datasets``)."""
    from .datasets import SPLITS, CaptionsFormatError, load_source

    if split not in SPLITS:
        raise SystemExit(f"edgecap: error: unknown split {split!r} (splits: {', '.join(SPLITS)})")
    try:
        source = load_source(data_dir, check_images=False)
    except CaptionsFormatError as exc:
        raise SystemExit(f"edgecap: error: {exc}") from None
    names = source.splits.get(split) or []
    if not names:
        raise SystemExit(f"edgecap: error: {data_dir}: the {split} split is empty")
    references = {name: [c.text for c in source.captions[name]] for name in names}
    return [source.images_dir / name for name in names], references


def load_coco(json_path: Path, images_dir: Path | None) -> tuple[list[Path], dict[str, list[str]]]:
    data = json.loads(json_path.read_text())
    root = images_dir or json_path.parent
    files = {img["id"]: img["file_name"] for img in data["images"]}
    references: dict[str, list[str]] = {name: [] for name in files.values()}
    for ann in data["annotations"]:
        references[files[ann["image_id"]]].append(ann["caption"].strip())
    return [root / name for name in files.values()], references


def simple_tokenize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def score_captions(hypotheses: dict[str, str], references: dict[str, list[str]],
                   meteor: bool = True) -> dict[str, float]:
    """COCO caption metrics for hypotheses keyed like references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    have_java = shutil.which("java") is not None
    gts = {k: [{"caption": c} for c in references[k]] for k in hypotheses}
    res = {k: [{"caption": hypotheses[k]}] for k in hypotheses}
    if have_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    else:
        gts = {k: [simple_tokenize(c["caption"]) for c in v] for k, v in gts.items()}
        res = {k: [simple_tokenize(c["caption"]) for c in v] for k, v in res.items()}
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)})
    if meteor and have_java:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def person_mentions(hypotheses: dict[str, str], references: dict[str, list[str]]
                    ) -> dict[str, float]:
    """How often captions name a person where the references do not (false alarms: the share
    of person-free images whose caption names one) and where they do (recall). An image is a
    person image when any of its references names one (``edgecap.grounding.PRESENCE_WORDS``)."""
    from edgecap.grounding import names_label

    truth = {name: any(names_label(r, "person") for r in refs) for name, refs in references.items()
             if name in hypotheses}
    named = {name: names_label(hypotheses[name], "person") for name in truth}
    empty = [named[n] for n, has in truth.items() if not has]
    people = [named[n] for n, has in truth.items() if has]
    return {"person_false_alarm": sum(empty) / len(empty) if empty else float("nan"),
            "person_recall": sum(people) / len(people) if people else float("nan")}


def caption_all(captioner: Captioner, images: list[Path], batch_size: int, **options) -> list:
    """Captions in input order through the runtime's one batching path, with a progress bar.

    Raises:
        SystemExit: an image cannot be read (its name and the reason).
    """
    from tqdm import tqdm

    results = []
    stream = captioner.caption_stream([(str(p), p) for p in images], batch_size=batch_size,
                                      **options)
    for outcome in tqdm(stream, total=len(images), desc="captioning", unit="img", file=sys.stderr):
        if not outcome.ok:
            raise SystemExit(f"edgecap: error: {outcome.error}")
        results.append(outcome)
    return results


def invariance_share(captioner: Captioner, images: list[Path], batch_size: int = 8,
                     alone: list | None = None, **options) -> float:
    """Share of images whose tokens are identical captioned alone and in batches of ``batch_size``
    (``alone``: results already captioned one at a time, reused when given)."""
    alone = alone if alone is not None else caption_all(captioner, images, 1, **options)
    batched = caption_all(captioner, images, batch_size, **options)
    return sum(a.token_ids == b.token_ids for a, b in zip(alone, batched)) / max(1, len(images))


def format_table(rows: dict[str, dict[str, float]]) -> str:
    names = list(next(iter(rows.values())).keys())
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, scores in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{scores[n]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def evaluate_cli(args: argparse.Namespace) -> int:
    from edgecap.options import generation_from_args

    if args.data.is_dir():
        images, references = load_folder(args.data, args.split)
    else:
        images, references = load_coco(args.data, args.images)
    if args.limit:
        images = images[: args.limit]
    captioner = Captioner(args.model, **runtime_from_args(args))
    options = generation_from_args(args)
    effective = captioner.options(**options)
    started = time.perf_counter()
    results = caption_all(captioner, images, args.batch_size, **options)
    seconds = time.perf_counter() - started
    hypotheses = {img.name: r.text for img, r in zip(images, results)}
    scores = score_captions(hypotheses, references, meteor=not args.no_meteor)
    scores.update(person_mentions(hypotheses, {img.name: references[img.name] for img in images}))
    if args.invariance:
        # Identical alone vs in batches of 8: a caption must not depend on its batch.
        alone = results if args.batch_size == 1 else None
        scores["invariant@8"] = invariance_share(captioner, images, 8, alone, **options)
    label = f"{captioner.manifest.quantization.get('mode', 'none')} beams={effective.num_beams}"
    print(format_table({label: scores}))
    print(f"{len(images)} images in {seconds:.1f} s ({seconds / len(images) * 1e3:.1f} ms/image, "
          f"batch {args.batch_size})", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "model": str(captioner.model_dir), "split": args.split, "images": len(images),
            "options": effective.__dict__, "batch_size": args.batch_size,
            "quantization": captioner.manifest.quantization, "metrics": scores,
            "seconds": seconds, "captions": hypotheses,
        }, indent=2))
    return 0
