"""Token ids -> text with the `tokenizers` library, through an optional pruned-vocabulary map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import ModelError


class CaptionTokenizer:
    """Decodes the decoder's ids (possibly from a pruned vocabulary) into text."""

    def __init__(self, tokenizer_path: Path, decoder_vocab_size: int, id_map_path: Path | None = None):
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except FileNotFoundError:
            raise ModelError(f"{tokenizer_path}: missing tokenizer file; re-export the model") from None
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ModelError(f"{tokenizer_path}: unreadable tokenizer ({exc}); re-export the model") from None
        tokenizer_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.id_map: np.ndarray | None = None
        self._decoder_ids: dict[int, int] | None = None  # tokenizer id -> decoder id, when asked
        if id_map_path is not None:
            try:
                self.id_map = np.asarray(json.loads(Path(id_map_path).read_text()), dtype=np.int64)
            except (OSError, ValueError) as exc:
                raise ModelError(f"{id_map_path}: unreadable id map ({exc}); re-export the model") from None
            if self.id_map.ndim != 1 or len(self.id_map) != decoder_vocab_size:
                raise ModelError(
                    f"{id_map_path}: id map has {self.id_map.size} entries but the decoder has "
                    f"{decoder_vocab_size} outputs; the files come from different exports"
                )
            if self.id_map.size and (self.id_map.min() < 0 or self.id_map.max() >= tokenizer_size):
                raise ModelError(f"{id_map_path}: id map points outside the tokenizer's vocabulary")
        elif decoder_vocab_size > tokenizer_size:
            raise ModelError(
                f"{tokenizer_path}: tokenizer knows {tokenizer_size} tokens but the decoder emits "
                f"{decoder_vocab_size}; tokenizer and model do not belong together"
            )

    def to_tokenizer_ids(self, decoder_ids: list[int]) -> list[int]:
        if self.id_map is None:
            return list(decoder_ids)
        return self.id_map[np.asarray(decoder_ids, dtype=np.int64)].tolist()

    def to_decoder_ids(self, text: str) -> list[int] | None:
        """``text``'s tokens as decoder ids, or None when a token is outside a pruned vocabulary
        (the decoder cannot write it)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.id_map is None:
            return ids
        if self._decoder_ids is None:
            self._decoder_ids = {int(t): i for i, t in enumerate(self.id_map)}
        found = [self._decoder_ids.get(t) for t in ids]
        return None if None in found else found

    def decode(self, tokenizer_ids: list[int]) -> str:
        return self.tokenizer.decode(tokenizer_ids, skip_special_tokens=True).strip()
