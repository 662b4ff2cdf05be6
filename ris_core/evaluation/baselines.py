"""The searches a caption is measured against: visual baselines a practitioner would use, and caption + image
hybrids. Pure functions over arrays; `pipeline` caches what they compute.

A visual baseline is a `Space`: the held-out photos and the catalog embedded in one vector space (unit rows),
searched by cosine similarity. The captioner's own encoder is one; the contrastive model trained on the
training names (`ris_core.contrastive`) gives two more (image-to-image and image-to-name) and, concatenated
with the encoder's, a fourth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ris_core.contrastive import ContrastiveModel
from ris_core.hybrid import BlendPool, cross_fit, rrf
from ris_core.search.cosine import exact_scores, exact_top, unit_rows

DEPTH = 100  # candidates kept per query and side for fusion (the judged top 10 come from these)


@dataclass
class Space:
    """Held-out photos (`queries`, row i = held-out product i) and catalog products (`catalog`, row j =
    `ids[j]`) embedded in one space with unit rows."""

    name: str
    queries: np.ndarray
    catalog: np.ndarray
    ids: np.ndarray

    def __post_init__(self) -> None:
        self._row_of = {int(pid): j for j, pid in enumerate(self.ids)}

    def top(self, depth: int = DEPTH, chunk: int = 512) -> list[list[int]]:
        """Every query's `depth` nearest catalog ids, best first, ties by id (shortlisted by one matrix product
        per chunk of queries, ranked by `exact_top`: the same order however the product was computed)."""
        out: list[list[int]] = []
        for start in range(0, len(self.queries), chunk):
            part = self.queries[start : start + chunk]
            out += [self.ids[exact_top(row, self.catalog, self.ids, query, depth)[0]].tolist()
                    for row, query in zip(part @ self.catalog.T, part)]
        return out

    def similarity(self, row: int, ids: Sequence[int]) -> np.ndarray:
        """Cosine similarity of held-out photo `row` to the given catalog products (`exact_scores`)."""
        return exact_scores(self.catalog[[self._row_of[int(pid)] for pid in ids]], self.queries[row])


def spaces(val_features: np.ndarray, catalog_features: np.ndarray, catalog_ids: np.ndarray,
           catalog_name_features: np.ndarray | None, model: ContrastiveModel | None) -> list[Space]:
    """The encoder's space, and with a contrastive model its image, image-to-name and combined spaces."""
    found = [Space("image_knn:encoder", unit_rows(val_features), unit_rows(catalog_features), catalog_ids)]
    if model is None:
        return found
    photo, catalog_photo = model.embed_images(val_features), model.embed_images(catalog_features)
    found.append(Space("image_knn:clip", photo, catalog_photo, catalog_ids))
    if catalog_name_features is not None:
        found.append(Space("image_to_name:clip", photo, model.embed_texts(catalog_name_features), catalog_ids))
    found.append(Space("image_knn:encoder+clip", unit_rows(np.hstack([unit_rows(val_features), photo])),
                       unit_rows(np.hstack([unit_rows(catalog_features), catalog_photo])), catalog_ids))
    return found


def r1_quality(articles_of_query: np.ndarray, article_of: dict[int, object]):
    """A fast judge for tuning: mean of P@10 and first-hit reciprocal rank at R1 (same articleType)."""

    def quality(rankings: list[list[int]], rows: np.ndarray) -> float:
        total = 0.0
        for row in rows:
            hits = [article_of.get(pid) == articles_of_query[row] for pid in rankings[row][:10]]
            first = next((rank for rank, hit in enumerate(hits, start=1) if hit), None)
            total += sum(hits) / 10 + (1.0 / first if first else 0.0)
        return total / max(len(rows), 1)

    return quality


def hybrids(text_hits: list[list[int]], text_scores: list[list[float]], space: Space, visual: list[list[int]],
            quality, k: int = 10, seed: int = 0) -> dict[str, tuple[list[list[int]], dict]]:
    """{"rrf": (rankings, info), "blend": (rankings, info)} for one caption strategy and one visual space;
    `visual` holds each query's `DEPTH` nearest catalog ids in `space` (`space.top()`)."""
    fused_rrf = [rrf([t, v], k=k) for t, v in zip(text_hits, visual, strict=True)]
    pools = [BlendPool.of(t, s, v, lambda ids, row=row: space.similarity(row, ids))
             for row, (t, s, v) in enumerate(zip(text_hits, text_scores, visual, strict=True))]

    def fused_for(weight: float) -> list[list[int]]:
        return [pool.top(weight, k) for pool in pools]

    blended, info = cross_fit(len(text_hits), fused_for, quality, seed=seed)
    return {"rrf": (fused_rrf, {"rrf_k": 60, "depth": DEPTH}), "blend": (blended, {**info, "depth": DEPTH})}
