"""`edgecap train` fills a TrainConfig whose defaults are the dataclass's own, and the training
recipe does not import the CLI module (no import cycle)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path

EXPORT = Path(__file__).resolve().parents[1] / "export"


def parse(argv: list[str]):
    from edgecap.export.train.config import add_train_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_command_line_defaults_are_the_dataclass_defaults():
    from edgecap.export.train.config import DEFAULT_CACHE_DIR, TrainConfig

    assert parse(["--data", "d", "--out", "o"]) == TrainConfig(["d"], "o")
    assert TrainConfig("d", "o").cache_dir == DEFAULT_CACHE_DIR


def test_data_is_repeatable_and_one_or_several_folders_work():
    from edgecap.export.train.config import TrainConfig, data_dirs

    config = parse(["--data", "flickr8k", "--data", "webcaps", "--out", "o"])
    assert config.data_dir == ["flickr8k", "webcaps"]
    assert data_dirs(config) == [Path("flickr8k"), Path("webcaps")]
    assert data_dirs(TrainConfig("flickr8k", "o")) == [Path("flickr8k")]


def test_every_option_reaches_its_field():
    config = parse(["--data", "d", "--out", "o", "--epochs", "3", "--batch-size", "16",
                    "--lr", "0.001", "--weight-decay", "0.1", "--warmup-steps", "7",
                    "--n-layer", "2", "--n-embd", "64", "--n-head", "4",
                    "--label-smoothing", "0.2", "--bf16", "--dev-images", "9", "--patience", "5",
                    "--max-train-images", "8", "--max-steps", "6", "--time-budget-min", "1.5",
                    "--seed", "3", "--threads", "1", "--cache-dir", "c", "--bpe-dir", "b",
                    "--backbone", "efficientnet-lite0", "--dropout", "0.3",
                    "--checkpoint-every", "11", "--resume", "--log-every", "4",
                    "--no-tune-encoder-head", "--arch", "prefix", "--prefix-length", "4",
                    "--mapper-layers", "3"])
    expected = dict(data_dir=["d"], out_dir="o", epochs=3, batch_size=16, lr=0.001,
                    weight_decay=0.1, warmup_steps=7, n_layer=2, n_embd=64, n_head=4,
                    label_smoothing=0.2, bf16=True, dev_images=9, patience=5,
                    max_train_images=8, max_steps=6, time_budget_min=1.5, seed=3, threads=1,
                    cache_dir="c", bpe_dir="b", backbone="efficientnet-lite0", dropout=0.3,
                    checkpoint_every=11, resume=True, log_every=4,
                    tune_encoder_head=False, arch="prefix", prefix_length=4, mapper_layers=3)
    assert {k: v for k, v in dataclasses.asdict(config).items() if k in expected} == expected


def test_training_does_not_import_the_cli_module():
    for name in ("train/loop.py", "train/config.py", "train/data.py", "train/state.py",
                 "datasets.py"):
        tree = ast.parse((EXPORT / name).read_text())
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}
        assert not {m for m in imported if m.split(".")[-1] == "commands"}, name


def test_prefix_sizes_below_one_are_usage_errors(capsys):
    import pytest

    for option in ("--prefix-length", "--mapper-layers"):
        with pytest.raises(SystemExit) as exit_info:
            parse(["--data", "d", "--out", "o", option, "0"])
        assert exit_info.value.code == 2
        assert f"{option}: 0 is not at least 1" in capsys.readouterr().err
