"""Self-critical sequence training (SCST): fine-tune a trained captioner on its CIDEr-D.

Cross-entropy teaches a model to predict the next reference word; SCST (Rennie et al. 2017)
then trains it on what the benchmark scores, its own sampled captions' CIDEr-D. For each
training image the model samples ``samples`` captions; each caption's reward is its CIDEr-D
against the image's references (idf over the whole training set), and its baseline is the
mean reward of the image's other samples (Luo 2020), so no greedy pass is needed. The loss
raises the log-probability of captions that beat their siblings and lowers the others.

It starts from an ``edgecap train`` checkpoint and reuses that run's data folders, feature
cache and vocabulary (read from its ``train_config.json``). The dev split is scored every
``eval_every`` steps; the best model (the starting one included) is written to the output
folder in ``edgecap train``'s format, so ``edgecap export-trained`` takes it as it is.
Run as ``edgecap train-scst CHECKPOINT --out DIR``.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from edgecap.grounding import names_label

from ..captioner_model import load_trained
from ..datasets import load_source
from .scst_config import ScstConfig
from .scst_reward import CorpusCider
from .config import TrainConfig, data_dirs
from .data import EOS_ID, SplitData, image_tokens, split_names
from .state import save_model
from .loop import (decode_rows, decoder_inputs, evaluate, metric_form, pad_batch,
                       prepare_data)

__all__ = ["ScstConfig", "scst_train", "sample_captions"]

# Appended to every reference and to each sample that ended: n-grams across the end let the
# reward tell a finished caption from one cut off mid-phrase ("a man in a blue shirt is on a"),
# which plain CIDEr-D scores alike and SCST would otherwise learn to write.
END_WORD = "endofcaption"


def run_config(checkpoint: Path) -> TrainConfig:
    """The ``TrainConfig`` of the run that wrote ``checkpoint`` (its data, cache, backbone)."""
    path = checkpoint / "train_config.json"
    if not path.is_file():
        raise ValueError(f"{checkpoint}: no train_config.json; SCST starts from a folder "
                         "written by `edgecap train`")
    recorded = json.loads(path.read_text())
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in recorded.items() if k in known})


def sample_captions(encoder, decoder, feats, start_ids: list[int], max_new_tokens: int,
                    generator: torch.Generator | None = None) -> list[list[int]]:
    """One caption sampled from the model's distribution per row (KV-cached); each holds its
    tokens after the start token, up to and with EOS when one was sampled."""

    def sample(logits):
        return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=generator)

    rows = decode_rows(encoder, decoder, feats, start_ids, sample, max_new_tokens)
    return [r[: r.index(EOS_ID) + 1] if EOS_ID in r else r for r in rows]


def sequence_log_probs(encoder, decoder, feats, sequences: list[list[int]]):
    """Sum of log-probabilities of each sequence's tokens after its first (teacher-forced,
    with gradients), and each sequence's count of such tokens."""
    ids, mask = pad_batch(sequences, EOS_ID)
    enc = image_tokens(encoder, feats)
    hidden = decoder.transformer(**decoder_inputs(decoder, enc, ids)).last_hidden_state
    hidden = hidden[:, hidden.shape[1] - ids.shape[1] :]
    log_probs = F.log_softmax(decoder.lm_head(hidden[:, :-1]).float(), dim=-1)
    picked = log_probs.gather(-1, ids[:, 1:, None])[..., 0] * mask
    return picked.sum(1), mask.sum(1)


def leave_one_out_advantage(rewards: torch.Tensor, samples: int) -> torch.Tensor:
    """Each reward minus the mean of its image's other samples (rows grouped by image)."""
    grouped = rewards.view(-1, samples)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (samples - 1)
    return (grouped - baseline).view(-1)


