"""The NVIDIA settings and the device-resident decode path, checked without a GPU.

TensorRT's optimization profiles, engine cache and precision are provider options: the tests
read what would be handed to onnxruntime. The IO-binding path keeps the cache in OrtValues; on
the CPU (``io_binding="on"``) its tokens must equal the plain numpy path's token for token.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edgecap import Captioner, OptionsError
from edgecap.gpu.device_runner import DeviceGraphRunner, DeviceTensor
from edgecap.gpu.gather_graph import gather_rows_model
from edgecap.gpu.providers import (
    CPU, CUDA, TENSORRT, check_precision, default_engine_cache, provider_options,
    session_providers,
)
from edgecap.manifest import Manifest
from edgecap.options import MAX_BATCH, MAX_BEAMS
from edgecap.runner import GraphRunner

ALL_PROVIDERS = [TENSORRT, CUDA, CPU]


@pytest.fixture(scope="module")
def prefix_export(tmp_path_factory):
    """A tiny prefix captioner (ClipCap style, ten prefix embeddings) exported in-process."""
    pytest.importorskip("torch")
    from edgecap.export import export_prefix_captioner
    from tiny_prefix_models import PREFIX_CONFIGS, build_prefix_model

    cfg = next(c for c in PREFIX_CONFIGS if c.name == "conv-mlp-p10")
    encoder, mapper, gpt2, processor, tokenizer = build_prefix_model(cfg)
    out = tmp_path_factory.mktemp("prefix") / cfg.name
    export_prefix_captioner(encoder, mapper, gpt2, out, image_processor=processor,
                            tokenizer=tokenizer, prefix_length=cfg.prefix_length)
    return out


def profiles(model_dir, graph: str, tmp_path) -> dict[str, dict[str, list[int]]]:
    """pick (min/opt/max) -> input name -> dims, parsed back from the TensorRT options."""
    options = provider_options("tensorrt", graph, Manifest.read(model_dir),
                               engine_cache=tmp_path)[TENSORRT]
    parsed = {}
    for pick in ("min", "opt", "max"):
        entries = options[f"trt_profile_{pick}_shapes"].split(",")
        parsed[pick] = {name: [int(d) for d in dims.split("x")]
                        for name, dims in (entry.split(":") for entry in entries)}
    return parsed


def check_against_graph(model_dir, graph: str, tmp_path) -> dict:
    """Every input of the graph has a range, of its rank, equal to its fixed axes."""
    shapes = profiles(model_dir, graph, tmp_path)
    manifest = Manifest.read(model_dir)
    file = manifest.encoder_file if graph == "encoder" else manifest.decoder_file
    session = ort.InferenceSession(str(model_dir / file), providers=[CPU])
    assert set(shapes["min"]) == {t.name for t in session.get_inputs()}
    for tensor in session.get_inputs():
        low, opt, high = (shapes[pick][tensor.name] for pick in ("min", "opt", "max"))
        assert len(low) == len(opt) == len(high) == len(tensor.shape), tensor.name
        for axis, dim in enumerate(tensor.shape):
            assert low[axis] <= opt[axis] <= high[axis], (tensor.name, axis)
            if isinstance(dim, int):
                assert low[axis] == high[axis] == dim, (tensor.name, axis)
    return shapes


def test_tensorrt_profiles_of_a_cross_attention_export(tiny_export, tmp_path):
    m = Manifest.read(tiny_export)
    enc = check_against_graph(tiny_export, "encoder", tmp_path)
    size = m.preprocessing.height
    assert enc["min"]["pixel_values"] == [1, 3, size, size]
    assert enc["max"]["pixel_values"] == [MAX_BATCH, 3, size, size]
    dec = check_against_graph(tiny_export, "decoder", tmp_path)
    rows = MAX_BATCH * MAX_BEAMS
    heads, dim = m.num_heads, m.head_dim
    assert dec["min"]["past_key_0"] == [1, heads, 0, dim]  # the first step's empty cache
    assert dec["max"]["past_value_1"] == [rows, heads, m.max_positions - 1, dim]
    assert dec["opt"]["input_ids"] == [m.generation.num_beams, 1]
    assert m.shared_cross_kv  # one cross K/V per image, whatever the beams
    assert dec["min"]["cross_key_0"] == [1, heads, m.encoder_seq_len, dim]
    assert dec["max"]["cross_key_0"] == [MAX_BATCH, heads, m.encoder_seq_len, dim]


def test_tensorrt_profiles_of_a_prefix_export(prefix_export, tmp_path):
    m = Manifest.read(prefix_export)
    check_against_graph(prefix_export, "encoder", tmp_path)
    dec = check_against_graph(prefix_export, "decoder", tmp_path)
    p, width = m.prefix_length, m.num_heads * m.head_dim
    # The prefill feeds the whole prefix and no token; later steps one token and no prefix.
    assert dec["min"]["input_ids"][1] == 0 and dec["max"]["input_ids"][1] == 1
    assert dec["max"]["prefix_embeds"] == [MAX_BATCH * MAX_BEAMS, p, width]
    assert dec["opt"]["prefix_embeds"][1] == 0
    for name in dec["min"]:
        if name.startswith("prefix_") and name != "prefix_embeds":  # the prefix's K/V per image
            assert dec["min"][name][::2] == [1, 0] and dec["max"][name][::2] == [MAX_BATCH, p]


def test_provider_options_per_device(tiny_export, tmp_path):
    m = Manifest.read(tiny_export)
    assert provider_options("cpu", "decoder", m) == {}
    cuda = provider_options("cuda", "decoder", m)[CUDA]
    assert cuda["use_tf32"] == "0"  # fp32 must equal the CPU's fp32
    assert cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    trt = provider_options("tensorrt", "encoder", m, precision="fp16", engine_cache=tmp_path)
    assert trt[TENSORRT]["trt_fp16_enable"] == "True"
    assert trt[TENSORRT]["trt_engine_cache_enable"] == "True"
    assert trt[TENSORRT]["trt_engine_cache_path"] == str(tmp_path / "fp16")
    assert trt[TENSORRT]["trt_timing_cache_enable"] == "True"
    assert CUDA in trt  # nodes TensorRT does not take run on the CUDA provider
    with pytest.raises(ValueError, match="engine cache"):
        provider_options("tensorrt", "encoder", m)
    with pytest.raises(ValueError, match="graph"):
        provider_options("cuda", "both", m)


def test_session_providers_keep_what_onnxruntime_offers():
    options = {TENSORRT: {"trt_fp16_enable": "True"}, CUDA: {"device_id": "0"}}
    assert session_providers("tensorrt", options, ALL_PROVIDERS) == [
        (TENSORRT, {"trt_fp16_enable": "True"}), (CUDA, {"device_id": "0"}), CPU]
    assert session_providers("tensorrt", options, [CUDA, CPU]) == [(CUDA, {"device_id": "0"}), CPU]
    assert session_providers("cuda", {}, [CPU]) == [CPU]
    with pytest.raises(ValueError, match="unknown device"):
        session_providers("tpu", {}, ALL_PROVIDERS)


def test_captioner_hands_the_options_to_onnxruntime(tiny_export, tmp_path, monkeypatch, photos):
    """With TensorRT offered, both sessions get TensorRT (profiles, cache, fp16), then CUDA, then
    the CPU; the recorded sessions are opened on the CPU so that the captioner still runs."""
    created = []
    real_session = ort.InferenceSession

    def recording_session(model, options=None, providers=None, **kwargs):
        created.append(providers)
        return real_session(model, options, providers=[CPU])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ALL_PROVIDERS)
    monkeypatch.setattr(ort, "InferenceSession", recording_session)
    captioner = Captioner(tiny_export, device="tensorrt", precision="fp16",
                          engine_cache=tmp_path / "engines")
    encoder, decoder = created[:2]
    assert [p if isinstance(p, str) else p[0] for p in decoder] == ALL_PROVIDERS
    assert "pixel_values:1x3x" in encoder[0][1]["trt_profile_min_shapes"]
    assert "past_key_0:1x" in decoder[0][1]["trt_profile_min_shapes"]
    assert decoder[0][1]["trt_fp16_enable"] == "True"
    assert decoder[0][1]["trt_engine_cache_path"] == str(tmp_path / "engines" / "fp16")
    assert (tmp_path / "engines" / "fp16").is_dir()
    assert decoder[1] == (CUDA, provider_options("cuda", "decoder", captioner.manifest,
                                                 precision="fp16")[CUDA])
    assert captioner.caption(photos[0], max_new_tokens=3).token_ids


def test_default_engine_cache_is_one_folder_per_model(tiny_exports, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (_, first), (_, second) = list(tiny_exports.values())[:2]
    one, again = (default_engine_cache(first, Manifest.read(first)) for _ in range(2))
    other = default_engine_cache(second, Manifest.read(second))
    assert one == again and one != other
    assert one.parent == tmp_path / "edgecap" / "tensorrt"


def test_fp16_is_refused_where_it_would_do_nothing(tiny_export):
    m = Manifest.read(tiny_export)
    with pytest.raises(OptionsError, match="needs a GPU device"):
        Captioner(tiny_export, precision="fp16")
    with pytest.raises(OptionsError, match="fp16 export"):
        check_precision("cuda", "fp16", m, ALL_PROVIDERS)
    with pytest.raises(OptionsError, match="needs a GPU device"):
        check_precision("auto", "fp16", m, [CPU])
    check_precision("tensorrt", "fp16", m, ALL_PROVIDERS)  # TensorRT converts fp32 itself
    with pytest.raises(OptionsError, match="io_binding"):
        Captioner(tiny_export, io_binding="sometimes")


# ---------------------------------------------------------------- the device-resident path


def test_the_gather_graph_is_valid_onnx_and_gathers_rows():
    onnx = pytest.importorskip("onnx")
    model = gather_rows_model([(np.float32, 4), (np.float16, 4), (np.float32, 2)])
    onnx.checker.check_model(onnx.load_from_string(model), full_check=True)
    session = ort.InferenceSession(model, providers=[CPU])
    rng = np.random.default_rng(0)
    tensors = [rng.random((3, 2, 5, 4), np.float32), rng.random((3, 2, 0, 4)).astype(np.float16),
               rng.random((3, 7), np.float32)]
    rows = np.array([2, 0, 0, 1])  # reordered and repeated, as beam search does
    out = session.run(None, {"rows": rows, **{f"x{i}": t for i, t in enumerate(tensors)}})
    assert all(np.array_equal(o, t[rows]) and o.dtype == t.dtype for o, t in zip(out, tensors))
    with pytest.raises(ValueError, match="element type"):
        gather_rows_model([(np.int8, 2)])


def assert_cache_stays_on_device(monkeypatch) -> list[int]:
    """Every cache and cross K/V fed to the decoder is an OrtValue, never a host array; returns
    a list that counts the decoder runs."""
    runs = []
    original = DeviceGraphRunner._run_decoder

    def checked(self, feeds):
        kept = [v for name, v in feeds.items() if name in self.past_names + self.cross_names]
        assert kept and all(isinstance(v, DeviceTensor) for v in kept)
        runs.append(1)
        return original(self, feeds)

    monkeypatch.setattr(DeviceGraphRunner, "_run_decoder", checked)
    return runs


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_device_path_tokens_equal_the_numpy_path(tiny_export, photos, monkeypatch, beams, batch):
    plain = Captioner(tiny_export)
    bound = Captioner(tiny_export, io_binding="on")
    assert type(plain.runner) is GraphRunner and isinstance(bound.runner, DeviceGraphRunner)
    runs = assert_cache_stays_on_device(monkeypatch)
    options = dict(num_beams=beams, max_new_tokens=12, no_repeat_ngram_size=2)
    expected = plain.caption(photos[:batch], batch_size=batch, **options)
    got = bound.caption(photos[:batch], batch_size=batch, **options)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.score for r in got] == [r.score for r in expected]
    assert runs


def test_device_path_drops_finished_images_like_the_numpy_path(tiny_export, photos):
    """Six photos whose greedy captions end at different steps: finished images leave the
    device state (cache and cross K/V gathered on the device) exactly as they leave the numpy
    one."""
    plain = Captioner(tiny_export).caption(photos, batch_size=6, max_new_tokens=12)
    assert len({len(r.token_ids) for r in plain}) > 1, "fixture: every caption has one length"
    bound = Captioner(tiny_export, io_binding="on").caption(photos, batch_size=6,
                                                             max_new_tokens=12)
    assert [r.token_ids for r in bound] == [r.token_ids for r in plain]


@pytest.mark.parametrize("beams", [1, 3])
def test_device_path_of_a_prefix_export(prefix_export, photos, monkeypatch, beams):
    plain = Captioner(prefix_export)
    bound = Captioner(prefix_export, io_binding="on")
    assert_cache_stays_on_device(monkeypatch)
    options = dict(num_beams=beams, max_new_tokens=10)
    expected = plain.caption(photos[:3], batch_size=3, **options)
    got = bound.caption(photos[:3], batch_size=3, **options)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert any(r.token_ids for r in expected)


def test_every_captioning_command_takes_the_gpu_settings(photos, capsys):
    """caption, watch, serve and eval declare them once (options.RUNTIME); caption --ray
    refuses them rather than ignore them (its actors reserve CPUs, not GPUs)."""
    from edgecap.cli.main import main

    for command in ("caption", "watch", "serve"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--engine-cache DIR" in capsys.readouterr().out
    assert main(["caption", str(photos[0]), "--ray", "--precision", "fp16"]) == 2
    assert "are for local runs, not --ray" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["caption", str(photos[0]), "--batch-size", str(MAX_BATCH + 1)])
    assert f"must be <= {MAX_BATCH}" in capsys.readouterr().err
