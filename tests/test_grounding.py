"""Grounded decoding on real photos: presence heads and ImageNet tags in the encoder graph, the
person gate as a logits processor (per image, so batch-invariant), and tags in every record."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from edgecap.grounding import PRESENCE_WORDS, PresenceGate, caption_words, names_label

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")

PERSON = set(PRESENCE_WORDS["person"])


def test_label_words_match_whole_words_only():
    assert names_label("a man's hat on a table", "person")
    assert names_label("Two WOMEN talk", "person")
    assert not names_label("a manhole cover in the street", "person")
    assert not names_label("a couple of dogs play", "person")
    assert names_label("a couple of dogs play", "dog")
    assert caption_words("a man's hat") == {"a", "man", "s", "hat"}


def test_gate_bans_single_tokens_always_and_multi_token_words_at_their_end():
    gate = PresenceGate("person", 0, 0.5, ((7,), (3, 4, 5)))
    assert gate.banned([1, 2]) == [7]
    assert sorted(gate.banned([1, 3, 4])) == [5, 7]
    assert gate.banned([1, 3]) == [7]  # "3 4" may still become another word


@pytest.fixture(scope="module")
def grounded_run(tmp_path_factory, mini_flickr) -> Path:
    """A tiny captioner trained with tag tokens on the frozen backbone, with fitted heads."""
    from edgecap.export.train.presence import train_presence
    from edgecap.export.train.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("grounded") / "run"
    train(TrainConfig(mini_flickr, out, epochs=40, batch_size=12, lr=3e-3, warmup_steps=2,
                      n_layer=2, n_embd=64, n_head=4, dev_images=4, patience=100, threads=2,
                      max_steps=120, cache_dir=out.parent / "cache", log_every=0,
                      tune_encoder_head=False, tags=3, dropout=0.0, label_smoothing=0.0,
                      command_line="pytest"))
    record = train_presence(out)
    assert record["labels"] == list(PRESENCE_WORDS)
    assert set(record["thresholds"]) == set(PRESENCE_WORDS)
    assert record["splits"]["flickr8k/train"]["person"]["positives"] > 0
    return out


def pooled(run: Path, photo: Path) -> np.ndarray:
    from edgecap.export.captioner_model import load_trained
    from edgecap.export.train.data import load_pixels

    encoder, _, _ = load_trained(run)
    with torch.no_grad():
        feats = encoder.backbone_features(torch.from_numpy(load_pixels(photo))[None])
    return feats.mean(dim=1)[0].numpy()


@pytest.fixture(scope="module")
def gated_export(grounded_run, sample_photos, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The run exported with a person head that says yes to camera.jpg and no to its mirror
    image (both captioned with a man by the ungated model): (export, yes photo, no photo)."""
    from edgecap.cli.main import main

    photos = {p.stem: p for p in sample_photos(22)}
    yes, no = photos["camera"], photos["camera-v1"]
    f_yes, f_no = pooled(grounded_run, yes), pooled(grounded_run, no)
    direction = (f_yes - f_no) / float(np.dot(f_yes - f_no, f_yes - f_no))
    record = json.loads((grounded_run / "presence.json").read_text())
    state = torch.load(grounded_run / "presence.pt", weights_only=True)
    person = record["labels"].index("person")
    # logit = 20 (x - midpoint) . direction: +10 for the yes photo, -10 for the no photo.
    state["linear.weight"][person] = torch.from_numpy(20 * direction)
    state["linear.bias"][person] = float(-20 * np.dot(direction, (f_yes + f_no) / 2))
    record["thresholds"]["person"] = 0.5
    run = tmp_path_factory.mktemp("gated") / "run"
    import shutil

    shutil.copytree(grounded_run, run)
    torch.save(state, run / "presence.pt")
    (run / "presence.json").write_text(json.dumps(record))
    out = run.parent / "export"
    assert main(["export-trained", str(run), str(out)]) == 0
    return out, yes, no


def person_named(text: str) -> bool:
    return not caption_words(text).isdisjoint(PERSON)