def scst_step(config: ScstConfig, encoder, decoder, opt, data: SplitData, images: list[int],
              cider: CorpusCider, tokenizer, id_map, generator) -> dict:
    """One SCST update on ``images``; returns the mean reward and loss."""
    k = config.samples
    feats = data.feats[images].repeat_interleave(k, 0)
    starts = [data.start_ids[i] for i in images for _ in range(k)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
        sampled = sample_captions(encoder, decoder, feats, starts, config.max_new_tokens,
                                  generator)
    texts = [metric_form(tokenizer.decode([id_map[t] for t in s if t != EOS_ID]))
             + (f" {END_WORD}" if s and s[-1] == EOS_ID else "") for s in sampled]
    owners = [i for i in images for _ in range(k)]
    rewards = torch.tensor([cider.score(t, i) - config.person_penalty * invented_person(t, data.refs[i])
                            for t, i in zip(texts, owners)])
    advantage = leave_one_out_advantage(rewards, k)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
        log_probs, counts = sequence_log_probs(
            encoder, decoder, feats, [[s] + body for s, body in zip(starts, sampled)])
    loss = -(advantage * log_probs).sum() / counts.sum().clamp(min=1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    return {"reward": rewards.mean().item(), "loss": loss.item()}


def invented_person(caption: str, references: list[str]) -> bool:
    """True when ``caption`` names a person and none of ``references`` does (CHAIR's kind of
    hallucination, for the person label the presence gate guards)."""
    return names_label(caption, "person") and not any(names_label(r, "person") for r in references)


def trainable(encoder, decoder) -> list:
    """What SCST moves: the decoder and the encoder's projection (the backbone stays)."""
    encoder.requires_grad_(False)
    params = [p for n, p in encoder.named_parameters() if not n.startswith("backbone.")]
    for p in params:
        p.requires_grad_(True)
    return params + list(decoder.parameters())


def scst_train(config: ScstConfig) -> dict:
    """Fine-tune ``config.checkpoint`` with SCST; write the best dev model to ``out_dir``.

    Returns:
        dict with start_dev_cider, best_dev_cider, best_step and history (one record per
        dev score).
    """
    checkpoint, out_dir = Path(config.checkpoint), Path(config.out_dir)
    train_config = run_config(checkpoint)
    torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    encoder, decoder, id_map = load_trained(checkpoint)
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    train_data, devs, data_id_map, source_names = prepare_data(train_config, tokenizer, encoder)
    if data_id_map != id_map:
        raise ValueError(f"{checkpoint}: its data folders now give a different vocabulary "
                         "than the one it was trained with")
    cider = CorpusCider([[f"{metric_form(r)} {END_WORD}" for r in refs]
                         for refs in train_data.refs])
    opt = torch.optim.AdamW(trainable(encoder, decoder), lr=config.lr, weight_decay=0.0)
    _write_run_config(checkpoint, out_dir, config)
    log = (out_dir / "scst_log.jsonl").open("w")
    generator = torch.Generator().manual_seed(config.seed)
    score = _DevScores(encoder, decoder, devs, tokenizer, id_map, source_names, log)
    best = start = score(0, {})
    best_step = 0
    save_best(out_dir, encoder, decoder, id_map, tokenizer, best, 0, source_names)
    budget_s = config.time_budget_min * 60 if config.time_budget_min else None
    order = np.random.default_rng(config.seed).permutation(
        trained_images(config, train_config, len(train_data.refs))).tolist()
    encoder.eval()  # no dropout: samples and gradients come from the same policy
    decoder.eval()
    started, rewards = time.time(), []
    for step in range(1, config.steps + 1):
        if budget_s and time.time() - started > budget_s:
            break
        at = (step - 1) * config.images_per_step
        images = [order[(at + j) % len(order)] for j in range(config.images_per_step)]
        result = scst_step(config, encoder, decoder, opt, train_data, images, cider, tokenizer,
                           id_map, generator)
        rewards.append(result["reward"])
        if config.log_every and step % config.log_every == 0:
            print(f"step {step}/{config.steps} reward {np.mean(rewards[-config.log_every:]):.3f} "
                  f"loss {result['loss']:.4f} {time.time() - started:.0f}s", file=sys.stderr,
                  flush=True)
        if step % config.eval_every == 0:
            dev = score(step, {"train_reward": float(np.mean(rewards[-config.eval_every:])),
                               "seconds": round(time.time() - started, 1)})
            if dev > best:
                best, best_step = dev, step
                save_best(out_dir, encoder, decoder, id_map, tokenizer, best, step, source_names)
    log.close()
    return {"start_dev_cider": start, "best_dev_cider": best, "best_step": best_step,
            "history": score.history}


def _write_run_config(checkpoint: Path, out_dir: Path, config: ScstConfig) -> None:
    """The run's training config with this fine-tuning's settings added, beside its model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    recorded = json.loads((checkpoint / "train_config.json").read_text())
    recorded["scst"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    (out_dir / "train_config.json").write_text(json.dumps(recorded, indent=2))


class _DevScores:
    """Scores the dev split of every data folder; each score is logged (to ``log`` as a JSON
    line, and to stderr) and kept in ``history``."""

    def __init__(self, encoder, decoder, devs, tokenizer, id_map, source_names, log):
        self.encoder, self.decoder, self.devs = encoder, decoder, devs
        self.tokenizer, self.id_map, self.source_names = tokenizer, id_map, source_names
        self.log = log
        self.history: list[dict] = []

    def __call__(self, step: int, extra: dict) -> float:
        """The first folder's dev CIDEr-D after ``step`` steps (``extra`` goes in the record)."""
        scores = [evaluate(self.encoder, self.decoder, dev, self.tokenizer, self.id_map)
                  for dev in self.devs]
        record = {"step": step, **extra, "dev_cider": scores[0]["dev_cider"],
                  "dev_by_source": {n: s["dev_cider"] for n, s in zip(self.source_names, scores)},
                  "sample": scores[0]["sample"]}
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        self.history.append(record)
        print(f"step {step}: dev CIDEr-D {record['dev_by_source']} | {record['sample'][:1]}",
              file=sys.stderr, flush=True)
        return record["dev_cider"]


def trained_images(config: ScstConfig, train_config: TrainConfig, total: int) -> int:
    """How many of the merged training images SCST samples: all, or the first folder's (which
    come first in the merged split)."""
    if not config.first_folder_only:
        return total
    first = load_source(data_dirs(train_config)[0], check_images=False)
    return len(split_names(first, "train", train_config.max_train_images))


def save_best(out_dir: Path, encoder, decoder, id_map, tokenizer, dev_cider: float, step: int,
              source_names: list[str]) -> None:
    """The exportable checkpoint and its metrics.json."""
    save_model(out_dir, encoder, decoder, id_map, tokenizer)
    (out_dir / "metrics.json").write_text(json.dumps(
        {"best_dev_cider": dev_cider, "best_scst_step": step, "dev_source": source_names[0],
         "decoding": "greedy, max 20 tokens", "objective": "SCST (CIDEr-D reward)"}, indent=2))


def run(config: ScstConfig) -> int:
    """Fine-tune, then print the start and best dev scores as one JSON line (the CLI's output)."""
    result = scst_train(config)
    print(json.dumps({k: result[k] for k in ("start_dev_cider", "best_dev_cider", "best_step")}))
    return 0
