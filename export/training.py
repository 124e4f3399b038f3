"""Training recipe for the default captioner on Flickr8k (frozen EfficientNet-Lite0 + small GPT-2).

Backbone features are computed once into an fp16 cache outside the repo, so each training step
runs only the projection head and the decoder. Run as
`python -m edgecap.export.training --data ../shared/data/flickr8k --out DIR` or `edgecap train`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm
from transformers import GenerationConfig

from .captioner_model import GPT2_EOS_ID, FeatureEncoder, build_decoder
# TrainConfig lives beside the CLI arguments, in a torch-free module; importable from here too.
from .train_config import TrainConfig, add_train_arguments, config_from_args
IMAGE_SIZE = (224, 224)
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0  # in 0..255 units, as the backbone was trained
PREPROCESS = {
    "size": list(IMAGE_SIZE),
    "resample": "bilinear",
    "rescale_factor": 1.0,
    "mean": [PIXEL_MEAN] * 3,
    "std": [PIXEL_STD] * 3,
}


# ---------------------------------------------------------------- data


def normalize_caption(text: str) -> str:
    """Training target form: lower-case, no trailing ' .'."""
    text = " ".join(text.lower().split())
    return re.sub(r"\s*\.$", "", text).strip()


def metric_form(text: str) -> str:
    """Form compared by the dev metric: lower-case words, no punctuation."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def load_captions(data_dir: Path) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    for line in (data_dir / "captions.txt").read_text().splitlines():
        if "\t" not in line:
            continue
        key, text = line.split("\t", 1)
        captions.setdefault(key.split("#")[0], []).append(text.strip())
    return captions


def read_split(data_dir: Path, name: str) -> list[str]:
    return [s.strip() for s in (data_dir / f"split_{name}.txt").read_text().splitlines() if s.strip()]