def test_grounded_export_writes_tags_and_keeps_generate_parity(gated_export, grounded_run):
    from edgecap import Captioner
    from edgecap.export.captioner_model import load_trained
    from edgecap.preprocess import load_image, preprocess_batch

    out, yes, no = gated_export
    captioner = Captioner(out)
    manifest = captioner.manifest
    assert manifest.grounding["gates"] == ["person"]
    assert manifest.encoder_seq_len == 49 + 3  # grid tokens, then the tag tokens
    result = captioner.caption(yes, presence_gate=False)
    record = result.to_record()
    labels = [t["label"] for t in record["tags"]]
    assert labels[: len(PRESENCE_WORDS)] == list(PRESENCE_WORDS)
    assert "tripod" in labels  # the backbone's own ImageNet verdict on the camera photo
    assert result.tag_score("person") > 0.99
    assert captioner.caption(no).tag_score("person") < 0.01

    # Ungated, the runtime's tokens equal transformers generate() over the same tokens.
    encoder, decoder, id_map = load_trained(out.parent / "run", with_presence=True)
    pixels = torch.from_numpy(preprocess_batch([load_image(p) for p in (yes, no)],
                                               manifest.preprocessing))
    with torch.no_grad():
        states = encoder(pixels)
        start = torch.full((2, 1), manifest.decoder_start_token_id)
        expected = decoder.generate(start, encoder_hidden_states=states, max_new_tokens=12,
                                    attention_mask=torch.ones_like(start), num_beams=3)
    got = captioner.caption([yes, no], max_new_tokens=12, num_beams=3, presence_gate=False)
    eos = manifest.eos_token_id
    for row, result in zip(expected.tolist(), got):
        row = [t for t in row[1:] if t != eos]
        assert result.token_ids == [id_map[t] for t in row]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_presence_gate_removes_person_words_only_where_the_head_says_no(
        gated_export, sample_photos, num_beams):
    from edgecap import Captioner

    out, yes, no = gated_export
    captioner = Captioner(out)
    ungated = {p: captioner.caption(p, num_beams=num_beams, presence_gate=False).text
               for p in (yes, no)}
    assert person_named(ungated[yes]) and person_named(ungated[no]), ungated
    alone = {p: captioner.caption(p, num_beams=num_beams).text for p in (yes, no)}
    assert alone[yes] == ungated[yes]  # the head says yes: nothing changes
    assert not person_named(alone[no]), alone[no]  # the head says no: no person word left
    # In shuffled batches with other photos, every caption is the one it gets alone.
    others = sample_photos(8)
    rng = random.Random(0)
    for _ in range(3):
        batch = [yes, no] + others
        rng.shuffle(batch)
        results = captioner.caption(batch, num_beams=num_beams, batch_size=5)
        texts = {p: r.text for p, r in zip(batch, results)}
        assert texts[yes] == alone[yes] and texts[no] == alone[no]


def test_ungrounded_models_write_empty_tags(tiny_export, photos):
    from edgecap import Captioner

    captioner = Captioner(tiny_export)
    assert captioner.grounding is None
    assert captioner.caption(photos[0]).to_record()["tags"] == []


def test_person_rules_do_not_fire_on_the_scene_the_head_calls_empty(gated_export, tmp_path):
    from edgecap import Captioner
    from edgecap.alerts.targets import CommandTarget
    from edgecap.alerts.rules import AlertRule, Alerts
    from edgecap.watch.config import load_config

    out, yes, no = gated_export
    captioner = Captioner(out)
    config = tmp_path / "cameras.toml"
    config.write_text('[[camera]]\nname = "door"\nsource = "door.mp4"\n\n'
                      '[[alert]]\nname = "words"\nmatch = "person OR man OR woman"\n'
                      'command = ["true"]\n\n'
                      '[[alert]]\nname = "sure person"\nmin_score = { person = 0.8 }\n'
                      'command = ["true"]\n')
    rules = load_config(config).alerts
    assert rules[1].min_score == (("person", 0.8),)
    with Alerts(rules) as alerts:
        for when, photo, expected in (("2026-12-06T10:00:00Z", no, []),
                                      ("2026-12-06T11:00:00Z", yes, ["words", "sure person"])):
            record = {**captioner.caption(photo).to_record(), "camera": "door",
                      "wall_time": when}
            assert alerts.offer(record) == expected, record["generated_text"]
    # A record without tags (an ungrounded model) never meets a min_score rule.
    rule = AlertRule(min_score=(("person", 0.5),), targets=(CommandTarget(("true",)),))
    assert not rule.scores_met({"generated_text": "a man", "tags": []})
    assert rule.name == "person>=0.5"
    shouting = AlertRule(min_score=(("PERSON", 0.5),), targets=(CommandTarget(("true",)),))
    assert shouting.scores_met({"tags": [{"label": "person", "score": 0.9}]})


