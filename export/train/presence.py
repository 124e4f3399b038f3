"""Presence heads: is there a person (a dog, a cat, a vehicle, a bicycle) in the picture?

``edgecap train-presence RUN`` fits one linear head per label on the frozen backbone's pooled
features that ``edgecap train`` cached for RUN, with weak labels from the reference captions (a
reference that uses one of the label's words, ``edgecap.grounding.PRESENCE_WORDS``, marks the
image), class-balanced logistic regression, and a threshold per label picked on the dev splits
for a recall target. It writes ``presence.pt`` and ``presence.json`` into RUN; ``export-trained``
then adds the heads, the gate and the backbone's ImageNet tags to the encoder graph.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from edgecap.grounding import names_label
from torch import nn

from ..datasets import load_source
from .presence_config import DESCRIPTION, TARGET_RECALL, add_presence_arguments
from ..presence_heads import GATED, LABELS, PresenceHeads
from .config import DEFAULT_CACHE_DIR
from .data import feature_cache_dir

MIN_DEV_POSITIVES = 30  # fewer positives on a dev split say nothing about its recall


# ---------------------------------------------------------------- data


def pooled_split(source, split: str, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1280) pooled cached features and (N, labels) 0/1 labels of one split of a folder."""
    names = [n for n in source.splits.get(split, []) if (cache / f"{n}.npy").exists()]
    missing = len(source.splits.get(split, [])) - len(names)
    if missing:
        print(f"{source.name} {split}: {missing} images without cached features skipped",
              file=sys.stderr)
    feats = np.stack([np.load(cache / f"{n}.npy").astype(np.float32).mean(axis=0) for n in names]) \
        if names else np.zeros((0, 1280), np.float32)
    labels = np.array([[any(names_label(c.text, label) for c in source.captions[n])
                        for label in LABELS] for n in names], np.float32).reshape(-1, len(LABELS))
    return feats, labels


def run_sources(run_dir: Path) -> tuple[list, Path, str]:
    """The data folders, feature cache and backbone an ``edgecap train`` run used."""
    config = json.loads((run_dir / "train_config.json").read_text())
    if config.get("tune_encoder_head", True):
        raise ValueError(f"{run_dir}: presence heads need a run trained with "
                         "--no-tune-encoder-head (they read the frozen backbone's features)")
    data = config["data_dir"] if isinstance(config["data_dir"], list) else [config["data_dir"]]
    cache = Path(config.get("cache_dir") or DEFAULT_CACHE_DIR).expanduser()
    return [load_source(Path(d)) for d in data], cache, config["backbone"]


# ---------------------------------------------------------------- fitting


