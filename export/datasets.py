"""Caption data sources for ``edgecap train``, and the converter for the web caption set.

A source is a folder laid out like Flickr8k::

    images/                   the pictures (any depth; names below are relative to images/)
    captions.txt | captions.tsv | captions.jsonl   one of the three caption files
    split_train.txt, split_dev.txt, split_test.txt  optional: one image name a line

- ``captions.txt`` is Flickr8k's own file: ``NAME#K<TAB>caption``; every caption has the
  ``describe`` style.
- ``captions.tsv``: ``image<TAB>caption`` or ``image<TAB>caption<TAB>style``, one caption a
  line; blank lines and lines starting with ``#`` are skipped.
- ``captions.jsonl``: one object a line, ``{"image": ..., "caption": ..., "style": ...}``
  (style optional).

A style is ``describe`` (a plain description of what is seen, Flickr8k's kind; the default) or
``alt-text`` (web alt-text, Conceptual Captions' kind). Without split files, ``hash_split``
holds out a fixed share of the images by a hash of their names.

``python -m edgecap.export.datasets webcaps --repo MIRROR --out DIR`` writes the web caption
set in this layout; ``python -m edgecap.export.datasets check DIR`` validates a folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

# Caption styles and the special token that starts a caption of that style. The decoder's
# first input token is the style token, so the export's decoder start token picks the style.
DESCRIBE, ALT_TEXT = "describe", "alt-text"
STYLE_TOKENS = {DESCRIBE: "<|describe|>", ALT_TEXT: "<|alt-text|>"}
CAPTION_FILES = ("captions.txt", "captions.tsv", "captions.jsonl")
SPLITS = ("train", "dev", "test")
MAX_HOLDOUT = 1000  # hash_split holds out at most this many images (the web set's dev+test)

# The web caption set: 256x256 JPEGs with one alt-text caption each (Conceptual Captions style).
WEBCAPS_REPO = "heon01px2020/csci1470-prismer-final-project"
WEBCAPS_COMMIT = "e059e1606aef04521e399c2b421438a46658a018"
WEBCAPS_FOLDERS = tuple(f"data/{k:05d}" for k in range(5))


class CaptionsFormatError(ValueError):
    """A caption or split file that does not follow the documented format; the message names
    the file and the line."""


class Caption(NamedTuple):
    text: str
    style: str


@dataclass
class CaptionSource:
    """One ``--data`` folder: its captions (image name -> captions) and its splits."""

    root: Path
    captions: dict[str, list[Caption]]
    splits: dict[str, list[str]] = field(default_factory=dict)

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def name(self) -> str:
        return self.root.name


# ---------------------------------------------------------------- caption files


def normalize_caption(text: str) -> str:
    """Training target form: lower-case, single spaces, no trailing ' .'."""
    text = " ".join(text.lower().split())
    return re.sub(r"\s*\.$", "", text).strip()


def _check_record(path: Path, line_no: int, image: str, text: str, style: str) -> Caption:
    where = f"{path}:{line_no}"
    if not image:
        raise CaptionsFormatError(f"{where}: empty image name")
    if PurePosixPath(image).is_absolute() or ".." in PurePosixPath(image).parts:
        raise CaptionsFormatError(f"{where}: image name {image!r} must be relative to images/")
    if not text.strip():
        raise CaptionsFormatError(f"{where}: empty caption for {image!r}")
    if style not in STYLE_TOKENS:
        raise CaptionsFormatError(
            f"{where}: unknown style {style!r} (known: {', '.join(STYLE_TOKENS)})")
    return Caption(" ".join(text.split()), style)


def _content_lines(path: Path):
    """(line number, line) for each line that is not blank and not a '#' comment."""
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            yield line_no, line


def parse_flickr_captions(path: Path) -> dict[str, list[Caption]]:
    """Flickr8k's ``captions.txt``: ``NAME#K<TAB>caption`` lines, all of the describe style."""
    captions: dict[str, list[Caption]] = {}
    for line_no, line in _content_lines(path):
        if "\t" not in line:
            raise CaptionsFormatError(f"{path}:{line_no}: expected NAME#K<TAB>caption")
        key, text = line.split("\t", 1)
        image = key.split("#")[0].strip()
        captions.setdefault(image, []).append(_check_record(path, line_no, image, text, DESCRIBE))
    return captions


