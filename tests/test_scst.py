"""Self-critical sequence training: the CIDEr-D reward against pycocoevalcap, the
leave-one-out baseline, and a real SCST run from a tiny `edgecap train` checkpoint that
exports like any other."""

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("pycocoevalcap")

REFS = [
    ["a black dog runs through the snow", "a dog running in snow", "the black dog is outside"],
    ["two children play on the beach", "kids playing in the sand", "two kids at the beach"],
    ["a man rides a bike down the street", "a cyclist on a city street"],
    ["a cat sleeps on a red sofa", "a tabby cat asleep on a couch", "a cat on a sofa"],
]
HYPS = ["a black dog in the snow", "two kids play on the sand", "a man on a bike",
        "a dog on a red sofa"]


def test_corpus_cider_equals_pycocoevalcap_on_its_own_corpus():
    from pycocoevalcap.cider.cider import Cider

    from edgecap.export.train.scst_reward import CorpusCider

    _, expected = Cider().compute_score({i: r for i, r in enumerate(REFS)},
                                        {i: [h] for i, h in enumerate(HYPS)})
    cider = CorpusCider(REFS)
    got = [cider.score(h, i) for i, h in enumerate(HYPS)]
    assert got == pytest.approx(list(expected), rel=1e-9)
    # A caption equal to a reference beats an unrelated one; an empty one scores zero.
    assert cider.score(REFS[3][0], 3) > cider.score("two kids at the beach", 3)
    assert cider.score("", 0) == 0.0


def test_leave_one_out_advantage_is_reward_minus_siblings_mean():
    from edgecap.export.train.scst import leave_one_out_advantage

    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    advantage = leave_one_out_advantage(rewards, samples=3)
    assert advantage.tolist() == pytest.approx([1 - 2.5, 2 - 2.0, 3 - 1.5, 0 - 3.0, 0 - 3.0, 6.0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mini_flickr):
    from edgecap.export.train.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("xe")
    train(TrainConfig(mini_flickr, out, epochs=2, warmup_steps=3, batch_size=8, lr=3e-3,
                      n_layer=1, n_embd=64, n_head=2, max_train_images=8, dev_images=4,
                      threads=2, log_every=0, cache_dir=tmp_path_factory.mktemp("features"),
                      command_line="pytest scst"))
    return out


def test_scst_run_keeps_the_best_and_exports(trained, tmp_path, flickr_images):
    from edgecap import Captioner
    from edgecap.export.train.scst import ScstConfig, sample_captions, scst_train  # noqa: F401
    from edgecap.export.train.trained_export import export_checkpoint

    out = tmp_path / "scst"
    result = scst_train(ScstConfig(trained, out, steps=6, lr=1e-3, samples=3, images_per_step=4,
                                   eval_every=3, log_every=0))

    assert [r["step"] for r in result["history"]] == [0, 3, 6]
    assert result["start_dev_cider"] == result["history"][0]["dev_cider"]
    assert result["best_dev_cider"] == max(r["dev_cider"] for r in result["history"])
    assert all(math.isfinite(r["train_reward"]) and r["train_reward"] >= 0
               for r in result["history"][1:])
    log = [json.loads(line) for line in (out / "scst_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 3, 6]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_scst_step"] == result["best_step"]
    recorded = json.loads((out / "train_config.json").read_text())
    assert recorded["scst"]["samples"] == 3 and recorded["n_embd"] == 64

    # The output is an `edgecap train` checkpoint: it exports and captions like one.
    manifest = export_checkpoint(out, tmp_path / "onnx")
    assert manifest.styles == {"describe": 1, "alt-text": 2}
    captions = Captioner(tmp_path / "onnx").caption(flickr_images[:2])
    assert len(captions) == 2 and all(isinstance(c.text, str) for c in captions)

    # Samples end at EOS (kept) and start after the style token.
    from edgecap.export.captioner_model import load_trained

    encoder, decoder, _ = load_trained(out)
    feats = torch.zeros(3, 49, 352, dtype=torch.float16)
    rows = sample_captions(encoder, decoder, feats, [1, 1, 2], max_new_tokens=5,
                           generator=torch.Generator().manual_seed(0))
    assert len(rows) == 3
    for row in rows:
        assert 1 <= len(row) <= 5 and 0 not in row[:-1]


def test_first_folder_only_counts_that_folders_training_images(tmp_path, mini_flickr):
    from edgecap.export.train import scst as scst
    from edgecap.export.train.config import TrainConfig

    run = TrainConfig([mini_flickr, mini_flickr], tmp_path, max_train_images=8)
    assert scst.trained_images(scst.ScstConfig("c", "o"), run, 16) == 16
    only_first = scst.ScstConfig("c", "o", first_folder_only=True)
    assert scst.trained_images(only_first, run, 16) == 8
    assert scst.trained_images(only_first, TrainConfig(mini_flickr, tmp_path), 12) == 12


def test_scst_refuses_a_folder_not_written_by_train(tmp_path):
    from edgecap.export.train.scst import ScstConfig, scst_train

    with pytest.raises(ValueError, match="train_config.json"):
        scst_train(ScstConfig(tmp_path, tmp_path / "out"))


def test_invented_person_is_a_person_word_no_reference_supports():
    from edgecap.export.train.scst import invented_person

    empty_room = ["a kitchen with a stove", "an empty kitchen"]
    assert invented_person("a man is cooking in a kitchen", empty_room)
    assert not invented_person("a kitchen with a white stove", empty_room)
    assert not invented_person("a man is cooking", ["a woman cooks dinner", "a kitchen"])
