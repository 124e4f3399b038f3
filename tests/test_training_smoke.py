"""Smoke tests of the training recipe on tiny data built from the photos in tests/data: a
Flickr8k-format folder (conftest.mini_flickr) and a captions.tsv folder of alt-text captions,
trained together with style tokens; a killed run resumed from last.pt; a tiny decoder."""

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("efficientnet_lite_pytorch")

from conftest import PHOTO_CAPTIONS  # noqa: E402

TINY = dict(batch_size=8, lr=3e-3, n_layer=1, n_embd=64, n_head=2, max_train_images=8,
            dev_images=4, patience=10, threads=2, log_every=0, command_line="pytest smoke")


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory) -> Path:
    """One feature cache for the module: each photo runs through the backbone once."""
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def mini_web(tmp_path_factory, sample_photos) -> Path:
    """A captions.tsv folder of 20 photos with web-style alt-text captions and no split files
    (so the hash split picks dev and test)."""
    root = tmp_path_factory.mktemp("mini-web") / "webcaps"
    (root / "images").mkdir(parents=True)
    lines = []
    for path in sample_photos(20):
        (root / "images" / path.name).write_bytes(path.read_bytes())
        caption = PHOTO_CAPTIONS[path.stem.split("-v")[0]]
        lines.append(f"{path.name}\tstock photograph : {caption} vector illustration\talt-text")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_train_few_steps_and_reload(tmp_path, mini_flickr, feature_cache):
    from edgecap.export.captioner_model import FeatureEncoder, load_trained
    from edgecap.export.train.data import block_features, image_tokens
    from edgecap.export.train.loop import TrainConfig, load_pixels, train

    out = tmp_path / "model"
    result = train(TrainConfig(mini_flickr, out, epochs=5, warmup_steps=3,
                               cache_dir=feature_cache, **TINY))

    for name in ["encoder.pt", "encoder.json", "decoder/config.json",
                 "decoder/generation_config.json", "id_map.json", "tokenizer.json",
                 "preprocess.json", "train_config.json", "train_log.jsonl", "metrics.json",
                 "last.pt"]:
        assert (out / name).exists(), name
    losses = result["step_losses"]
    assert len(losses) == 25 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5]
    assert math.isfinite(log[-1]["dev_loss"]) and log[-1]["dev_cider"] >= 0.0

    encoder, decoder, id_map = load_trained(out)
    assert encoder.backbone_name == "efficientnet-lite2"
    assert id_map[:3] == [50256, 50257, 50258] and len(id_map) == decoder.config.vocab_size
    generation = decoder.generation_config
    assert generation.num_beams == 3
    assert (generation.eos_token_id, generation.decoder_start_token_id) == (0, 1)
    saved = torch.load(out / "encoder.pt", weights_only=True)
    assert torch.equal(encoder.state_dict()["proj.weight"], saved["proj.weight"])
    pixels = torch.from_numpy(load_pixels(mini_flickr / "images" / (mini_flickr / "split_train.txt")
                                          .read_text().split()[0]))[None]
    with torch.no_grad():
        tokens = encoder(pixels)
        logits = decoder(input_ids=torch.ones(1, 1, dtype=torch.long),
                         encoder_hidden_states=tokens).logits
        # Training ran the tuned backbone head on cached block output; the export runs the
        # whole backbone: both give the same tokens.
        from_blocks = image_tokens(encoder, block_features(encoder, pixels))
    assert tokens.shape == (1, 49, 64) and logits.shape == (1, 1, len(id_map))
    assert torch.allclose(from_blocks, tokens, atol=1e-5)
    pretrained = FeatureEncoder(64, pretrained_backbone=True, backbone="efficientnet-lite2")
    trained_net, imagenet_net = encoder.backbone, pretrained.backbone
    assert not torch.equal(trained_net._conv_head.weight, imagenet_net._conv_head.weight)
    assert torch.equal(trained_net._bn1.running_mean, imagenet_net._bn1.running_mean)
    assert torch.equal(trained_net._blocks[-1]._project_conv.weight,
                       imagenet_net._blocks[-1]._project_conv.weight)


