"""Caption data folders (edgecap.export.datasets): the caption-file formats and their errors,
the hash split, and the web caption converter on a tiny git repository. No torch needed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from edgecap.export.datasets import (
    ALT_TEXT,
    DESCRIBE,
    Caption,
    CaptionsFormatError,
    convert_webcaps,
    reads_like_description,
    hash_split,
    load_source,
    main,
    parse_captions_jsonl,
    parse_captions_tsv,
)


def data_folder(root: Path, caption_file: str, text: str, images: list[str]) -> Path:
    """A data folder with empty-but-present image files (parsing never opens them)."""
    (root / "images").mkdir(parents=True)
    for name in images:
        (root / "images" / name).write_bytes(b"")
    (root / caption_file).write_text(text)
    return root


def test_tsv_styles_comments_and_blank_lines(tmp_path):
    path = tmp_path / "captions.tsv"
    path.write_text("# image<TAB>caption<TAB>style\n\na.jpg\tA  dog runs .\n"
                    "a.jpg\tdog photo\talt-text\nb.jpg\ta cat\tdescribe\n")
    assert parse_captions_tsv(path) == {
        "a.jpg": [Caption("A dog runs .", DESCRIBE), Caption("dog photo", ALT_TEXT)],
        "b.jpg": [Caption("a cat", DESCRIBE)],
    }


@pytest.mark.parametrize("line, message", [
    ("a.jpg a dog without a tab", "expected image<TAB>caption"),
    ("a.jpg\ta dog\tdescribe\textra", "got 4 tab-separated fields"),
    ("a.jpg\ta dog\tposter", "unknown style 'poster'"),
    ("a.jpg\t   ", "empty caption"),
    ("\ta dog", "empty image name"),
    ("/abs/a.jpg\ta dog", "must be relative to images/"),
])
def test_tsv_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "captions.tsv"
    path.write_text(f"ok.jpg\tfine\n# comment\n{line}\n")
    with pytest.raises(CaptionsFormatError, match=message) as error:
        parse_captions_tsv(path)
    assert str(error.value).startswith(f"{path}:3: ")


def test_jsonl_format_and_errors(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "a dog"}\n'
                    '{"image": "b.jpg", "caption": "dog photo", "style": "alt-text"}\n')
    assert parse_captions_jsonl(path) == {"a.jpg": [Caption("a dog", DESCRIBE)],
                                          "b.jpg": [Caption("dog photo", ALT_TEXT)]}
    for bad, message in (('{"image": "a.jpg"', "not JSON"),
                         ('{"image": "a.jpg"}', "string 'image' and 'caption'"),
                         ('{"image": "a.jpg", "caption": "x", "style": "y"}', "unknown style")):
        path.write_text('{"image": "a.jpg", "caption": "a dog"}\n' + bad + "\n")
        with pytest.raises(CaptionsFormatError, match=message) as error:
            parse_captions_jsonl(path)
        assert str(error.value).startswith(f"{path}:2: ")


def test_missing_image_names_caption_file_and_line(tmp_path):
    root = data_folder(tmp_path / "d", "captions.tsv", "a.jpg\ta dog\nb.jpg\ta cat\n", ["a.jpg"])
    with pytest.raises(CaptionsFormatError, match=r"captions.tsv: 1 captioned image.*'b.jpg' "
                       r"at line 2"):
        load_source(root)


def test_folder_needs_exactly_one_caption_file(tmp_path):
    root = data_folder(tmp_path / "d", "captions.tsv", "a.jpg\ta dog\n", ["a.jpg"])
    (root / "captions.jsonl").write_text('{"image": "a.jpg", "caption": "a dog"}\n')
    with pytest.raises(CaptionsFormatError, match="exactly one of"):
        load_source(root)
    with pytest.raises(CaptionsFormatError, match=r"found none"):
        load_source(tmp_path)


def test_split_files_win_and_must_name_captioned_images(tmp_path):
    names = [f"{i}.jpg" for i in range(6)]
    root = data_folder(tmp_path / "d", "captions.tsv",
                       "".join(f"{n}\tcaption {n}\n" for n in names), names)
    (root / "split_train.txt").write_text("0.jpg\n1.jpg\n2.jpg\n")
    (root / "split_dev.txt").write_text("3.jpg\n")
    source = load_source(root)
    assert source.splits == {"train": ["0.jpg", "1.jpg", "2.jpg"], "dev": ["3.jpg"], "test": []}
    (root / "split_dev.txt").write_text("3.jpg\nnope.jpg\n")
    with pytest.raises(CaptionsFormatError, match=r"split_dev.txt:2: 'nope.jpg' has no caption"):
        load_source(root)


def test_flickr_layout_reads_as_describe(mini_flickr):
    source = load_source(mini_flickr)
    assert [len(source.splits[s]) for s in ("train", "dev", "test")] == [12, 4, 4]
    captions = source.captions[source.splits["train"][0]]
    assert len(captions) == 5 and {c.style for c in captions} == {DESCRIBE}


def test_hash_split_is_stable():
    names = [f"{i:09d}.jpg" for i in range(200)]
    split = hash_split(names, holdout=10)
    # Pinned: the split must not move between versions, machines or input orders.
    assert split["dev"] == ["000000100.jpg", "000000014.jpg", "000000059.jpg", "000000058.jpg",
                            "000000039.jpg"]
    assert split["test"] == ["000000164.jpg", "000000143.jpg", "000000079.jpg", "000000159.jpg",
                             "000000094.jpg"]
    assert hash_split(list(reversed(names)) + names[:5], holdout=10) == split
    assert sorted(split["train"] + split["dev"] + split["test"]) == names
    assert len(split["train"]) == 190
    assert hash_split(names)["dev"][:5] == split["dev"]  # default holdout: a tenth, same order


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_webcaps_converter_on_a_tiny_repository(tmp_path, sample_photos, capsys):
    repo = tmp_path / "repo"
    folder = repo / "data" / "00000"
    folder.mkdir(parents=True)
    for k, photo in enumerate(sample_photos(6)):
        key = f"{k:09d}"
        (folder / f"{key}.jpg").write_bytes(photo.read_bytes())
        caption = "" if k == 5 else f"actor attends the\tpremiere {k}\n"  # no caption: skipped
        if k == 4:
            caption = "a black cat sitting on a wooden table\n"
        (folder / f"{key}.txt").write_text(caption)
        (folder / f"{key}.json").write_text(json.dumps({"url": f"https://example.org/{k}.jpg"}))
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data")
    commit = git(repo, "rev-parse", "HEAD")

    out = tmp_path / "webcaps"
    counts = convert_webcaps(repo, out, commit, folders=("data/00000",), holdout=2)
    assert counts == {"images": 5, "train": 3, "dev": 1, "test": 1}
    source = load_source(out)
    assert source.captions["000000001.jpg"] == [Caption("actor attends the premiere 1", ALT_TEXT)]
    assert "000000005.jpg" not in source.captions
    assert (out / "urls.tsv").read_text().splitlines()[0] == \
        "000000000.jpg\thttps://example.org/0.jpg"
    assert "No licence is stated" in (out / "SOURCE.md").read_text()

    assert main(["check", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "images": 5, "styles": [ALT_TEXT], "train": 3, "dev": 1, "test": 1}
    assert main(["check", str(tmp_path)]) == 1
    assert "exactly one of" in capsys.readouterr().err
    assert main(["webcaps", "--repo", str(repo), "--out", str(tmp_path / "x"),
                 "--commit", "0" * 40]) == 1
    assert "not a git repository with commit 0000" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    # --describe-like: the one caption shaped like a plain description trains that style.
    convert_webcaps(repo, tmp_path / "mixed", commit, folders=("data/00000",), holdout=2,
                    describe_like=True)
    mixed = load_source(tmp_path / "mixed")
    assert mixed.captions["000000004.jpg"] == [Caption("a black cat sitting on a wooden table",
                                                       DESCRIBE)]
    assert {c.style for n, caps in mixed.captions.items() if n != "000000004.jpg"
            for c in caps} == {ALT_TEXT}


@pytest.mark.parametrize("caption, expected", [
    ("a dog laying in the grass with a collar on", True),
    ("two young girls are fixing a car in a garage", True),
    ("a woman in a cowboy hat walks with a horse", True),
    ("actor attends the premiere of the film", False),  # no article: alt-text
    ("a cat in a hat with flowers long sleeve t shirt", False),  # a product
    ("a cartoon cat sleeping in the night, png and psd", False),
    ("a happy dog", False),  # too short to be a description
    ("the view from the top of the mountain looking down", False),
])
def test_reads_like_description(caption, expected):
    assert reads_like_description(caption) is expected


def test_eval_scores_a_tsv_folder_like_flickr(tmp_path, sample_photos, tiny_export, capsys):
    """`edgecap eval` reads the folders train reads: a captions.tsv set's test split is captioned
    and scored against its own references; a broken folder is a one-line error."""
    from edgecap.cli.main import main as export_main

    photos = sample_photos(6)
    root = tmp_path / "web"
    (root / "images").mkdir(parents=True)
    for photo in photos:
        (root / "images" / photo.name).write_bytes(photo.read_bytes())
    (root / "captions.tsv").write_text(
        "".join(f"{p.name}\ta photo of {p.stem}\talt-text\n" for p in photos))
    (root / "split_train.txt").write_text("\n".join(p.name for p in photos[:3]) + "\n")
    (root / "split_test.txt").write_text("\n".join(p.name for p in photos[3:]) + "\n")
    out = tmp_path / "eval.json"
    assert export_main(["eval", "--data", str(root), "--split", "test", "--model", str(tiny_export),
                        "--no-meteor", "--max-new-tokens", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 3
    assert sorted(report["captions"]) == sorted(p.name for p in photos[3:])
    assert "CIDEr" in report["metrics"]

    (root / "captions.txt").write_text("x.jpg#0\ta dog\n")  # two caption files: ambiguous
    with pytest.raises(SystemExit, match="exactly one of captions.txt"):
        export_main(["eval", "--data", str(root), "--split", "test", "--model", str(tiny_export)])
