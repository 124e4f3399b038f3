"""The embedded default model ships inside the package and captions with no flags."""

from __future__ import annotations

from edgecap import Captioner
from edgecap.captioner import default_model_dir
from edgecap.cli.main import main


def test_default_model_is_small_int8_and_captions(flickr_images, capsys):
    files = list(default_model_dir().iterdir())
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    captioner = Captioner()
    assert captioner.manifest.quantization["mode"] == "int8-dynamic"
    result = captioner.caption(flickr_images[0])
    words = result.text.split()
    assert len(words) >= 3 and result.text == result.text.lower()
    greedy = captioner.caption(flickr_images[0], num_beams=1)
    assert greedy.text and greedy.token_ids
    assert main(["caption", str(flickr_images[0])]) == 0
    assert capsys.readouterr().out.strip() == result.text


def test_shipped_manifest_names_no_private_path():
    """Files people ship must not carry the paths of the machine that made them."""
    import re

    from edgecap.captioner import default_model_dir

    text = (default_model_dir() / "manifest.json").read_text()
    assert not re.search(r'"(/|[A-Za-z]:\\\\)|/work/|/root/|/home/|/tmp/', text)