def parse_captions_tsv(path: Path) -> dict[str, list[Caption]]:
    """``image<TAB>caption[<TAB>style]`` lines."""
    captions: dict[str, list[Caption]] = {}
    for line_no, line in _content_lines(path):
        fields = line.split("\t")
        if len(fields) not in (2, 3):
            raise CaptionsFormatError(
                f"{path}:{line_no}: expected image<TAB>caption[<TAB>style], got "
                f"{len(fields)} tab-separated fields")
        image, text, style = fields[0].strip(), fields[1], (fields[2:] or [DESCRIBE])[0].strip()
        captions.setdefault(image, []).append(_check_record(path, line_no, image, text, style))
    return captions


def parse_captions_jsonl(path: Path) -> dict[str, list[Caption]]:
    """``{"image": ..., "caption": ..., "style": ...}`` lines (style optional)."""
    captions: dict[str, list[Caption]] = {}
    for line_no, line in _content_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CaptionsFormatError(f"{path}:{line_no}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not all(
                isinstance(record.get(k), str) for k in ("image", "caption")):
            raise CaptionsFormatError(
                f"{path}:{line_no}: expected an object with string 'image' and 'caption'")
        image, style = record["image"].strip(), record.get("style", DESCRIBE)
        caption = _check_record(path, line_no, image, record["caption"], str(style))
        captions.setdefault(image, []).append(caption)
    return captions


PARSERS = {"captions.txt": parse_flickr_captions, "captions.tsv": parse_captions_tsv,
           "captions.jsonl": parse_captions_jsonl}


# ---------------------------------------------------------------- splits


