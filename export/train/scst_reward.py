"""CIDEr-D as a per-caption reward, with n-gram document frequencies from a whole corpus.

pycocoevalcap's scorer takes its document frequencies from the batch it scores, so scoring a
training batch of 16 images would make every n-gram look rare. Self-critical training needs
one fixed idf over the training references instead; this computes the same CIDEr-D (n-grams 1
to 4, clipped tf-idf, Gaussian length penalty, times 10) as pycocoevalcap's ``CiderScorer`` with
that idf. Given the same set of references as its corpus, it returns pycocoevalcap's scores.
"""

from __future__ import annotations

import math
from collections import Counter

NGRAM_MAX = 4
SIGMA = 6.0  # CIDEr-D's length penalty width, as in pycocoevalcap


def ngram_counts(text: str, n_max: int = NGRAM_MAX) -> Counter:
    """Counts of every 1..n_max-gram of a whitespace-tokenized caption."""
    words = text.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n_max + 1)
                   for i in range(len(words) - k + 1))


class CorpusCider:
    """CIDEr-D of captions against one image's references, idf over every image's references.

    Args:
        references: per image, its reference captions (already normalized: lower-case words
            separated by spaces).
    """

    def __init__(self, references: list[list[str]]):
        self.references = references
        self.document_frequency: Counter = Counter()
        for refs in references:
            self.document_frequency.update({g for r in refs for g in ngram_counts(r)})
        self.log_documents = math.log(float(len(references)))
        self._ref_vectors: dict[int, list] = {}

    def _vector(self, counts: Counter):
        """tf-idf weights per n-gram order, their norms, and the length pycocoevalcap uses
        (it counts bigrams: kept for identical scores)."""
        vec = [{} for _ in range(NGRAM_MAX)]
        norm = [0.0] * NGRAM_MAX
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            weight = tf * (self.log_documents
                           - math.log(max(1.0, self.document_frequency[gram])))
            vec[n][gram] = weight
            norm[n] += weight * weight
            if n == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _refs_of(self, image: int) -> list:
        if image not in self._ref_vectors:
            self._ref_vectors[image] = [self._vector(ngram_counts(r))
                                        for r in self.references[image]]
        return self._ref_vectors[image]

    def score(self, caption: str, image: int) -> float:
        """CIDEr-D of ``caption`` (normalized) against the references of image ``image``."""
        vec, norm, length = self._vector(ngram_counts(caption))
        refs = self._refs_of(image)
        total = 0.0
        for ref_vec, ref_norm, ref_length in refs:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * SIGMA**2))
            for n in range(NGRAM_MAX):
                overlap = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0)
                              for g, w in vec[n].items())
                if norm[n] and ref_norm[n]:
                    overlap /= norm[n] * ref_norm[n]
                total += overlap * penalty
        return total / NGRAM_MAX / len(refs) * 10.0