def fit_heads(feats: np.ndarray, labels: np.ndarray, l2: float = 1e-3,
              steps: int = 200) -> PresenceHeads:
    """Class-balanced logistic regression per label (L-BFGS on standardised features); the
    standardisation is folded into the returned heads' weights."""
    x = torch.from_numpy(feats)
    y = torch.from_numpy(labels)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    positives = y.sum(0).clamp_min(1.0)
    pos_weight = (len(y) - positives) / positives  # each class weighs as much as its opposite
    heads = PresenceHeads(LABELS, feats.shape[1])
    nn.init.zeros_(heads.linear.weight)
    nn.init.zeros_(heads.linear.bias)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.LBFGS(heads.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(heads(z), y) + l2 * heads.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # w.(x - mean)/std + b == (w/std).x + (b - w.(mean/std))
        weight = heads.linear.weight / std
        heads.linear.bias -= (heads.linear.weight * (mean / std)).sum(1)
        heads.linear.weight.copy_(weight)
    return heads


def recall_threshold(scores: np.ndarray, positive: np.ndarray, target: float) -> float:
    """The highest threshold whose recall (share of positives scored at or above it) is at
    least ``target``."""
    pos = np.sort(scores[positive > 0])
    if pos.size == 0:
        return 0.5
    allowed_misses = int(np.floor((1.0 - target) * pos.size))
    return float(pos[allowed_misses])


def youden_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """The threshold with the largest recall minus false-positive rate."""
    order = np.argsort(-scores, kind="mergesort")
    hits = positive[order] > 0
    recall = np.cumsum(hits) / max(1, hits.sum())
    false_positive = np.cumsum(~hits) / max(1, (~hits).sum())
    return float(scores[order][int(np.argmax(recall - false_positive))])


def split_report(scores: np.ndarray, labels: np.ndarray, thresholds: dict[str, float]) -> dict:
    """Per label: images, positives, recall and false-positive rate at its threshold, and AUC."""
    report = {}
    for i, label in enumerate(LABELS):
        pos, s = labels[:, i] > 0, scores[:, i]
        hit = s >= thresholds[label]
        report[label] = {
            "images": len(s), "positives": int(pos.sum()),
            "recall": round(float(hit[pos].mean()), 4) if pos.any() else None,
            "false_positive_rate": round(float(hit[~pos].mean()), 4) if (~pos).any() else None,
            "auc": round(auc(s, pos), 4) if pos.any() and (~pos).any() else None,
        }
    return report


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (the chance a positive outscores a negative; ties count half)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start : start + count]] = start + (count + 1) / 2
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pool(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Several splits' (features, labels) as one."""
    return np.concatenate([f for f, _ in parts]), np.concatenate([y for _, y in parts])


def pick_thresholds(score, devs: list, train: list, target_recall: float,
                    overrides: dict[str, float]) -> dict[str, float]:
    """Each label's operating point (a head probability), from ``score(features)``.

    Gated labels: the strictest dev split with enough positives to measure recall on keeps
    ``target_recall``; too few anywhere: the pooled dev splits; still too few: the balanced
    heads' own 0.5. Labels only scores and alerts read: the threshold that best separates the
    label (Youden's J) on the pooled dev splits, or the training splits when dev has too few
    positives. ``overrides`` win over both.
    """
    pooled = [pool(group) for group in (devs, train) if group]
    thresholds = {}
    for i, label in enumerate(LABELS):
        if label in overrides:
            thresholds[label] = overrides[label]
            continue
        if label in GATED:
            candidates = [recall_threshold(score(f)[:, i], y[:, i], target_recall)
                          for f, y in devs if y[:, i].sum() >= MIN_DEV_POSITIVES]
            if not candidates and devs and pooled[0][1][:, i].sum() >= MIN_DEV_POSITIVES:
                feats, labels = pooled[0]
                candidates = [recall_threshold(score(feats)[:, i], labels[:, i], target_recall)]
            thresholds[label] = round(min(candidates), 4) if candidates else 0.5
            continue
        enough = [(f, y) for f, y in pooled if y[:, i].sum() >= MIN_DEV_POSITIVES]
        thresholds[label] = round(youden_threshold(score(enough[0][0])[:, i],
                                                   enough[0][1][:, i]), 4) if enough else 0.5
    return thresholds


def train_presence(run_dir: str | Path, target_recall: float = TARGET_RECALL,
                   overrides: dict[str, float] | None = None) -> dict:
    """Fit the heads for ``run_dir`` and write presence.pt and presence.json into it.

    ``overrides``: operating points (head probabilities) to use instead of the recall rule, e.g.
    ones chosen on dev captions, where the gate's effect is measured (see docs/grounding.md).

    Returns:
        The presence.json record: labels, thresholds, gated labels, and per split and folder
        the recall, false-positive rate and AUC of each label.
    """
    run_dir = Path(run_dir)
    unknown = sorted(set(overrides or {}) - set(LABELS))
    if unknown:
        raise ValueError(f"unknown presence labels {', '.join(unknown)} (known: {', '.join(LABELS)})")
    sources, cache_root, backbone = run_sources(run_dir)
    parts = {}
    for source in sources:
        cache = feature_cache_dir(cache_root, backbone, source.root)
        for split in ("train", "dev", "test"):
            parts[(source.name, split)] = pooled_split(source, split, cache)
    train = [parts[(s.name, "train")] for s in sources]
    heads = fit_heads(np.concatenate([f for f, _ in train]), np.concatenate([y for _, y in train]))

    def score(feats):
        with torch.no_grad():
            return torch.sigmoid(heads(torch.from_numpy(feats))).numpy()

    devs = [parts[(s.name, "dev")] for s in sources if len(parts[(s.name, "dev")][0])]
    thresholds = pick_thresholds(score, devs, train, target_recall, overrides or {})
    # Fold each operating point into its head's bias: a score of 0.5 then means "present" for
    # every label, so alert rules, searches and the gate share one meaning of the number.
    with torch.no_grad():
        for i, label in enumerate(LABELS):
            t = min(max(thresholds[label], 1e-4), 1 - 1e-4)
            heads.linear.bias[i] -= float(np.log(t / (1 - t)))
    operating_points, thresholds = thresholds, {label: 0.5 for label in LABELS}
    record = {
        "labels": list(LABELS), "thresholds": thresholds, "operating_points": operating_points,
        "gates": list(GATED),
        "target_recall": target_recall, "backbone": backbone,
        "splits": {f"{name}/{split}": split_report(score(f), y, thresholds)
                   for (name, split), (f, y) in parts.items() if len(f)},
    }
    torch.save(heads.state_dict(), run_dir / "presence.pt")
    (run_dir / "presence.json").write_text(json.dumps(record, indent=2))
    return record


def run(args: argparse.Namespace) -> int:
    """Fit, write, and print the thresholds and each test split's person numbers (one line)."""
    if not 0.0 < args.target_recall <= 1.0:
        print(f"edgecap: --target-recall must be in (0, 1], got {args.target_recall}",
              file=sys.stderr)
        return 2
    try:
        record = train_presence(args.run, args.target_recall, dict(args.operating_point or []))
    except (OSError, ValueError, KeyError) as exc:
        print(f"edgecap: train-presence failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"thresholds": record["thresholds"],
                      "test": {k: v["person"] for k, v in record["splits"].items()
                               if k.endswith("/test")}}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgecap train-presence", description=DESCRIPTION)
    add_presence_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
