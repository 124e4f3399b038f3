"""Training recipe for the captioners: frozen EfficientNet-Lite + small GPT-2, on one or
several caption folders at once, each caption started by its style token (see ``train_data``).
Both model families (``--arch``: cross-attention, or a ClipCap-style prefix) train here; they
differ only in how ``decoder_inputs`` hands the image to the decoder.

Backbone features are computed once into an fp16 cache outside the repo, so each training step
runs only the projection head and the decoder. Every ``checkpoint_every`` steps and at each
epoch's end the run's whole state goes to ``<out>/last.pt``, so a killed run continues with
``--resume``. Run as ``edgecap train --data DIR [--data DIR ...] --out DIR`` or
``python -m edgecap.export.train`` with the same options.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..captioner_model import build_decoder, build_encoder
from ..datasets import load_source
# TrainConfig lives beside the CLI arguments, in a torch-free module; importable from here too.
from .config import (CROSS_ATTENTION, TrainConfig, add_train_arguments, config_from_args,
                           data_dirs)
from .data import (EOS_ID, HEAD_MODULES, SplitData, block_features, build_id_map,
                         build_split, build_tokenizer, cached_features, feature_cache_dir,
                         image_tokens, load_pixels, split_names, train_token_lists)
from .state import RunState, load_state, record_config, save_model, save_state

__all__ = ["TrainConfig", "train", "load_pixels", "main"]

TUNED_LR_SCALE = 0.1  # pretrained backbone weights move slower than the fresh head and decoder

# ---------------------------------------------------------------- model steps


def metric_form(text: str) -> str:
    """Form compared by the dev metric: lower-case words, no punctuation."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and a mask of which next-token targets are real."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
    lens = torch.tensor([len(s) for s in seqs])
    target_mask = torch.arange(width - 1)[None, :] < (lens[:, None] - 1)
    return ids, target_mask


