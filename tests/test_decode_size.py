"""Decoding at the size the model needs: large JPEGs and video frames are decoded at a reduced
scale that still covers the model's input, small ones keep exact pixels, and
``exact_preprocessing`` restores exact pixels everywhere (docs/options.md)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecap import Captioner, ImageError
from edgecap.decode_guard import (
    BudgetExceeded,
    check_request_pixels,
    decode_for_model,
    header_pixels,
)
from edgecap.manifest import Preprocessing
from edgecap.preprocess import MIN_DECODED_SIDE, load_image, preprocess_batch, reduction

MODEL_INPUT = (224, 224)  # the default model's input; the tiny exports' is far smaller
FULL_HD, UHD = (1920, 1080), (3840, 2160)


def jpeg(photo: Path, size: tuple[int, int], **save) -> bytes:
    """A real photo scaled to ``size`` and encoded as a JPEG, as a camera would send it."""
    image = Image.open(photo).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def large_jpegs(photos) -> dict[str, bytes]:
    return {"1080p": jpeg(photos[0], FULL_HD), "4k": jpeg(photos[1], UHD),
            "4k-progressive": jpeg(photos[2], UHD, progressive=True)}


def test_the_rule_keeps_small_images_exact():
    assert reduction((447, 2000), MODEL_INPUT) == 1  # under twice the input on one side
    assert reduction((500, 375), MODEL_INPUT) == 1  # a Flickr8k-sized photo
    assert reduction(FULL_HD, MODEL_INPUT) == 1080 // MIN_DECODED_SIDE
    assert reduction(UHD, None) == 1
    # Tiny inputs do not make ordinary photos "large": the floor keeps them exact.
    assert reduction((320, 320), (32, 32)) == 1


@pytest.mark.parametrize("size", [(320, 213), (447, 600), (500, 375), (511, 511), (1000, 400)])
def test_small_jpegs_decode_to_identical_pixels(photos, size):
    data = jpeg(photos[0], size)
    exact = np.asarray(load_image(data))
    assert exact.shape[:2] == (size[1], size[0])
    assert np.array_equal(np.asarray(load_image(data, reduce_to=MODEL_INPUT)), exact)


def test_shipped_photos_give_the_same_pixels_and_captions(tiny_export, photos):
    """Images under the threshold: exact_preprocessing changes nothing at all."""
    fast, exact = Captioner(tiny_export), Captioner(tiny_export, exact_preprocessing=True)
    config = fast.manifest.preprocessing
    for photo in photos:
        ours = preprocess_batch([load_image(photo, reduce_to=fast.decode_size)], config)
        assert np.array_equal(ours, preprocess_batch([load_image(photo)], config))
    assert [r.token_ids for r in fast.caption(photos)] == \
        [r.token_ids for r in exact.caption(photos)]


@pytest.mark.parametrize("name", ["1080p", "4k", "4k-progressive"])
def test_large_jpegs_go_through_draft_and_stay_close(large_jpegs, name):
    data = large_jpegs[name]
    full = load_image(data)
    reduced = load_image(data, reduce_to=MODEL_INPUT)
    # 1080p at 1/4 and 4K at 1/8 (libjpeg's smallest scale): both still cover the input.
    assert reduced.size == (480, 270)
    # After the model's resize the two decodes differ by a few levels, not in content.
    a, b = (np.asarray(im.resize(MODEL_INPUT, Image.Resampling.BILINEAR), np.float32)
            for im in (full, reduced))
    assert np.abs(a - b).mean() < 3.0
    assert not np.array_equal(a, b)


def test_exif_rotation_is_applied_after_a_reduced_decode(photos):
    image = Image.open(photos[0]).convert("RGB").resize(UHD)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (a quarter turn)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif)
    full = load_image(buffer.getvalue())
    reduced = load_image(buffer.getvalue(), reduce_to=(224, 448))
    assert full.size == (2160, 3840) and reduced.size == (270, 480)
    a, b = (np.asarray(im.resize((64, 128)), np.float32) for im in (full, reduced))
    assert np.abs(a - b).mean() < 3.0  # same orientation, same picture


def test_exact_preprocessing_restores_full_size_decodes(tiny_export, large_jpegs):
    fast, exact = Captioner(tiny_export), Captioner(tiny_export, exact_preprocessing=True)
    assert exact.decode_size is None and fast.decode_size == (32, 32)
    data = large_jpegs["4k"]
    assert exact.caption(data).token_ids == exact.caption(load_image(data)).token_ids
    drafted = load_image(data, reduce_to=fast.decode_size)
    assert drafted.width < UHD[0]
    assert fast.caption(data).token_ids == fast.caption(drafted).token_ids


def test_captions_do_not_depend_on_the_batch(tiny_export, large_jpegs, photos):
    captioner = Captioner(tiny_export)
    inputs = [large_jpegs["4k"], photos[0], large_jpegs["1080p"], large_jpegs["4k-progressive"]]
    alone = [captioner.caption(item).token_ids for item in inputs]
    for batch_size in (2, 4):
        together = captioner.caption(inputs, batch_size=batch_size)
        assert [r.token_ids for r in together] == alone
    assert captioner.caption(inputs[::-1], batch_size=4)[-1].token_ids == alone[0]


def test_bad_large_jpegs_are_typed_errors(tiny_export, large_jpegs):
    data = large_jpegs["4k"]
    for cut in (len(data) // 3, len(data) - 100):
        with pytest.raises(ImageError, match="corrupt or truncated"):
            load_image(data[:cut], reduce_to=MODEL_INPUT)
    with pytest.raises(ImageError, match="image too large"):  # the stored size is what counts
        load_image(data, max_pixels=UHD[0] * UHD[1] - 1, reduce_to=MODEL_INPUT)
    outcomes = list(Captioner(tiny_export).caption_stream([data[:5000], data]))
    assert [o.ok for o in outcomes] == [False, True]
    assert isinstance(outcomes[0].error, ImageError)


def test_decode_budgets_count_the_pixels_actually_decoded(large_jpegs, photos):
    data = large_jpegs["4k"]
    assert header_pixels(data) == UHD[0] * UHD[1]
    assert header_pixels(data, MODEL_INPUT) == (UHD[0] // 8) * (UHD[1] // 8)
    png = io.BytesIO()
    Image.open(photos[0]).convert("RGB").resize(FULL_HD).save(png, "PNG")
    # PNG has no reduced decode: counted, and decoded, at full size.
    assert header_pixels(png.getvalue(), MODEL_INPUT) == FULL_HD[0] * FULL_HD[1]
    uploads = [("a.jpg", data), ("b.jpg", data)]
    assert check_request_pixels(uploads, 2 * header_pixels(data, MODEL_INPUT), MODEL_INPUT)
    with pytest.raises(BudgetExceeded):
        check_request_pixels(uploads, 2 * header_pixels(data, MODEL_INPUT))
    config = Preprocessing(height=224, width=224)
    served = decode_for_model(data, "a.jpg", 50_000_000, config, MODEL_INPUT)
    local = load_image(data, reduce_to=MODEL_INPUT).resize((224, 224), Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(served), np.asarray(local))


# ------------------------------------------------------------------ video frames (watch)


def encode_video(path: Path, photo: Path, size: tuple[int, int], frames: int = 3) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        pixels = np.asarray(Image.open(photo).convert("RGB").resize(size))
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def videos(tmp_path_factory, photos) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("frame-sizes")
    paths = {"1080p": root / "full-hd.mp4", "small": root / "small.mp4"}
    encode_video(paths["1080p"], photos[0], FULL_HD)
    encode_video(paths["small"], photos[0], (320, 240))
    return paths


def frames_of(video: Path, reduce_to) -> list[Image.Image]:
    from edgecap.watch.sources import VideoSource

    return [frame.image for frame in VideoSource(str(video), reduce_to=reduce_to).frames()]


def test_video_frames_are_scaled_in_the_decoder(videos):
    full, reduced = frames_of(videos["1080p"], None), frames_of(videos["1080p"], MODEL_INPUT)
    assert len(full) == len(reduced) == 3
    assert full[0].size == FULL_HD and reduced[0].size == (480, 270)
    a, b = (np.asarray(im.resize(MODEL_INPUT, Image.Resampling.BILINEAR), np.float32)
            for im in (full[0], reduced[0]))
    assert np.abs(a - b).mean() < 3.0


def test_small_video_frames_keep_exact_pixels(videos):
    full, reduced = frames_of(videos["small"], None), frames_of(videos["small"], MODEL_INPUT)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(full, reduced))


def test_watch_decodes_frames_at_the_captioners_size(tiny_export, videos):
    from edgecap.watch.sources import VideoSource
    from edgecap.watch.stream import WatchOptions, watch

    sizes = {}
    for exact in (False, True):
        captioner = Captioner(tiny_export, exact_preprocessing=exact)
        source = VideoSource(str(videos["1080p"]))
        records = list(watch(source, captioner, WatchOptions(heartbeat_s=1e-3)))
        assert len(records) == 3
        sizes[exact] = {record.image.size for record in records}
        expected = captioner.caption(records[0].image)
        assert records[0].result.token_ids == expected.token_ids
    assert sizes == {False: {(480, 270)}, True: {FULL_HD}}


def test_folder_sources_use_the_jpeg_rule(tmp_path, large_jpegs):
    from edgecap.watch.sources import open_source

    (tmp_path / "big.jpg").write_bytes(large_jpegs["1080p"])
    source = open_source(str(tmp_path), reduce_to=MODEL_INPUT)
    frame = next(iter(source.frames()))
    source.stop()
    assert frame.image.size == (480, 270)


def test_the_cli_flag_reaches_the_decoder(tiny_export, large_jpegs, tmp_path, capsys):
    import json

    from edgecap.cli.main import main

    path = tmp_path / "big.jpg"
    path.write_bytes(large_jpegs["4k"])
    for flags, captioner in (([], Captioner(tiny_export)),
                             (["--exact-preprocessing"],
                              Captioner(tiny_export, exact_preprocessing=True))):
        assert main(["caption", str(path), "--model", str(tiny_export), "--json", *flags]) == 0
        record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert record["token_ids"] == captioner.caption(path).token_ids
