"""Checkpoints of a training run: the exportable best model, and the resumable last.pt.

``save_model`` writes what ``edgecap export-trained`` reads (encoder.pt, encoder.json,
decoder/, id_map.json, tokenizer.json, preprocess.json). ``save_state``/``load_state`` keep the
whole run (weights, optimizer, random state, schedule position, history) so ``--resume``
continues where a killed run stopped, with the same batches in the same order.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig

from .config import TrainConfig, data_dirs
from .data import EOS_ID, HEAD_MODULES, PREPROCESS, STYLE_IDS

# Settings that may change when a run is resumed; every other one must match train_config.json.
# A new time budget re-spreads the rest of the lr schedule over it (progress is time / budget).
RESUMABLE_CHANGES = {"epochs", "max_steps", "patience", "threads", "log_every",
                     "checkpoint_every", "resume", "command_line", "cache_dir", "out_dir",
                     "time_budget_min"}


@dataclass
class RunState:
    """Where a run stands; saved in last.pt with the weights and the optimizer."""

    step: int = 0
    epoch: int = 1  # the epoch in progress
    batch_in_epoch: int = 0  # batches of `epoch` already trained
    order_state: torch.Tensor | None = None  # batch-order generator state at `epoch`'s start
    train_seconds: float = 0.0  # training wall-clock so far, over every resumed part
    best: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: str | None = None  # why a run ended before its epochs: early stop, out of budget
    epoch_losses: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def save_model(out_dir: Path, encoder, decoder, id_map, tokenizer) -> None:
    """The exportable checkpoint: what ``edgecap export-trained`` reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(encoder.state_dict(), out_dir / "encoder.pt")
    (out_dir / "encoder.json").write_text(json.dumps(encoder.spec()))
    start = STYLE_IDS["describe"]  # the export's decoder start: default captions describe
    decoder.generation_config = GenerationConfig(
        decoder_start_token_id=start, bos_token_id=start, eos_token_id=EOS_ID,
        pad_token_id=EOS_ID, num_beams=3, max_new_tokens=20, no_repeat_ngram_size=3,
    )
    decoder.save_pretrained(out_dir / "decoder")
    (out_dir / "id_map.json").write_text(json.dumps(id_map))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "preprocess.json").write_text(json.dumps(PREPROCESS, indent=2))


def head_state(encoder) -> dict:
    """The encoder's trainable parts: projection and the backbone's head (the frozen rest of
    the backbone comes from its pip package)."""
    tunable = tuple(f"backbone.{name}." for name in HEAD_MODULES)
    return {k: v for k, v in encoder.state_dict().items()
            if not k.startswith("backbone.") or k.startswith(tunable)}


def save_state(path: Path, state: RunState, encoder, decoder, opt, id_map: list[int]) -> None:
    """Everything ``--resume`` needs, written atomically (a kill leaves the previous one)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"state": asdict(state), "encoder_head": head_state(encoder),
                "decoder": decoder.state_dict(), "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state(), "id_map": id_map}, tmp)
    tmp.replace(path)


def load_state(path: Path, encoder, decoder, opt, id_map: list[int]) -> RunState:
    """Restore weights, optimizer and random state from last.pt; returns where the run stood."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["id_map"] != id_map:
        raise ValueError(f"{path}: the data now gives a different vocabulary; resume with the "
                         "same --data folders as the run that wrote it")
    # Only the head was saved: every key the load misses must be the frozen backbone's.
    keys = encoder.load_state_dict(saved["encoder_head"], strict=False)
    if keys.unexpected_keys or any(not k.startswith("backbone.") for k in keys.missing_keys):
        raise ValueError(f"{path}: encoder weights do not fit this encoder ({keys})")
    decoder.load_state_dict(saved["decoder"])
    opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    return RunState(**saved["state"])


MODULE_FILES = ("__main__.py", "loop.py")


def record_config(config: TrainConfig, out_dir: Path) -> None:
    """Write train_config.json; on resume, check the settings match the recorded ones."""
    recorded = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    # Resolved, so a resume from another working directory matches, and an export's provenance
    # (which cuts absolute paths to their last part) names each folder.
    recorded["data_dir"] = [str(d.expanduser().resolve()) for d in data_dirs(config)]
    argv = sys.argv
    # `python -m edgecap.export.train` puts the file's path in argv[0]: record the module instead.
    if argv and Path(argv[0]).parent.name == "train" and Path(argv[0]).name in MODULE_FILES:
        argv = ["-m", "edgecap.export.train"] + argv[1:]
    recorded["command_line"] = config.command_line or shlex.join([sys.executable] + argv)
    recorded["preprocess"] = PREPROCESS
    path = out_dir / "train_config.json"
    if config.resume and path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in recorded if k not in RESUMABLE_CHANGES
                         and k in before and before[k] != recorded[k])
        if changed:
            raise ValueError(f"--resume: {', '.join(changed)} differ from {path}; "
                             "resume with the options of the run that wrote it")
        return
    path.write_text(json.dumps(recorded, indent=2))
    (out_dir / "train_log.jsonl").write_text("")