@pytest.mark.parametrize("text, problem", [
    ("min_score = { person = 1.5 }", "min_score.person: must be >= 0 and <= 1"),
    ("min_score = {}", "empty"),
    ("min_score = { person = \"high\" }", "expected a number"),
    ("", "set match, regex or min_score"),
])
def test_min_score_config_errors_name_the_key(tmp_path, text, problem):
    from edgecap.watch.config import ConfigError, load_config

    config = tmp_path / "cameras.toml"
    config.write_text(f'[[camera]]\nname = "door"\nsource = "door.mp4"\n\n[[alert]]\n{text}\n'
                      'command = ["true"]\n')
    with pytest.raises(ConfigError, match=problem):
        load_config(config)


def test_front_ends_write_the_same_tags_and_honour_the_gate_option(gated_export, capsys):
    """The CLI's JSON and the HTTP service carry the Python API's tags and gated captions."""
    pytest.importorskip("uvicorn")
    from test_server import Server, request

    from edgecap import Captioner
    from edgecap.cli.main import main

    out, yes, no = gated_export
    api = Captioner(out)
    gated, ungated = api.caption(no).to_record(), api.caption(no, presence_gate=False).to_record()
    bound = Captioner(out, io_binding="on").caption(no).to_record()  # the device runner's path
    assert bound["tags"] == gated["tags"] and bound["generated_text"] == gated["generated_text"]
    assert main(["caption", str(no), "--model", str(out), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli["tags"] == gated["tags"] and cli["generated_text"] == gated["generated_text"]
    server = Server(out)
    try:
        status, body, _ = request(server.url + "/v1/captions", no.read_bytes())
        assert status == 200, body
        assert body["tags"] == gated["tags"] and body["generated_text"] == gated["generated_text"]
        status, body, _ = request(server.url + "/v1/captions?presence_gate=false", no.read_bytes())
        assert status == 200 and body["generated_text"] == ungated["generated_text"]
        status, body, _ = request(server.url + "/v1/captions?presence_gate=maybe", no.read_bytes())
        assert status == 400 and "presence_gate" in json.dumps(body)
    finally:
        assert server.stop() == 0


def test_scst_on_a_grounded_run_keeps_heads_out_of_its_weights_and_exports(grounded_run,
                                                                          tmp_path):
    """SCST (with the person penalty) starts from a run that has presence heads; its output
    loads, takes its own heads from train-presence, and exports grounded."""
    from edgecap import Captioner
    from edgecap.export.train.presence import train_presence
    from edgecap.export.train.scst import ScstConfig, scst_train
    from edgecap.export.train.trained_export import export_checkpoint

    out = tmp_path / "scst"
    scst_train(ScstConfig(grounded_run, out, steps=2, lr=1e-4, samples=2, images_per_step=2,
                          eval_every=2, log_every=0, person_penalty=0.5))
    state = torch.load(out / "encoder.pt", weights_only=True)
    assert not any(key.startswith("presence.") for key in state)
    train_presence(out)
    export_checkpoint(out, tmp_path / "export")
    captioner = Captioner(tmp_path / "export")
    assert captioner.grounding is not None and captioner.grounding.gates
