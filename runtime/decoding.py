"""Greedy and beam search over a KV-cached decoder step, with ``transformers.generate()`` semantics.

Every rule here mirrors transformers 4.57's ``_sample`` (greedy) and vectorised ``_beam_search``
so that the same weights give the same tokens: log-softmax before the logits processors in beam
search, raw logits in greedy, length penalty over the generated length including EOS, the
early-stopping heuristic, and float32 arithmetic throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .grounding import PresenceGate, ban_gated_words
from .manifest import GenerationOptions
from .runner import DecoderState, GraphRunner

NEG = np.float32(-1.0e9)  # transformers' "never pick this" offset


@dataclass
class Hypothesis:
    """One finished caption in decoder ids (EOS included when the model emitted it)."""

    token_ids: list[int]
    score: float


# ---------------------------------------------------------------- logits processors


def process_scores(scores: np.ndarray, sequences: np.ndarray, options: GenerationOptions,
                   eos_id: int, prompt_len: int = 1,
                   gates: list[list[PresenceGate]] | None = None) -> np.ndarray:
    """Apply repetition penalty, n-gram blocking, min-new-tokens and presence gates in place.

    scores [rows, vocab] float32; sequences [rows, cur_len] as transformers sees them: the
    decoder start token included (``prompt_len`` 1), or only generated tokens after an embedded
    prefix (``prompt_len`` 0). ``gates``: per row, the presence gates whose words it may not
    write (grounding.py); None for models without presence heads.
    """
    if options.repetition_penalty != 1.0:
        penalty = np.float32(options.repetition_penalty)
        for row, seq in zip(scores, sequences):
            seen = np.unique(seq)
            values = row[seen]
            row[seen] = np.where(values < 0, values * penalty, values / penalty)
    n = options.no_repeat_ngram_size
    if n > 0 and sequences.shape[1] + 1 >= n:
        for row, seq in zip(scores, sequences.tolist()):
            row[banned_ngram_tokens(seq, n)] = -np.inf
    if sequences.shape[1] - prompt_len < options.min_new_tokens:
        scores[:, eos_id] = -np.inf
    if gates is not None:
        ban_gated_words(scores, sequences, gates)
    return scores


def banned_ngram_tokens(seq: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in ``seq``."""
    prefix = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------- greedy


def greedy_search(runner: GraphRunner, cross: list[np.ndarray], options: GenerationOptions,
                  start_id: int, eos_id: int, gates: list[list[PresenceGate]] | None = None
                  ) -> list[Hypothesis]:
    """Argmax decoding for a batch of images. Finished rows leave the batch (their tokens no
    longer matter), so later steps only pay for captions still being written. ``gates``: per
    image, the presence gates whose words it may not write (grounding.py)."""
    batch = cross[0].shape[0]
    state = runner.start(cross)
    sequences = np.full((batch, 1), start_id, dtype=np.int64)
    active = np.arange(batch)  # image index of each row still in the state
    done: dict[int, Hypothesis] = {}
    logprob_sums = np.zeros(batch, np.float64)
    for _ in range(options.max_new_tokens):
        logits = runner.step(state, sequences[active, -1])
        log_probs = log_softmax(logits)  # before the processors edit logits in place
        seen = sequences[active, 1 - state.prompt_len :]  # what transformers' processors see
        row_gates = None if gates is None else [gates[i] for i in active]
        tokens = process_scores(logits, seen, options, eos_id, state.prompt_len,
                                row_gates).argmax(axis=-1)
        logprob_sums[active] += log_probs[np.arange(len(active)), tokens]
        column = np.full((batch, 1), eos_id, dtype=np.int64)  # finished rows pad with EOS
        column[active, 0] = tokens
        sequences = np.concatenate([sequences, column], axis=1)
        finished = tokens == eos_id
        for row in np.flatnonzero(finished):
            done[int(active[row])] = _hypothesis(sequences[active[row]], logprob_sums[active[row]], eos_id)
        if finished.all():
            break
        if finished.any():
            keep = np.flatnonzero(~finished)
            runner.select(state, keep)
            active = active[keep]
    for image in active:
        done[int(image)] = _hypothesis(sequences[image], logprob_sums[image], eos_id)
    return [done[i] for i in range(batch)]


