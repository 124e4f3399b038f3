"""Grounded decoding: presence scores and ImageNet tags from the encoder, and the gate that keeps
a caption from naming what the encoder says is not there.

A grounded export's encoder graph has three outputs besides the cross K/V (names in
``manifest.py``): ``presence`` [B, labels], the probability that each label of
``PRESENCE_WORDS`` is in the picture (linear heads on the backbone's pooled features), and
``tag_ids`` / ``tag_scores`` [B, k], the backbone's own most likely ImageNet classes.

The words that name each label are declared here once: training labels images with them (a
reference caption that uses one of a label's words marks the image), evaluation counts captions
with them, and the gate bans them while decoding. The gate is a logits processor: for an image
whose presence score is below its label's threshold, a token that would complete one of the
label's words gets -inf, in every row (beam) of that image only, so a caption never depends on
the other images of its batch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelError

# The words that name each presence label in a caption (lower case, whole words). Written down
# before any score was measured; plurals are listed, possessives ("man's") match their word.
PRESENCE_WORDS: dict[str, tuple[str, ...]] = {
    "person": (
        "man", "men", "woman", "women", "person", "persons", "people", "boy", "boys", "girl",
        "girls", "child", "children", "kid", "kids", "baby", "babies", "toddler", "toddlers",
        "guy", "guys", "lady", "ladies", "gentleman", "gentlemen", "player", "players", "rider",
        "riders", "biker", "bikers", "cyclist", "cyclists", "skier", "skiers", "snowboarder",
        "snowboarders", "skateboarder", "skateboarders", "surfer", "surfers", "swimmer",
        "swimmers", "runner", "runners", "climber", "climbers", "hiker", "hikers", "dancer",
        "dancers", "crowd", "family", "teenager", "teenagers", "teen", "teens",
        "adult", "adults", "worker", "workers", "athlete", "athletes", "he", "she", "him", "his",
        "her", "someone", "student", "students", "soldier", "soldiers", "policeman", "policemen",
        "police", "officer", "officers", "mother", "father", "mom", "dad", "son", "daughter",
        "brother", "sister", "friends", "bride", "groom", "actor", "actress", "musician",
        "musicians", "singer", "performer", "performers", "spectators", "audience", "tourist",
        "tourists", "pedestrian", "pedestrians", "fisherman", "infant", "youngster", "wrestler",
        "wrestlers", "cowboy", "jockey", "chef", "doctor", "driver", "artist", "goalie", "astronaut",
        "astronauts", "diver", "divers",
    ),
    "dog": (
        "dog", "dogs", "puppy", "puppies", "pup", "pups", "poodle", "terrier", "terriers",
        "retriever", "labrador", "collie", "dachshund", "greyhound", "beagle", "pug", "husky",
        "bulldog",
    ),
    "cat": ("cat", "cats", "kitten", "kittens", "kitty"),
    "vehicle": (
        "car", "cars", "truck", "trucks", "bus", "buses", "van", "vans", "jeep", "jeeps", "suv",
        "motorcycle", "motorcycles", "motorbike", "motorbikes", "taxi", "taxis", "vehicle",
        "vehicles", "tractor", "tractors",
    ),
    "bicycle": ("bicycle", "bicycles", "bike", "bikes", "cyclist", "cyclists", "biker", "bikers"),
}

_WORD = re.compile(r"[a-z]+")


def caption_words(text: str) -> set[str]:
    """The lower-case words of a caption ("man's" gives "man" and "s")."""
    return set(_WORD.findall(text.lower()))


def names_label(text: str, label: str) -> bool:
    """True when ``text`` uses one of ``label``'s words."""
    return not caption_words(text).isdisjoint(PRESENCE_WORDS[label])


@dataclass(frozen=True)
class Tag:
    """One entry of a result's ``tags``: a presence label or an ImageNet class, with its score."""

    label: str
    score: float

    def to_record(self) -> dict[str, Any]:
        return {"label": self.label, "score": round(float(self.score), 4)}