def name_hash(name: str) -> str:
    """The hash that orders images for ``hash_split``: stable across machines and runs."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def holdout_size(n_images: int) -> int:
    """How many images ``hash_split`` holds out by default: a tenth, at most MAX_HOLDOUT."""
    return min(MAX_HOLDOUT, n_images // 10)


def hash_split(names: list[str], holdout: int | None = None) -> dict[str, list[str]]:
    """train/dev/test by a hash of each image name: the ``holdout`` names with the smallest
    hashes are held out, the first half of them (by hash) as dev, the rest as test.

    Depends only on the names, never on their order or on the machine. ``holdout`` defaults
    to ``holdout_size(len(names))``.
    """
    unique = sorted(set(names))
    count = holdout_size(len(unique)) if holdout is None else holdout
    if not 0 <= count <= len(unique):
        raise ValueError(f"holdout {count} out of range for {len(unique)} images")
    held = sorted(unique, key=lambda n: (name_hash(n), n))[:count]
    dev, test = held[: (count + 1) // 2], held[(count + 1) // 2:]
    held_set = set(held)
    return {"train": [n for n in unique if n not in held_set], "dev": dev, "test": test}


def read_split_file(path: Path, known: dict[str, list[Caption]]) -> list[str]:
    """Image names of a ``split_*.txt``; each must have captions in the caption file."""
    names = []
    for line_no, line in _content_lines(path):
        name = line.strip()
        if name not in known:
            raise CaptionsFormatError(f"{path}:{line_no}: {name!r} has no caption")
        names.append(name)
    return names


# ---------------------------------------------------------------- sources


def caption_file(root: Path) -> Path:
    """The one caption file of a source folder."""
    found = [root / name for name in CAPTION_FILES if (root / name).is_file()]
    if len(found) != 1:
        what = "none" if not found else ", ".join(p.name for p in found)
        raise CaptionsFormatError(
            f"{root}: a data folder needs exactly one of {', '.join(CAPTION_FILES)} (found {what})")
    return found[0]


def load_source(root: str | Path, check_images: bool = True) -> CaptionSource:
    """Read one data folder (see the module docstring for the layout).

    Raises:
        CaptionsFormatError: a file breaks the format, or (``check_images``) a captioned image
            is missing from images/; the message names the file and line.
    """
    root = Path(root)
    path = caption_file(root)
    captions = PARSERS[path.name](path)
    if not captions:
        raise CaptionsFormatError(f"{path}: no captions")
    split_files = [root / f"split_{s}.txt" for s in SPLITS]
    if any(p.is_file() for p in split_files):
        splits = {s: read_split_file(p, captions) if p.is_file() else []
                  for s, p in zip(SPLITS, split_files)}
    else:
        splits = hash_split(list(captions))
    if check_images:  # only images a split uses (Flickr8k captions one image it lacks)
        used = dict.fromkeys(n for part in splits.values() for n in part)
        missing = [n for n in used if not (root / "images" / n).is_file()]
        if missing:
            raise CaptionsFormatError(
                f"{path}: {len(missing)} captioned image(s) missing from {root / 'images'}, "
                f"first {missing[0]!r} at line {_first_line(path, missing[0])}")
    return CaptionSource(root, captions, splits)


def _first_line(path: Path, image: str) -> int:
    """Line number of the first line of ``path`` that names ``image`` (for error messages)."""
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if image in line:
            return line_no
    return 0


# ---------------------------------------------------------------- the web caption set


# Web captions that read like a plain description of a photo ("a dog laying in the grass")
# rather than alt-text about a product, a graphic or an event: they may train the describe style.
DESCRIPTION_OPENERS = frozenset("a an two three four five several some".split())
NOT_A_PHOTO = frozenset(
    "vector illustration illustrations png psd clipart clip icon icons logo template pattern "
    "poster card shirt t tee sticker print cartoon drawing painting stock design background "
    "wallpaper font text words quote graphic banner flyer mockup isolated editorial diagram "
    "infographic cover book album".split())
PLACES_AND_ACTIONS = frozenset("on in at with near by under over through across along".split())


def reads_like_description(caption: str) -> bool:
    """True for an alt-text caption shaped like a Flickr8k description: it opens with an
    article or a count, says what is happening or where, and names no graphic or product."""
    words = re.findall(r"[a-z]+", caption.lower())
    if not 5 <= len(words) <= 20 or words[0] not in DESCRIPTION_OPENERS:
        return False
    if NOT_A_PHOTO.intersection(words) or "," in caption:
        return False
    return any(w.endswith("ing") and len(w) > 4 for w in words[1:]) \
        or bool(PLACES_AND_ACTIONS.intersection(words[2:4]))


def convert_webcaps(repo: str | Path, out: str | Path, commit: str = WEBCAPS_COMMIT,
                    folders: tuple[str, ...] = WEBCAPS_FOLDERS,
                    holdout: int = MAX_HOLDOUT, describe_like: bool = False) -> dict[str, int]:
    """Write the web caption set from a clone or bare mirror of WEBCAPS_REPO into ``out``.

    Reads ``NAME.jpg`` + ``NAME.txt`` (the caption) + ``NAME.json`` (the source URL) at
    ``commit`` with ``git archive``; writes images/, captions.tsv (style alt-text), urls.tsv,
    hash-split split_*.txt files and SOURCE.md. Pairs without a caption or an image are skipped.
    With ``describe_like``, captions that ``reads_like_description`` get the describe style.

    Returns:
        counts: images written, and the size of each split.
    """
    check_commit(repo, commit)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    texts, urls, images = {}, {}, set()
    # Streamed: the archive is hundreds of MB and is read once, in order.
    git = subprocess.Popen(["git", "-C", str(repo), "archive", "--format=tar", commit, *folders],
                           stdout=subprocess.PIPE)
    with tarfile.open(fileobj=git.stdout, mode="r|") as tar:
        for member in tar:
            path = PurePosixPath(member.name)
            if not member.isfile() or path.suffix not in (".jpg", ".txt", ".json"):
                continue
            data = tar.extractfile(member).read()
            if path.suffix == ".jpg":
                (out / "images" / path.name).write_bytes(data)
                images.add(path.stem)
            elif path.suffix == ".txt":
                texts[path.stem] = " ".join(data.decode("utf-8", "replace").split())
            else:
                urls[path.stem] = json.loads(data).get("url", "")
    if git.wait() != 0:
        raise subprocess.CalledProcessError(git.returncode, git.args)
    keys = sorted(k for k in images if texts.get(k))
    names = [f"{k}.jpg" for k in keys]
    (out / "captions.tsv").write_text(
        "".join(f"{k}.jpg\t{texts[k]}\t{web_style(texts[k], describe_like)}\n" for k in keys),
        encoding="utf-8")
    (out / "urls.tsv").write_text("".join(f"{k}.jpg\t{urls.get(k, '')}\n" for k in keys))
    splits = hash_split(names, min(holdout, len(names)))
    for split, part in splits.items():
        (out / f"split_{split}.txt").write_text("".join(n + "\n" for n in part))
    counts = {"images": len(names), **{s: len(p) for s, p in splits.items()}}
    (out / "SOURCE.md").write_text(webcaps_readme(commit, counts))
    return counts


def web_style(caption: str, describe_like: bool) -> str:
    """A web caption's style: alt-text, unless ``describe_like`` and it reads like one."""
    return DESCRIBE if describe_like and reads_like_description(caption) else ALT_TEXT


