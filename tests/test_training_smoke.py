"""Smoke test of the training recipe: a few steps on 8 images (a Flickr8k-format folder built from
the photos in tests/data, see conftest.mini_flickr) with a tiny decoder."""

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("efficientnet_lite_pytorch")


def test_train_few_steps_and_reload(tmp_path, mini_flickr):
    from edgecap.export.captioner_model import load_trained
    from edgecap.export.training import TrainConfig, load_pixels, train

    out = tmp_path / "model"
    result = train(TrainConfig(
        mini_flickr, out, epochs=5, batch_size=8, lr=3e-3, warmup_steps=3, n_layer=1, n_embd=64,
        n_head=2, max_train_images=8, dev_images=4, patience=10, threads=2,
        cache_dir=tmp_path / "cache", log_every=0, command_line="pytest smoke",
    ))

    for name in ["encoder.pt", "decoder/config.json", "decoder/generation_config.json",
                 "id_map.json", "tokenizer.json", "preprocess.json", "train_config.json",
                 "train_log.jsonl", "metrics.json"]:
        assert (out / name).exists(), name
    losses = result["step_losses"]
    assert len(losses) == 25 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5]
    assert math.isfinite(log[-1]["dev_loss"]) and log[-1]["dev_cider"] >= 0.0

    encoder, decoder, id_map = load_trained(out)
    assert id_map[0] == 50256 and len(id_map) == decoder.config.vocab_size
    assert decoder.generation_config.num_beams == 3
    assert decoder.generation_config.eos_token_id == 0
    saved = torch.load(out / "encoder.pt", weights_only=True)
    assert torch.equal(encoder.state_dict()["proj.weight"], saved["proj.weight"])
    pixels = torch.from_numpy(load_pixels(mini_flickr / "images" / (mini_flickr / "split_train.txt")
                                          .read_text().split()[0]))[None]
    with torch.no_grad():
        tokens = encoder(pixels)
        logits = decoder(input_ids=torch.zeros(1, 1, dtype=torch.long),
                         encoder_hidden_states=tokens).logits
    assert tokens.shape == (1, 49, 64) and logits.shape == (1, 1, len(id_map))
