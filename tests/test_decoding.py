"""Beam search's top-k: exact against a full sort, ties broken by index, -inf and small rows."""

from __future__ import annotations

import numpy as np
import pytest

from edgecap.decoding import _topk


def full_sort_topk(scores: np.ndarray, k: int) -> np.ndarray:
    return np.stack([np.lexsort((np.arange(row.size), -row))[:k] for row in scores])


@pytest.mark.parametrize("width", [3, 50, 1000, 4 * 50257])
@pytest.mark.parametrize("kind", ["distinct", "ties", "banned", "mostly_banned"])
def test_topk_matches_a_full_sort(width, kind):
    rng = np.random.default_rng(width)
    for k in sorted({1, 2, min(width, 6), min(width, 8), width}):
        scores = rng.standard_normal((3, width)).astype(np.float32)
        if kind == "ties":
            scores = np.round(scores * 2) / 2  # few distinct values: ties at the k-th place
        elif kind == "banned":  # n-gram blocking and min-new-tokens write -inf
            scores[:, rng.integers(0, width, width // 2)] = -np.inf
        elif kind == "mostly_banned":
            scores[:] = -np.inf
            scores[:, : max(1, k // 2)] = 0.0
        picked = _topk(scores, k)
        assert picked.shape == (3, k)
        np.testing.assert_array_equal(picked, full_sort_topk(scores, k))


def test_topk_always_returns_k_indices_even_with_nan_or_no_rows():
    scores = np.random.default_rng(0).standard_normal((2, 4 * 50257)).astype(np.float32)
    scores[0, ::7] = np.nan  # the strided sample sees NaN: its bound is useless
    scores[1, :] = np.nan
    picked = _topk(scores, 8)
    assert picked.shape == (2, 8)
    finite = scores[0][picked[0]]
    assert np.isfinite(finite).all() and (np.diff(finite) <= 0).all()
    assert _topk(np.zeros((0, 10), np.float32), 4).shape == (0, 4)