def _hypothesis(sequence: np.ndarray, logprob_sum: float, eos_id: int,
                score: float | None = None) -> Hypothesis:
    """Tokens after the start token up to the first end token; ``score`` given (beam search)
    or greedy's: mean log-probability per generated token (higher is more confident)."""
    tokens = sequence[1:].tolist()
    if eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id) + 1]
    if score is None:
        score = float(logprob_sum) / max(1, len(tokens))
    return Hypothesis(tokens, score)


# ---------------------------------------------------------------- beam search


def beam_search(runner: GraphRunner, cross: list[np.ndarray], options: GenerationOptions,
                start_id: int, eos_id: int, gates: list[list[PresenceGate]] | None = None
                ) -> list[Hypothesis]:
    """Beam search with transformers' scoring and stopping rules, for a batch of images;
    ``gates`` as for ``greedy_search`` (every beam of an image gets its gates)."""
    batch, beams = cross[0].shape[0], options.num_beams
    keep = 2 * beams  # candidates per image: enough that `beams` survive even if all EOS
    max_length = 1 + options.max_new_tokens  # sequences include the decoder start token
    penalty, early = options.length_penalty, options.early_stopping

    state = runner.start(cross, repeats=beams)  # cross K/V expanded once, never recomputed
    running, running_scores = _start_beams(batch, beams, max_length, start_id, eos_id)
    finished, finished_scores = running.copy(), np.full((batch, beams), NEG, np.float32)
    is_finished = np.zeros((batch, beams), bool)
    improvable = np.ones(batch, bool)  # transformers' is_early_stop_heuristic_unsatisfied
    top_mask = np.arange(keep) < beams
    batch_rows = np.arange(batch)[:, None]

    row_gates = None if gates is None else [g for g in gates for _ in range(beams)]
    cur_len = 1
    while True:
        log_probs = _beam_log_probs(runner, state, running, cur_len, options, eos_id, row_gates)
        vocab = log_probs.shape[-1]
        totals = (log_probs.reshape(batch, beams, vocab) + running_scores[:, :, None]).reshape(batch, -1)

        # The best `keep` continuations over all beams of each image.
        top = _topk(totals, keep)
        top_scores = np.take_along_axis(totals, top, axis=1)
        origin, tokens = top // vocab, top % vocab
        candidates = running[batch_rows, origin]  # [batch, keep, max_length]
        candidates[:, :, cur_len] = tokens
        hits_end = (tokens == eos_id) | (cur_len + 1 >= max_length)

        # Next running beams: the best candidates that did not just end.
        alive_scores = top_scores + hits_end.astype(np.float32) * NEG
        survivors = _topk(alive_scores, beams)
        running = np.take_along_axis(candidates, survivors[:, :, None], axis=1)
        running_scores = np.take_along_axis(alive_scores, survivors, axis=1)
        parents = np.take_along_axis(origin, survivors, axis=1)

        # Finished hypotheses: only endings among the top `beams` candidates count.
        just_ended = hits_end & top_mask[None, :]
        finished, finished_scores, is_finished = _merge_finished(
            (finished, finished_scores, is_finished), candidates, top_scores, just_ended,
            improvable, cur_len, options)

        runner.select(state, (parents + np.arange(batch)[:, None] * beams).reshape(-1), cross_too=False)
        cur_len += 1

        # Can any running beam still beat the worst finished one?
        best_length = max_length - 1 if early == "never" and penalty > 0.0 else cur_len - 1
        best_possible = running_scores[:, 0] / np.float32(best_length**penalty)
        worst = np.where(is_finished, finished_scores.min(axis=1, keepdims=True), NEG)
        improvable &= (best_possible[:, None] > worst).any(axis=1)

        if not improvable.any() or (is_finished.all() and early is True) or hits_end.all():
            break

    return [_hypothesis(finished[image, 0], 0.0, eos_id, float(finished_scores[image, 0]))
            for image in range(batch)]


