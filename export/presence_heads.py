"""The presence heads as the export sees them: the module, the grounding outputs a grounded
encoder graph emits, the ImageNet names of its tags, and loading what ``train-presence`` wrote.
Kept apart from the fitting (``train/presence.py``), which needs the training data modules, so that
the model definitions (``captioner_model.py``) import no training code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from edgecap.grounding import PRESENCE_WORDS
from torch import nn

LABELS = tuple(PRESENCE_WORDS)
GATED = ("person",)  # labels whose words decoding bans below the threshold
TAG_COUNT = 5  # ImageNet classes each result lists
IMAGENET_LABELS = Path(__file__).with_name("imagenet_labels.txt")


class PresenceHeads(nn.Module):
    """(B, 1280) pooled backbone features -> (B, labels) logits, one linear head per label."""

    def __init__(self, labels: tuple[str, ...] | list[str], channels: int = 1280,
                 thresholds: dict[str, float] | None = None, gates: tuple[str, ...] = GATED):
        super().__init__()
        self.labels = list(labels)
        self.linear = nn.Linear(channels, len(self.labels))
        self.thresholds = dict(thresholds or {label: 0.5 for label in self.labels})
        self.gates = [g for g in gates if g in self.labels]
        # The head probabilities each threshold stands for before they were folded into the
        # biases (recorded for the model card and for re-picking them); empty: not folded.
        self.operating_points: dict[str, float] = {}

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(pooled)


def grounding_outputs(encoder: nn.Module, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What a grounded encoder graph emits besides cross K/V, from (B, 49, 1280) backbone
    features: presence probabilities (B, labels), then the top ImageNet class ids and their
    probabilities (B, TAG_COUNT) each."""
    pooled = features.float().mean(dim=1)
    scores, ids = torch.softmax(encoder.backbone._fc(pooled), dim=-1).topk(TAG_COUNT, dim=-1)
    return torch.sigmoid(encoder.presence(pooled)), ids, scores


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet class names in the classifier head's order."""
    names = IMAGENET_LABELS.read_text().splitlines()
    if len(names) != 1000:
        raise ValueError(f"{IMAGENET_LABELS}: expected 1000 class names, found {len(names)}")
    return names


def write_grounding(encoder_graph: nn.Module, encoder_file: Path, pixels: torch.Tensor,
                    out_dir: Path) -> dict:
    """Check a grounded encoder graph's grounding outputs against torch, write the tag names
    beside it, and return the manifest's ``grounding`` section."""
    import onnxruntime as ort
    from edgecap.manifest import GROUNDING_OUTPUTS, PIXEL_VALUES

    heads = encoder_graph.encode.presence
    session = ort.InferenceSession(str(encoder_file), providers=["CPUExecutionProvider"])
    got = session.run(list(GROUNDING_OUTPUTS), {PIXEL_VALUES: pixels.numpy()})
    with torch.no_grad():
        want = encoder_graph(pixels)[-len(GROUNDING_OUTPUTS):]
    presence_diff = float(np.abs(got[0] - want[0].numpy()).max())
    if presence_diff > 1e-3 or not np.array_equal(got[1], want[1].numpy()):
        raise ValueError(f"grounding outputs disagree with torch (presence {presence_diff:.2e}, "
                         f"tag ids {got[1].tolist()} vs {want[1].tolist()})")
    (out_dir / "tag_labels.json").write_text(json.dumps(imagenet_labels()))
    return {"presence_labels": list(heads.labels), "thresholds": dict(heads.thresholds),
            "gates": list(heads.gates), "operating_points": dict(heads.operating_points),
            "tag_labels_file": "tag_labels.json",
            "tag_count": TAG_COUNT, "parity_max_abs_presence_diff": presence_diff}


def load_presence(model_dir: Path) -> tuple[PresenceHeads, dict] | None:
    """The heads and record ``train_presence`` wrote into ``model_dir``, or None."""
    record_file = model_dir / "presence.json"
    if not record_file.is_file():
        return None
    record = json.loads(record_file.read_text())
    heads = PresenceHeads(record["labels"], thresholds=record["thresholds"],
                          gates=tuple(record.get("gates", GATED)))
    heads.load_state_dict(torch.load(model_dir / "presence.pt", map_location="cpu",
                                     weights_only=True))
    heads.operating_points = dict(record.get("operating_points", {}))
    return heads.eval(), record
