"""Cosine similarity that gives the same ranking every time: unit rows, exact scores, ties by id.

Normalising a row that is already of unit length changed 3.7% of the reference catalog embeddings' floats, so an
index loaded from its file held other bits than the same index built in memory. `unit_rows` leaves such rows
alone. A float32 matrix product's rounding depends on the BLAS kernel, which depends on the shapes: the same query
ranked in a chunk of 97 queries, of 256 or alone gave another top 10 for 5-7 of 2,000 queries over the
reference's 39,991 catalog embeddings (near-ties swapped), and two evaluations of the same embeddings swapped
`image_knn:encoder` neighbours in 3 of 4,443 rows. So the float32 product only shortlists; the shortlist is
scored again exactly enough to be reproducible: each product of two float32 numbers is exact in float64 and
numpy sums each row the same way whatever the rest of the matrix, so a score is a function of its two vectors
alone. Ties (duplicate photos) go to the smaller product id.
"""

from __future__ import annotations

import numpy as np

SHORTLIST_MARGIN = 16  # candidates rescored beyond k: a float32 near-tie at the k-th place stays in the shortlist
UNIT_TOLERANCE = 1e-6  # a normalised float32 row's norm is within 1.2e-7 of 1 (one ulp) on the reference catalog


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """float32 rows of length 1 (an all-zero row stays zero); a row already of unit length keeps its bits, so
    normalising twice (a saved index loaded again) changes nothing."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    scale = np.where((norms > 0) & (np.abs(norms - 1) > UNIT_TOLERANCE), norms, 1.0)
    return (matrix / scale).astype(np.float32)


def exact_scores(candidates: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Dot products of each row of `candidates` with `query`, in float64, the same bits for a row wherever it is."""
    return (candidates.astype(np.float64) * query.astype(np.float64)).sum(axis=1)


def exact_top(approximate: np.ndarray, catalog: np.ndarray, ids: np.ndarray, query: np.ndarray,
              k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best catalog rows for one query, best first, and their exact scores.

    `approximate` holds the query's float32 scores against every catalog row (-inf: never returned);
    the `k + SHORTLIST_MARGIN` best of them are scored again (`exact_scores`), then ranked by that score
    and product id."""
    available = int(np.isfinite(approximate).sum())
    k = max(0, min(int(k), available))
    if k == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    depth = min(k + SHORTLIST_MARGIN, available)
    shortlist = np.argpartition(-approximate, depth - 1)[:depth]
    scores = exact_scores(catalog[shortlist], query)
    order = np.lexsort((ids[shortlist], -scores))[:k]
    return shortlist[order], scores[order]