def length_bucketed_batches(lengths: list[int], batch_size: int, gen: torch.Generator) -> list:
    """Shuffled batches of caption indices; each batch holds similar lengths (less padding)."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    pool = batch_size * 50
    batches = []
    for i in range(0, len(order), pool):
        chunk = sorted(order[i : i + pool], key=lambda j: lengths[j])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[p] for p in perm]


def decoder_inputs(decoder, image, ids: torch.Tensor, past=None) -> dict:
    """One decoder call's inputs: a cross-attention decoder sees the image tokens at every call;
    a prefix decoder sees the prefix once, as input embeddings before the first tokens (later
    calls find it in the cache)."""
    if decoder.config.add_cross_attention:
        return {"input_ids": ids, "encoder_hidden_states": image}
    if past is None:
        return {"inputs_embeds": torch.cat([image, decoder.transformer.wte(ids)], dim=1)}
    return {"input_ids": ids}


def caption_loss(encoder, decoder, feats, ids, target_mask, label_smoothing=0.0) -> torch.Tensor:
    """Teacher-forced cross-entropy. Right padding + causal attention: pads never reach real
    tokens, so no attention mask is needed; the LM head runs only on real positions."""
    enc = image_tokens(encoder, feats)
    hidden = decoder.transformer(**decoder_inputs(decoder, enc, ids)).last_hidden_state
    hidden = hidden[:, hidden.shape[1] - ids.shape[1] :]  # the caption's positions (not a prefix)
    logits = decoder.lm_head(hidden[:, :-1][target_mask]).float()
    return F.cross_entropy(logits, ids[:, 1:][target_mask], label_smoothing=label_smoothing)


@torch.no_grad()
def decode_rows(encoder, decoder, feats, start_ids: list[int], choose,
                max_new_tokens: int = 20) -> list[list[int]]:
    """KV-cached decoding from each image's start (style) token; ``choose(logits)`` picks each
    step's (rows, 1) tokens. Rows that ended keep getting EOS; returns every step's tokens."""
    enc = image_tokens(encoder, feats)
    tokens = torch.tensor(start_ids, dtype=torch.long)[:, None]
    done = torch.zeros(len(start_ids), dtype=torch.bool)
    past, out = None, []
    for _ in range(max_new_tokens):
        step = decoder(**decoder_inputs(decoder, enc, tokens, past), past_key_values=past,
                       use_cache=True)
        past = step.past_key_values
        tokens = choose(step.logits[:, -1])
        tokens[done] = EOS_ID  # finished rows keep feeding EOS
        done |= tokens[:, 0] == EOS_ID
        out.append(tokens[:, 0])
        if done.all():
            break
    return torch.stack(out, 1).tolist()


def greedy_decode(encoder, decoder, feats, start_ids: list[int],
                  max_new_tokens: int = 20) -> list:
    """Greedy decoding; returns pruned ids per image, without start/end tokens."""
    rows = decode_rows(encoder, decoder, feats, start_ids,
                       lambda logits: logits.argmax(-1, keepdim=True), max_new_tokens)
    return [r[: r.index(EOS_ID)] if EOS_ID in r else r for r in rows]


def cider_d(hypotheses: list[str], references: list[list[str]]) -> float:
    """CIDEr-D from pycocoevalcap on pre-normalized strings (no Java tokenizer needed)."""
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [metric_form(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [metric_form(h) or "a"] for i, h in enumerate(hypotheses)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def lr_at(step: int, base_lr: float, warmup: int, progress: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 as `progress` goes 0 -> 1."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_dropout(decoder, p: float) -> None:
    """One dropout rate for the decoder's embeddings, attention and residuals (config too, so
    a saved checkpoint records it)."""
    decoder.config.embd_pdrop = decoder.config.attn_pdrop = decoder.config.resid_pdrop = p
    for module in decoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


@torch.no_grad()
def evaluate(encoder, decoder, dev: SplitData, tokenizer, id_map: list[int]) -> dict:
    """Teacher-forced dev loss (no smoothing) and greedy CIDEr-D, each image decoded in its
    own style."""
    encoder.eval()
    decoder.eval()
    losses = []
    for k in range(0, len(dev.rows), 128):
        chunk = dev.rows[k : k + 128]
        ids, mask = pad_batch([s for _, s in chunk], EOS_ID)
        loss = caption_loss(encoder, decoder, dev.feats[[i for i, _ in chunk]], ids, mask)
        losses.append((loss.item(), len(chunk)))
    hyps = []
    for k in range(0, len(dev.refs), 125):
        for row in greedy_decode(encoder, decoder, dev.feats[k : k + 125],
                                 dev.start_ids[k : k + 125]):
            hyps.append(tokenizer.decode([id_map[t] for t in row]).strip())
    return {"dev_loss": sum(loss * n for loss, n in losses) / sum(n for _, n in losses),
            "dev_cider": cider_d(hyps, dev.refs), "images": len(hyps), "sample": hyps[:3]}


# ---------------------------------------------------------------- recipe


def prepare_data(config: TrainConfig, tokenizer, encoder):
    """Load every data folder; returns (train SplitData, [dev SplitData per scored folder],
    id_map, the scored folders' names)."""
    sources = [load_source(d) for d in data_dirs(config)]
    cache_root = Path(config.cache_dir).expanduser()
    train_names = [split_names(s, "train", config.max_train_images) for s in sources]
    dev_names = [split_names(s, "dev", config.dev_images) for s in sources]
    id_map = build_id_map(tokenizer, train_token_lists(sources, train_names, tokenizer))
    to_pruned = {g: p for p, g in enumerate(id_map)}

    blocks = config.tune_encoder_head  # cache what comes before the part that trains

    def split(source, names):
        cache = feature_cache_dir(cache_root, config.backbone, source.root, blocks)
        feats = cached_features(names, source.images_dir, cache, encoder,
                                featurize=block_features if blocks else None)
        return build_split(source, names, tokenizer, to_pruned, config.max_caption_tokens, feats)

    if not dev_names[0]:
        raise ValueError(f"{sources[0].root}: the first --data folder needs dev images "
                         "(they pick the best epoch)")
    train_data = merge_splits([split(s, n) for s, n in zip(sources, train_names)])
    # Folders without dev images are trained on but not scored.
    scored = [(s, n) for s, n in zip(sources, dev_names) if n]
    return train_data, [split(s, n) for s, n in scored], id_map, [s.name for s, _ in scored]


def merge_splits(parts: list[SplitData]) -> SplitData:
    """One split from several folders' (image indices shifted past the earlier folders)."""
    rows, refs, starts, offset = [], [], [], 0
    for part in parts:
        rows += [(i + offset, seq) for i, seq in part.rows]
        refs += part.refs
        starts += part.start_ids
        offset += len(part.refs)
    feats = torch.cat([p.feats for p in parts if len(p.refs)])
    return SplitData(feats, rows, refs, starts)


def make_optimizer(encoder, decoder, config: TrainConfig):
    """AdamW over the projection head, the decoder and (``tune_encoder_head``) the backbone's
    head; decay on matrices only. Pretrained weights move at TUNED_LR_SCALE of the lr."""
    encoder.backbone.requires_grad_(False)
    tuned = []
    if config.tune_encoder_head:
        for name in HEAD_MODULES:
            getattr(encoder.backbone, name).requires_grad_(True)
            tuned += list(getattr(encoder.backbone, name).parameters())
    fresh = [p for n, p in encoder.named_parameters() if not n.startswith("backbone.")]
    fresh += list(decoder.parameters())
    groups = [{"params": [p for p in fresh if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in fresh if p.dim() < 2], "weight_decay": 0.0}]
    if tuned:
        groups.append({"params": tuned, "weight_decay": 0.0, "lr_scale": TUNED_LR_SCALE})
    return torch.optim.AdamW(groups, lr=config.lr), fresh + tuned


def train(config: TrainConfig) -> dict:
    """Train the captioner; write the best-dev-CIDEr checkpoint, logs and last.pt into
    ``config.out_dir``. With ``config.resume`` continue from ``<out_dir>/last.pt``.

    Args:
        config: every setting of the run (see ``TrainConfig``); written to train_config.json.
    Returns:
        dict with best_dev_cider, best_epoch, step_losses (every step's train loss, over all
        resumed parts) and history (one record per epoch).
    """
    if config.tags and (config.arch != CROSS_ATTENTION or config.tune_encoder_head):
        raise ValueError("--tags needs --arch cross-attention and --no-tune-encoder-head (the "
                         "tags come from the frozen backbone's own classifier)")
    out_dir = Path(config.out_dir)
    bpe_dir = Path(config.bpe_dir) if config.bpe_dir else data_dirs(config)[0].parent / "gpt2-bpe"
    torch.set_num_threads(config.threads)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    record_config(config, out_dir)

    tokenizer = build_tokenizer(bpe_dir)
    encoder = build_encoder(encoder_spec(config), config.n_embd, dropout=config.dropout)
    t0 = time.time()
    train_data, devs, id_map, source_names = prepare_data(config, tokenizer, encoder)
    print(f"features ready in {time.time() - t0:.0f}s: train {tuple(train_data.feats.shape)}, "
          f"vocab {len(id_map)}, {len(train_data.rows)} train captions from "
          f"{', '.join(source_names)}", file=sys.stderr, flush=True)

    prefix_length = None if config.arch == CROSS_ATTENTION else config.prefix_length
    decoder = build_decoder(len(id_map), config.n_layer, config.n_embd, config.n_head, EOS_ID,
                            prefix_length)
    set_dropout(decoder, config.dropout)
    opt, params = make_optimizer(encoder, decoder, config)
    print(f"trainable parameters: {sum(p.numel() for p in params) / 1e6:.2f}M", file=sys.stderr)
    state = RunState()
    if config.resume and (out_dir / "last.pt").is_file():
        state = load_state(out_dir / "last.pt", encoder, decoder, opt, id_map)
        print(f"resumed at step {state.step} (epoch {state.epoch})", file=sys.stderr)
        if state.stopped == "early stop" and state.bad_epochs < config.patience:
            # A larger --patience on resume continues a run that stopped early.
            print(f"continuing an early-stopped run: patience now {config.patience}",
                  file=sys.stderr)
            state.stopped = None
    elif config.resume:  # killed before its first state (e.g. while extracting features)
        print(f"{out_dir / 'last.pt'} not written yet: training from step 0", file=sys.stderr)
    if state.stopped is None:
        run_epochs(config, state, encoder, decoder, opt, params, train_data, devs, source_names,
                   tokenizer, id_map)
    return {"best_dev_cider": state.best, "best_epoch": state.best_epoch,
            "step_losses": state.step_losses, "history": state.history}


def encoder_spec(config: TrainConfig) -> dict:
    """The ``encoder.json`` spec of the encoder this run trains (see ``build_encoder``)."""
    if config.arch == CROSS_ATTENTION:
        return {"backbone": config.backbone, **({"tags": config.tags} if config.tags else {})}
    return {"backbone": config.backbone, "arch": config.arch,
            "prefix_length": config.prefix_length, "mapper_layers": config.mapper_layers,
            "mapper_heads": config.n_head}


def total_steps(config: TrainConfig, n_rows: int) -> int:
    """Steps the lr schedule spans: every epoch, or ``max_steps`` when smaller."""
    total = config.epochs * math.ceil(n_rows / config.batch_size)
    return min(config.max_steps, total) if config.max_steps is not None else total


def run_epochs(config, state: RunState, encoder, decoder, opt, params, train_data: SplitData,
               devs: list[SplitData], source_names: list[str], tokenizer, id_map) -> None:
    """Epochs from ``state.epoch`` on: train, score every folder's dev split, keep the best
    checkpoint (by the first folder's dev CIDEr-D), save last.pt; stops early or on budget."""
    out_dir = Path(config.out_dir)
    total = total_steps(config, len(train_data.rows))
    lengths = [len(s) for _, s in train_data.rows]
    gen = torch.Generator().manual_seed(config.seed)
    bar = tqdm(total=total, initial=state.step, desc="train", file=sys.stderr, mininterval=10)
    while state.epoch <= config.epochs and state.step < total and state.stopped is None:
        if state.order_state is None:  # a new epoch: its batch order starts from here
            state.order_state = gen.get_state()
        gen.set_state(state.order_state)
        batches = length_bucketed_batches(lengths, config.batch_size, gen)
        out_of_time = train_batches(config, state, encoder, decoder, opt, params, train_data,
                                    batches, total, bar, id_map)
        scores = [evaluate(encoder, decoder, dev, tokenizer, id_map) for dev in devs]
        end_epoch(config, state, scores, source_names, out_dir, encoder, decoder, id_map,
                  tokenizer)
        if out_of_time and state.stopped is None:
            state.stopped = "out of budget"
        state.order_state = gen.get_state()  # the next epoch's order, as an unbroken run's
        save_state(out_dir / "last.pt", state, encoder, decoder, opt, id_map)
    bar.close()


def train_batches(config, state: RunState, encoder, decoder, opt, params, data: SplitData,
                  batches: list, total: int, bar, id_map) -> bool:
    """Train the epoch's batches from ``state.batch_in_epoch`` on; True when the time budget
    ran out (the run is over then: its lr schedule has decayed to 0)."""
    encoder.train()
    encoder.backbone.eval()  # its norms keep their ImageNet statistics, even where tuned
    decoder.train()
    budget_s = config.time_budget_min * 60 if config.time_budget_min else None
    started, seconds_before = time.time(), state.train_seconds
    for k in range(state.batch_in_epoch, len(batches)):
        # Progress runs on steps, or on wall-clock when a time budget is set and tighter
        # (the CPU is shared): the cosine then still ends at 0 when the budget does.
        progress = max(0.0, state.step - config.warmup_steps) / max(1, total - config.warmup_steps)
        state.train_seconds = seconds_before + time.time() - started
        if budget_s:
            progress = max(progress, state.train_seconds / budget_s)
        if state.step >= total:
            return False
        if progress >= 1.0:
            return True
        lr = lr_at(state.step, config.lr, config.warmup_steps, progress)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batch = batches[k]
        ids, mask = pad_batch([data.rows[j][1] for j in batch], EOS_ID)
        feats = data.feats[[data.rows[j][0] for j in batch]]
        # bf16 autocast: fp32 master weights, bf16 matmuls (avx512_bf16 CPUs run them ~2x).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = caption_loss(encoder, decoder, feats, ids, mask, config.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state.step, state.batch_in_epoch = state.step + 1, k + 1
        state.step_losses.append(loss.item())
        state.epoch_losses.append(loss.item())
        bar.update(1)
        if config.log_every and state.step % config.log_every == 0:
            recent = np.mean(state.step_losses[-config.log_every:])
            tqdm.write(f"step {state.step}/{total} loss {recent:.3f} lr {lr:.2e}", file=sys.stderr)
        if config.checkpoint_every and state.step % config.checkpoint_every == 0:
            state.train_seconds = seconds_before + time.time() - started
            save_state(Path(config.out_dir) / "last.pt", state, encoder, decoder, opt, id_map)
    state.train_seconds = seconds_before + time.time() - started
    return False


def end_epoch(config, state: RunState, scores: list[dict], source_names: list[str],
              out_dir: Path, encoder, decoder, id_map, tokenizer) -> None:
    """Log the epoch, keep the checkpoint if the first folder's dev CIDEr-D improved, decide
    on early stopping, and move the state to the next epoch."""
    main_score = scores[0]
    record = {"epoch": state.epoch, "step": state.step,
              "train_loss": float(np.mean(state.epoch_losses)) if state.epoch_losses else None,
              "dev_loss": main_score["dev_loss"], "dev_cider": main_score["dev_cider"],
              "dev_by_source": {name: {"dev_loss": s["dev_loss"], "dev_cider": s["dev_cider"]}
                                for name, s in zip(source_names, scores)},
              "train_seconds": round(state.train_seconds, 1), "sample": main_score["sample"]}
    state.history.append(record)
    with (out_dir / "train_log.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    by_source = " ".join(f"{n} {s['dev_cider']:.3f}" for n, s in zip(source_names, scores))
    tqdm.write(f"epoch {state.epoch}: train loss {record['train_loss']} dev loss "
               f"{record['dev_loss']:.3f} dev CIDEr-D {by_source} | {main_score['sample'][:1]}",
               file=sys.stderr)
    if main_score["dev_cider"] > state.best:
        state.best, state.best_epoch, state.bad_epochs = main_score["dev_cider"], state.epoch, 0
        save_model(out_dir, encoder, decoder, id_map, tokenizer)
        (out_dir / "metrics.json").write_text(json.dumps(
            {"best_dev_cider": state.best, "best_epoch": state.epoch,
             "dev_source": source_names[0], "dev_images": main_score["images"],
             "decoding": "greedy, max 20 tokens", "dev_loss": main_score["dev_loss"],
             "dev_by_source": record["dev_by_source"]}, indent=2))
    else:
        state.bad_epochs += 1
        if state.bad_epochs >= config.patience:
            tqdm.write(f"early stop: no dev CIDEr gain for {config.patience} epochs",
                       file=sys.stderr)
            state.stopped = "early stop"
    state.epoch, state.batch_in_epoch, state.epoch_losses = state.epoch + 1, 0, []


# ---------------------------------------------------------------- CLI


def run(config: TrainConfig) -> int:
    """Train, then print the best dev score as one JSON line (the CLI's output)."""
    result = train(config)
    print(json.dumps({k: result[k] for k in ("best_dev_cider", "best_epoch")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m edgecap.export.train``: the same options as ``edgecap train``."""
    parser = argparse.ArgumentParser(prog="edgecap-train", description=__doc__)
    add_train_arguments(parser)
    return run(config_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
