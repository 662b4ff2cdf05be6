"""Hybrid search: a caption's text results and the photo's visual neighbours, fused into one ranking.

Two ways, both over the union of a deep text candidate list and a deep visual one:
- reciprocal-rank fusion (Cormack et al. 2009): score = sum over lists of 1 / (rrf_k + rank), no tuning;
- a score blend: score = w * text + (1 - w) * visual, where text is the BM25 score divided by the query's best
  (0 for products the text search did not return) and visual the cosine similarity, which every catalog
  product has. `w` is chosen by cross-fitting (`cross_fit`): each half of the queries uses the weight that
  did best on the other half, so no query's result depends on a weight tuned on that query.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

BLEND_WEIGHTS = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 21))
RRF_K = 60


def rrf(lists: Sequence[Sequence[int]], k: int = 10, rrf_k: int = RRF_K) -> list[int]:
    """The top `k` ids by reciprocal-rank fusion of ranked id lists (ties: earlier lists' order)."""
    scores: dict[int, float] = {}
    for ranked in lists:
        for rank, pid in enumerate(ranked, start=1):
            scores[pid] = scores.get(pid, 0.0) + 1.0 / (rrf_k + rank)
    return [pid for pid, _ in sorted(scores.items(), key=lambda item: -item[1])[:k]]


@dataclass(frozen=True)
class BlendPool:
    """One query's fusion candidates with their normalised text score and visual similarity: everything of a
    blend that does not depend on the weight, so trying 21 weights costs 21 sorts, not 21 lookups."""

    ids: list[int]
    text: np.ndarray
    visual: np.ndarray

    @classmethod
    def of(cls, text_ids: Sequence[int], text_scores: Sequence[float], visual_ids: Sequence[int],
           similarity: Callable[[list[int]], np.ndarray]) -> BlendPool:
        """`similarity(ids)` gives the photo's cosine similarity to each of those catalog products."""
        candidates = list(dict.fromkeys([*text_ids, *visual_ids]))
        if not candidates:
            return cls([], np.zeros(0), np.zeros(0))
        best = max((s for s in text_scores), default=0.0)
        text = dict(zip(text_ids, (s / best if best > 0 else 0.0 for s in text_scores), strict=True))
        return cls(candidates, np.array([text.get(pid, 0.0) for pid in candidates]), similarity(candidates))

    def top(self, weight: float, k: int = 10) -> list[int]:
        score = weight * self.text + (1 - weight) * self.visual
        order = np.argsort(-score, kind="stable")[:k]
        return [self.ids[i] for i in order]


def blend(text_ids: Sequence[int], text_scores: Sequence[float], visual_ids: Sequence[int],
          similarity: Callable[[list[int]], np.ndarray], weight: float, k: int = 10) -> list[int]:
    """The top `k` ids by weight * normalised text score + (1 - weight) * cosine similarity to the photo.

    `similarity(ids)` gives the photo's cosine similarity to each of those catalog products."""
    return BlendPool.of(text_ids, text_scores, visual_ids, similarity).top(weight, k)


def cross_fit(n_queries: int, fused_for: Callable[[float], list[list[int]]],
              quality: Callable[[list[list[int]], np.ndarray], float],
              weights: Sequence[float] = BLEND_WEIGHTS, seed: int = 0) -> tuple[list[list[int]], dict]:
    """Each query's fused ranking under the weight that scored best on the other half of the queries.

    `fused_for(w)` ranks every query under weight w; `quality(rankings, rows)` scores those rankings on the
    given query rows (higher is better). Returns (rankings, {"weights": [w for half 0, w for half 1], ...})."""
    half = np.random.default_rng(seed).permutation(n_queries) % 2
    by_weight = {w: fused_for(w) for w in weights}
    chosen, out = [], [None] * n_queries
    for fold in (0, 1):
        tune_rows, apply_rows = np.flatnonzero(half != fold), np.flatnonzero(half == fold)
        best = max(weights, key=lambda w: (quality(by_weight[w], tune_rows), -abs(w - 0.5)))
        chosen.append(float(best))
        for row in apply_rows:
            out[row] = by_weight[best][row]
    return out, {"weights": chosen, "grid": list(map(float, weights)), "folds": 2, "seed": seed}