@dataclass(frozen=True)
class PresenceGate:
    """Bans a label's words for images whose presence score is below ``threshold``.

    ``sequences`` are the label's words as decoder-id sequences (each word with its leading
    space); the last id of a sequence is banned when a row's tokens end with the rest of it.
    """

    label: str
    index: int  # column of the label in the encoder's presence output
    threshold: float
    sequences: tuple[tuple[int, ...], ...]

    def banned(self, tokens: list[int]) -> list[int]:
        """Ids that would complete one of the words after ``tokens`` (a row's ids so far)."""
        found = []
        for seq in self.sequences:
            head = seq[:-1]
            if not head or tuple(tokens[len(tokens) - len(head):]) == head:
                found.append(seq[-1])
        return found


class Grounding:
    """A grounded export's presence labels, thresholds, gates and ImageNet tag names.

    Built from the manifest's ``grounding`` section; ``from_manifest`` returns None for an export
    without one (every Hugging Face export), which then decodes exactly as before.
    """

    def __init__(self, labels: list[str], thresholds: dict[str, float], gates: list[PresenceGate],
                 tag_labels: list[str]):
        self.labels = labels
        self.thresholds = thresholds
        self.gates = gates
        self.tag_labels = tag_labels

    @classmethod
    def from_manifest(cls, section: dict[str, Any], model_dir: Path,
                      encode_word: Callable[[str], list[int] | None]) -> Grounding | None:
        """``encode_word(" word")`` gives a word's decoder ids, or None when the decoder's
        vocabulary cannot write it (then it needs no ban)."""
        if not section:
            return None
        try:
            labels = list(section["presence_labels"])
            thresholds = {label: float(section["thresholds"][label]) for label in labels}
            gated = list(section.get("gates", []))
            tag_file = model_dir / section["tag_labels_file"]
        except (KeyError, TypeError) as exc:
            raise ModelError(f"{model_dir}: malformed grounding section ({exc}); re-export") from None
        unknown = [label for label in labels if label not in PRESENCE_WORDS]
        if unknown or not set(gated) <= set(labels):
            raise ModelError(f"{model_dir}: grounding names labels this edgecap does not know "
                             f"({', '.join(unknown or gated)}); upgrade edgecap or re-export")
        try:
            tag_labels = json.loads(tag_file.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{tag_file}: unreadable tag labels ({exc}); re-export") from None
        gates = []
        for label in gated:
            sequences = {tuple(ids) for word in PRESENCE_WORDS[label]
                         if (ids := encode_word(" " + word))}
            gates.append(PresenceGate(label, labels.index(label), thresholds[label],
                                      tuple(sorted(sequences))))
        return cls(labels, thresholds, gates, tag_labels)

    def image_bans(self, presence: np.ndarray) -> list[list[PresenceGate]]:
        """The gates that apply to each image: those whose score is below the threshold."""
        return [[g for g in self.gates if float(row[g.index]) < g.threshold] for row in presence]

    def tags(self, presence: np.ndarray, tag_ids: np.ndarray, tag_scores: np.ndarray
             ) -> list[list[Tag]]:
        """Per image: every presence label with its score, then the ImageNet classes."""
        out = []
        for scores, ids, probs in zip(presence, tag_ids, tag_scores):
            tags = [Tag(label, float(s)) for label, s in zip(self.labels, scores)]
            tags += [Tag(self.tag_labels[int(i)], float(p)) for i, p in zip(ids, probs)]
            out.append(tags)
        return out


def ban_gated_words(scores: np.ndarray, sequences: np.ndarray,
                    row_gates: list[list[PresenceGate]]) -> None:
    """Set -inf where a token would complete a gated word; ``row_gates`` aligns with rows."""
    for row, seq, gates in zip(scores, sequences, row_gates):
        if gates:
            tokens = seq.tolist()
            for gate in gates:
                row[gate.banned(tokens)] = -np.inf