def _beam_log_probs(runner: GraphRunner, state: DecoderState, running: np.ndarray, cur_len: int,
                    options: GenerationOptions, eos_id: int,
                    row_gates: list[list[PresenceGate]] | None) -> np.ndarray:
    """One decoder step for every running beam: next-token log-probabilities [rows, vocab]
    after the logits processors."""
    logits = runner.step(state, running[:, :, cur_len - 1].reshape(-1))
    seen = running[:, :, 1 - state.prompt_len : cur_len]  # what transformers' processors see
    images, beams, width = seen.shape
    flat = seen.reshape(images * beams, width)  # explicit shape: the width may be zero
    return process_scores(log_softmax(logits), flat, options, eos_id, state.prompt_len, row_gates)


def _start_beams(batch: int, beams: int, max_length: int, start_id: int, eos_id: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Running sequences [batch, beams, max_length] (start token, then EOS padding) and scores."""
    running = np.full((batch, beams, max_length), eos_id, dtype=np.int64)
    running[:, :, 0] = start_id
    running_scores = np.zeros((batch, beams), np.float32)
    running_scores[:, 1:] = NEG  # all beams start identical: only the first may expand
    return running, running_scores


def _merge_finished(kept: tuple[np.ndarray, np.ndarray, np.ndarray], candidates: np.ndarray,
                    top_scores: np.ndarray, just_ended: np.ndarray, improvable: np.ndarray,
                    cur_len: int, options: GenerationOptions
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best ``num_beams`` finished hypotheses per image: those kept so far plus the
    candidates that just ended, scored with the length penalty (transformers' rules: none is
    added once an image is closed, or when it can no longer improve)."""
    finished, finished_scores, is_finished = kept
    ended_scores = top_scores / np.float32(cur_len**options.length_penalty)
    full = is_finished.all(axis=1, keepdims=True) & (options.early_stopping is True)
    ended_scores = ended_scores + full.astype(np.float32) * NEG
    ended_scores = ended_scores + (~improvable[:, None]).astype(np.float32) * NEG
    ended_scores = ended_scores + (~just_ended).astype(np.float32) * NEG
    merged_scores = np.concatenate([finished_scores, ended_scores], axis=1)
    best = _topk(merged_scores, options.num_beams)
    merged = np.concatenate([finished, candidates], axis=1)
    return (np.take_along_axis(merged, best[:, :, None], axis=1),
            np.take_along_axis(merged_scores, best, axis=1),
            np.take_along_axis(np.concatenate([is_finished, just_ended], axis=1), best, axis=1))


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, best first; equal scores in index order.

    Beam search asks this of beams x vocabulary scores every step, where a full
    ``argpartition`` of each row is a visible share of a caption's time. A strided sample's k-th
    largest value is a lower bound for the row's k-th largest, so only the few values at or
    above it (about k x stride) need ranking; the result is exact.
    """
    rows, width = scores.shape
    if rows == 0:
        return np.empty((0, min(k, width)), np.int64)
    if k >= width:
        return np.stack([_ranked(row, np.arange(width)) for row in scores])
    stride = max(1, width // (_SAMPLE_PER_K * k))
    picked = []
    for row in scores:
        sample = row[::stride]
        if stride > 1 and sample.size > k:
            floor = np.partition(sample, sample.size - k)[sample.size - k]
            candidates = np.flatnonzero(row >= floor)  # at least k: the sample's own top k
        else:
            candidates = np.arange(width)
        if candidates.size > k:
            best = np.argpartition(-row[candidates], k - 1)[:k]
            # Values tied with the k-th best may have been cut arbitrarily: take them all back,
            # so the ranking below breaks ties by index.
            kth = row[candidates[best]].min()
            candidates = candidates[row[candidates] >= kth]
        if candidates.size < k:  # NaN scores defeat the bounds: rank the whole row
            candidates = np.arange(width)
        picked.append(_ranked(row, candidates)[:k])
    return np.stack(picked)


# Sample size per wanted index: a small fraction of a beams x vocabulary row, yet enough
# that the sample's floor lets only a few values more than k through to the ranking.
_SAMPLE_PER_K = 64


def _ranked(row: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``indices`` ordered by score, best first; ties by index (lexsort is stable)."""
    return indices[np.lexsort((indices, -row[indices]))]