def test_two_folders_with_style_tokens_in_one_command(tmp_path, mini_flickr, mini_web,
                                                      feature_cache, flickr_images, capsys):
    from tokenizers import Tokenizer

    from edgecap import Captioner
    from edgecap.cli.main import main

    out = tmp_path / "model"
    assert main(["train", "--data", str(mini_flickr), "--data", str(mini_web), "--out", str(out),
                 "--epochs", "2", "--batch-size", "8", "--n-layer", "1", "--n-embd", "64",
                 "--n-head", "2", "--max-train-images", "8", "--dev-images", "4",
                 "--warmup-steps", "2", "--cache-dir", str(feature_cache)]) == 0
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) == {
        "best_dev_cider", "best_epoch"}

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert set(log[-1]["dev_by_source"]) == {"flickr8k", "webcaps"}
    assert (log[0]["step"], log[1]["step"]) == (6, 12)  # (8 x 5 + 8 x 1) captions / 8 a step
    # The vocabulary covers both folders: "vector" occurs only in the alt-text captions.
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    id_map = json.loads((out / "id_map.json").read_text())
    assert tokenizer.token_to_id("Ġvector") in id_map
    assert tokenizer.decode([50257, tokenizer.token_to_id("Ġcat"), 50258]).strip() == "cat"
    recorded = json.loads((out / "train_config.json").read_text())
    assert recorded["data_dir"] == [str(mini_flickr.resolve()), str(mini_web.resolve())]

    # The exported model starts from the describe token; the runtime never prints a style token.
    export = tmp_path / "export"
    assert main(["export-trained", str(out), str(export)]) == 0
    captioner = Captioner(export)
    assert captioner.manifest.decoder_start_token_id == 1
    assert captioner.manifest.provenance["training"]["data_dir"] == ["flickr8k", "webcaps"]
    for result in captioner.caption(flickr_images[:2], max_new_tokens=8):
        assert "<|" not in result.text


def test_resume_continues_where_a_killed_run_stopped(tmp_path, mini_flickr, feature_cache,
                                                     monkeypatch):
    from edgecap.export.train import loop as training
    from edgecap.export.train.loop import TrainConfig

    def config(out: str, **changes) -> TrainConfig:
        settings = dict(TINY, epochs=2, warmup_steps=2, checkpoint_every=3,
                        cache_dir=feature_cache) | changes
        return TrainConfig(mini_flickr, tmp_path / out, **settings)

    unbroken = training.train(config("unbroken"))
    assert len(unbroken["step_losses"]) == 10  # 8 images x 5 captions / 8, two epochs

    real_save = training.save_state

    def killed_after_step_6(path, state, *args):
        real_save(path, state, *args)
        if state.step == 6:  # mid epoch 2, right after its state was written
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_state", killed_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        training.train(config("run"))
    monkeypatch.setattr(training, "save_state", real_save)
    with pytest.raises(ValueError, match="lr differ"):
        training.train(config("run", lr=1e-3, resume=True))

    resumed = training.train(config("run", resume=True))
    assert resumed["step_losses"] == pytest.approx(unbroken["step_losses"], rel=1e-5)
    assert [r["dev_cider"] for r in resumed["history"]] == pytest.approx(
        [r["dev_cider"] for r in unbroken["history"]], rel=1e-5)
    log = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2]
    # A finished run resumes to nothing more.
    again = training.train(config("run", resume=True))
    assert again["step_losses"] == resumed["step_losses"]


def test_resume_with_more_patience_continues_an_early_stopped_run(tmp_path, mini_flickr,
                                                                  feature_cache, monkeypatch):
    from edgecap.export.train import loop as training
    from edgecap.export.train.loop import TrainConfig

    scores = iter([0.5, 0.4, 0.45, 0.6])  # dev CIDEr-D of epochs 1 to 4: epoch 2 loses

    def scripted_evaluate(*args):
        return {"dev_loss": 1.0, "dev_cider": next(scores), "images": 4, "sample": ["a dog"]}

    monkeypatch.setattr(training, "evaluate", scripted_evaluate)

    def config(**changes) -> TrainConfig:
        settings = dict(TINY, epochs=4, warmup_steps=2, cache_dir=feature_cache) | changes
        return TrainConfig(mini_flickr, tmp_path / "run", **settings)

    first = training.train(config(patience=1))
    assert [r["epoch"] for r in first["history"]] == [1, 2] and first["best_epoch"] == 1
    # The same patience: still stopped, nothing trains.
    same = training.train(config(patience=1, resume=True))
    assert same["step_losses"] == first["step_losses"]
    # More patience: epochs 3 and 4 train, and epoch 4's better score is kept.
    more = training.train(config(patience=3, resume=True))
    assert [r["epoch"] for r in more["history"]] == [1, 2, 3, 4]
    assert more["best_epoch"] == 4 and more["best_dev_cider"] == 0.6
    assert len(more["step_losses"]) == 20