def build_tokenizer(bpe_dir: Path) -> Tokenizer:
    """The stock GPT-2 byte-level BPE tokenizer from encoder.json + vocab.bpe."""
    tok = Tokenizer(models.BPE.from_file(str(bpe_dir / "encoder.json"), str(bpe_dir / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def load_pixels(path: Path) -> np.ndarray:
    """PIL RGB -> 224x224 bilinear -> (x - 127) / 128, CHW float32."""
    img = Image.open(path).convert("RGB")
    if img.size != IMAGE_SIZE:
        img = img.resize(IMAGE_SIZE, Image.BILINEAR)
    x = (np.asarray(img, dtype=np.float32) - PIXEL_MEAN) / PIXEL_STD
    return x.transpose(2, 0, 1)


def cached_features(
    names: list[str], images_dir: Path, cache_dir: Path, encoder: FeatureEncoder, batch: int = 32
) -> torch.Tensor:
    """(N, 49, 1280) fp16 backbone tokens, one `<image>.npy` per image in `cache_dir`."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    missing = [n for n in dict.fromkeys(names) if not (cache_dir / f"{n}.npy").exists()]
    if missing:
        encoder.eval()
        bar = tqdm(total=len(missing), desc="features", file=sys.stderr, mininterval=10)
        for i in range(0, len(missing), batch):
            chunk = missing[i : i + batch]
            pixels = torch.from_numpy(np.stack([load_pixels(images_dir / n) for n in chunk]))
            with torch.inference_mode():
                feats = encoder.backbone_features(pixels).to(torch.float16).numpy()
            for n, f in zip(chunk, feats):
                tmp = cache_dir / f"{n}.tmp.npy"  # atomic write: a killed run leaves no half file
                np.save(tmp, f)
                tmp.replace(cache_dir / f"{n}.npy")
            bar.update(len(chunk))
        bar.close()
    return torch.from_numpy(np.stack([np.load(cache_dir / f"{n}.npy") for n in names]))


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


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and a mask of which next-token targets are real."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
    lens = torch.tensor([len(s) for s in seqs])
    target_mask = torch.arange(width - 1)[None, :] < (lens[:, None] - 1)
    return ids, target_mask


# ---------------------------------------------------------------- model steps


def caption_loss(encoder, decoder, feats, ids, target_mask, label_smoothing=0.0) -> torch.Tensor:
    """Teacher-forced cross-entropy. Right padding + causal attention: pads never reach real
    tokens, so no attention mask is needed; the LM head runs only on real positions."""
    enc = encoder.project(feats.float())
    hidden = decoder.transformer(input_ids=ids, encoder_hidden_states=enc).last_hidden_state
    logits = decoder.lm_head(hidden[:, :-1][target_mask]).float()
    return F.cross_entropy(logits, ids[:, 1:][target_mask], label_smoothing=label_smoothing)


@torch.no_grad()
def greedy_decode(encoder, decoder, feats, bos_eos_id: int, max_new_tokens: int = 20) -> list:
    """KV-cached greedy decoding; returns pruned ids per image, without start/end tokens."""
    enc = encoder.project(feats.float())
    batch = enc.shape[0]
    tokens = torch.full((batch, 1), bos_eos_id, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    past, out = None, []
    for _ in range(max_new_tokens):
        step = decoder(input_ids=tokens, past_key_values=past, encoder_hidden_states=enc, use_cache=True)
        past = step.past_key_values
        tokens = step.logits[:, -1].argmax(-1, keepdim=True)
        tokens[done] = bos_eos_id  # finished rows keep feeding EOS
        done |= tokens[:, 0] == bos_eos_id
        out.append(tokens[:, 0])
        if done.all():
            break
    rows = torch.stack(out, 1).tolist()
    return [r[: r.index(bos_eos_id)] if bos_eos_id in r else r for r in rows]


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


def save_model(out_dir, encoder, decoder, id_map, tokenizer, bos_eos_id: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(encoder.state_dict(), out_dir / "encoder.pt")
    decoder.generation_config = GenerationConfig(
        decoder_start_token_id=bos_eos_id,
        bos_token_id=bos_eos_id,
        eos_token_id=bos_eos_id,
        pad_token_id=bos_eos_id,
        num_beams=3,
        max_new_tokens=20,
        no_repeat_ngram_size=3,
    )
    decoder.save_pretrained(out_dir / "decoder")
    (out_dir / "id_map.json").write_text(json.dumps(id_map))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "preprocess.json").write_text(json.dumps(PREPROCESS, indent=2))


# ---------------------------------------------------------------- recipe


def train(config: TrainConfig) -> dict:
    """Train the captioner; write the best-dev-CIDEr checkpoint and logs into ``config.out_dir``.

    Args:
        config: every setting of the run (see ``TrainConfig``); written to train_config.json.
    Returns:
        dict with best_dev_cider, best_epoch, step_losses (every step's train loss) and history.
    """
    recorded = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    data_dir, out_dir = Path(config.data_dir), Path(config.out_dir)
    cache_dir = Path(config.cache_dir).expanduser()
    bpe_dir = Path(config.bpe_dir) if config.bpe_dir else data_dir.parent / "gpt2-bpe"
    torch.set_num_threads(config.threads)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = sys.argv
    if argv and argv[0].endswith("training.py"):  # `python -m` puts the file path in argv[0]
        argv = ["-m", "edgecap.export.training"] + argv[1:]
    recorded["command_line"] = config.command_line or shlex.join([sys.executable] + argv)
    recorded["preprocess"] = PREPROCESS
    (out_dir / "train_config.json").write_text(json.dumps(recorded, indent=2))
    log_path = out_dir / "train_log.jsonl"
    log_path.write_text("")

    # Captions -> GPT-2 BPE (leading space), vocabulary pruned to the training captions.
    tokenizer = build_tokenizer(bpe_dir)
    captions = load_captions(data_dir)
    train_names = read_split(data_dir, "train")[:config.max_train_images]
    dev_names = read_split(data_dir, "dev")[:config.dev_images]
    gpt2_ids = {n: [tokenizer.encode(" " + normalize_caption(c)).ids for c in captions[n]]
                for n in train_names + dev_names}
    used = sorted({t for n in train_names for ids in gpt2_ids[n] for t in ids} - {GPT2_EOS_ID})
    id_map = [GPT2_EOS_ID] + used  # pruned id 0 is EOS, the start/end/pad token
    to_pruned = {g: p for p, g in enumerate(id_map)}
    eos = 0

    def sequences(names):
        rows = []  # (image index, [EOS] + caption + [EOS]); tokens unseen in training dropped
        for i, n in enumerate(names):
            for ids in gpt2_ids[n]:
                body = [to_pruned[t] for t in ids if t in to_pruned][:config.max_caption_tokens]
                rows.append((i, [eos] + body + [eos]))
        return rows

    train_rows, dev_rows = sequences(train_names), sequences(dev_names)
    dev_refs = [captions[n] for n in dev_names]

    encoder = FeatureEncoder(config.n_embd, pretrained_backbone=True)
    encoder.backbone.requires_grad_(False)
    t0 = time.time()
    train_feats = cached_features(train_names, data_dir / "images", cache_dir, encoder)
    dev_feats = cached_features(dev_names, data_dir / "images", cache_dir, encoder)
    print(f"features ready in {time.time() - t0:.0f}s: train {tuple(train_feats.shape)}, "
          f"vocab {len(id_map)}, {len(train_rows)} train captions", file=sys.stderr, flush=True)

    decoder = build_decoder(len(id_map), config.n_layer, config.n_embd, config.n_head, eos)
    head = [p for n, p in encoder.named_parameters() if not n.startswith("backbone.")]
    params = head + list(decoder.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    print(f"trainable parameters: {sum(p.numel() for p in params) / 1e6:.2f}M", file=sys.stderr)

    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    total = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total = min(config.max_steps, total)
    gen = torch.Generator().manual_seed(config.seed)
    lengths = [len(s) for _, s in train_rows]
    step, best, best_epoch, bad_epochs = 0, -1.0, 0, 0
    step_losses, history = [], []
    bar = tqdm(total=total, desc="train", file=sys.stderr, mininterval=10)
    t_train = time.time()
    budget_s = config.time_budget_min * 60 if config.time_budget_min else None
    out_of_time = False
    for epoch in range(1, config.epochs + 1):
        encoder.train()
        decoder.train()
        epoch_losses = []
        for batch in length_bucketed_batches(lengths, config.batch_size, gen):
            # Progress runs on steps, or on wall-clock when a time budget is set and tighter
            # (the CPU is shared): the cosine then still ends at 0 when the budget does.
            progress = max(0.0, step - config.warmup_steps) / max(1, total - config.warmup_steps)
            if budget_s:
                progress = max(progress, (time.time() - t_train) / budget_s)
            if step >= total or progress >= 1.0:
                out_of_time = True
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step, config.lr, config.warmup_steps, progress)
            ids, mask = pad_batch([train_rows[j][1] for j in batch], eos)
            feats = train_feats[[train_rows[j][0] for j in batch]]
            # bf16 autocast: fp32 master weights, bf16 matmuls (avx512_bf16 CPUs run them ~2x).
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                loss = caption_loss(encoder, decoder, feats, ids, mask, config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            step_losses.append(loss.item())
            epoch_losses.append(loss.item())
            bar.update(1)
            if config.log_every and step % config.log_every == 0:
                recent = np.mean(step_losses[-config.log_every:])
                rate = (time.time() - t_train) / step
                tqdm.write(f"step {step}/{total} loss {recent:.3f} lr {g['lr']:.2e} "
                           f"{rate:.2f}s/step", file=sys.stderr)

        # Dev: teacher-forced loss and greedy-decoded CIDEr-D on `dev_images` images.
        encoder.eval()
        decoder.eval()
        with torch.no_grad():
            dev_losses = []
            for k in range(0, len(dev_rows), 128):
                chunk = dev_rows[k : k + 128]
                ids, mask = pad_batch([s for _, s in chunk], eos)
                feats = dev_feats[[i for i, _ in chunk]]
                dev_losses.append((caption_loss(encoder, decoder, feats, ids, mask).item(), len(chunk)))
            dev_loss = sum(l * n for l, n in dev_losses) / sum(n for _, n in dev_losses)
            hyps = []
            for k in range(0, len(dev_names), 125):
                for row in greedy_decode(encoder, decoder, dev_feats[k : k + 125], eos):
                    hyps.append(tokenizer.decode([id_map[t] for t in row]).strip())
        dev_cider = cider_d(hyps, dev_refs)
        record = {"epoch": epoch, "step": step, "train_loss": float(np.mean(epoch_losses)),
                  "dev_loss": dev_loss, "dev_cider": dev_cider,
                  "elapsed_s": round(time.time() - t0, 1), "sample": hyps[:3]}
        history.append(record)
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(f"epoch {epoch}: train loss {record['train_loss']:.3f} dev loss {dev_loss:.3f} "
                   f"dev CIDEr-D {dev_cider:.3f} | {hyps[0]!r}", file=sys.stderr)
        if dev_cider > best:
            best, best_epoch, bad_epochs = dev_cider, epoch, 0
            save_model(out_dir, encoder, decoder, id_map, tokenizer, eos)
            (out_dir / "metrics.json").write_text(json.dumps(
                {"best_dev_cider": best, "best_epoch": epoch, "dev_images": len(dev_names),
                 "decoding": "greedy, max 20 tokens", "dev_loss": dev_loss}, indent=2))
        else:
            bad_epochs += 1
            if bad_epochs >= config.patience:
                tqdm.write(f"early stop: no dev CIDEr gain for {config.patience} epochs",
                           file=sys.stderr)
                break
        if out_of_time or step >= total:
            break
    bar.close()
    return {"best_dev_cider": best, "best_epoch": best_epoch, "step_losses": step_losses,
            "history": history}


# ---------------------------------------------------------------- CLI


def run(config: TrainConfig) -> int:
    """Train, then print the best dev score as one JSON line (the CLI's output)."""
    result = train(config)
    print(json.dumps({k: result[k] for k in ("best_dev_cider", "best_epoch")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m edgecap.export.training``: the same options as ``edgecap train``."""
    parser = argparse.ArgumentParser(prog="edgecap-train", description=__doc__)
    add_train_arguments(parser)
    return run(config_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