def check_commit(repo: str | Path, commit: str) -> None:
    """Raise ValueError unless ``repo`` is a git repository that has ``commit``."""
    found = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet",
                            f"{commit}^{{commit}}"], capture_output=True)
    if found.returncode != 0:
        raise ValueError(f"{repo}: not a git repository with commit {commit} "
                         f"(expected a clone or mirror of {WEBCAPS_REPO})")


def webcaps_readme(commit: str, counts: dict[str, int]) -> str:
    """Provenance and terms of a converted web caption set."""
    return (
        f"# Web captions (converted by edgecap.export.datasets)\n\n"
        f"From the public GitHub repository {WEBCAPS_REPO} at commit {commit}, folders "
        f"{', '.join(WEBCAPS_FOLDERS)}: 256x256 JPEG web images with one alt-text caption each "
        f"(Conceptual Captions style); urls.tsv lists each image's source URL.\n\n"
        f"No licence is stated for these images or captions: use them for research only, and "
        f"do not redistribute them.\n\n"
        f"{counts['images']} images; split by a SHA-256 hash of the file name "
        f"(edgecap.export.datasets.hash_split): {counts['train']} train, {counts['dev']} dev, "
        f"{counts['test']} test.\n"
    )


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m edgecap.export.datasets {webcaps,check}``; prints one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m edgecap.export.datasets",
                                     description="Prepare or check caption data folders.")
    commands = parser.add_subparsers(dest="command", required=True)
    web = commands.add_parser("webcaps", help="convert the web caption set into a data folder")
    web.add_argument("--repo", required=True, help=f"clone or bare mirror of {WEBCAPS_REPO}")
    web.add_argument("--out", required=True, help="data folder to write (outside the repo)")
    web.add_argument("--commit", default=WEBCAPS_COMMIT)
    web.add_argument("--holdout", type=int, default=MAX_HOLDOUT,
                     help="images held out as dev + test, by hash of the file name")
    web.add_argument("--describe-like", action="store_true",
                     help="give the describe style to captions that read like a plain "
                     "description of a photo (the rest stay alt-text)")
    check = commands.add_parser("check", help="validate a data folder and count its splits")
    check.add_argument("folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "webcaps":
            report = convert_webcaps(args.repo, args.out, args.commit, holdout=args.holdout,
                                     describe_like=args.describe_like)
        else:
            source = load_source(args.folder)
            styles = sorted({c.style for caps in source.captions.values() for c in caps})
            report = {"images": len(source.captions), "styles": styles,
                      **{s: len(p) for s, p in source.splits.items()}}
    except (ValueError, subprocess.CalledProcessError, tarfile.TarError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
