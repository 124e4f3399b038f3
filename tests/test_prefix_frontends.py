"""A prefix-conditioned (ClipCap-style) export through every front end: the torch-free runtime,
the HTTP service and ``watch`` give the same captions as the Python API, as they do for the
cross-attention family. Nothing above the graph-running layer knows which family it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
av = pytest.importorskip("av")

from test_runtime_isolation import BLOCKER
from test_server import Server, request
from test_watch import encode_video
from tiny_prefix_models import PREFIX_CONFIGS, build_prefix_model


@pytest.fixture(scope="module")
def prefix_export(tmp_path_factory) -> Path:
    """The ten-embedding tiny prefix model, exported (fp32)."""
    from edgecap.export import export_prefix_captioner

    cfg = next(c for c in PREFIX_CONFIGS if c.prefix_length == 10)
    encoder, mapper, gpt2, processor, tokenizer = build_prefix_model(cfg)
    out = tmp_path_factory.mktemp("prefix-frontends") / cfg.name
    export_prefix_captioner(encoder, mapper, gpt2, out, image_processor=processor,
                            tokenizer=tokenizer, prefix_length=cfg.prefix_length)
    return out


@pytest.fixture(scope="module")
def expected(prefix_export, flickr_images) -> dict:
    """The Python API's captions, the reference for every front end."""
    from edgecap import Captioner

    captioner = Captioner(prefix_export)
    assert captioner.manifest.conditioning == "prefix"
    return {"greedy": captioner.caption(flickr_images[:3]),
            "beam3": captioner.caption(flickr_images[:3], num_beams=3)}


def test_prefix_model_runs_with_torch_and_transformers_blocked(prefix_export, flickr_images,
                                                               expected):
    script = BLOCKER + f"""
import json
from edgecap import Captioner
from edgecap.cli.main import main
captioner = Captioner({str(prefix_export)!r})
images = {[str(p) for p in flickr_images[:3]]!r}
greedy = [r.token_ids for r in captioner.caption(images)]
beam = [r.token_ids for r in captioner.caption(images, num_beams=3)]
code = main(['caption', images[0], '--model', {str(prefix_export)!r}, '--json'])
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {{'torch', 'transformers', 'onnx'}})
print(json.dumps({{'greedy': greedy, 'beam': beam, 'code': code, 'loaded': loaded}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [] and report["code"] == 0
    assert report["greedy"] == [r.token_ids for r in expected["greedy"]]
    assert report["beam"] == [r.token_ids for r in expected["beam3"]]


def test_prefix_model_served_over_http(prefix_export, flickr_images, expected):
    server = Server(prefix_export)
    try:
        for image, want in zip(flickr_images[:3], expected["beam3"]):
            status, body, _ = request(server.url + "/v1/captions?num_beams=3", image.read_bytes())
            assert status == 200, body
            assert body["token_ids"] == want.token_ids
            assert body["generated_text"] == want.text
        status, body, _ = request(server.url + "/v1/captions", b"not an image")
        # Bad input is still a clear error, not a crash (422: a body that is not an image).
        assert status == 422 and body["error"] == "bad_image", body
    finally:
        assert server.stop() == 0


def test_prefix_model_watches_a_video(prefix_export, flickr_images, tmp_path):
    """One scene per photo: watch captions every scene of a video file with the prefix model."""
    video = tmp_path / "scenes.mp4"
    encode_video(video, flickr_images[:3])
    out = tmp_path / "captions.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "edgecap.cli", "watch", str(video), "--model", str(prefix_export),
         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) >= 3 and all(r["status"] == "ok" for r in records), records
    assert len({r["generated_text"] for r in records}) >= 2  # the scenes differ
    assert all(isinstance(r["token_ids"], list) for r in records)
