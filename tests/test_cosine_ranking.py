"""Cosine rankings are a function of the vectors alone: not of the chunk, the BLAS kernel or a save/load trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ris_core.evaluation.baselines import Space
from ris_core.search.cosine import exact_top, unit_rows
from ris_core.search.image_knn import ImageKnnIndex


def near_ties(n_groups: int = 300, per_group: int = 6, dim: int = 256, spread: float = 3e-7,
              seed: int = 0) -> np.ndarray:
    """Groups of catalog rows `spread` apart (a float32 rounding by default), the first two of a group the same."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_groups, 1, dim))
    rows = centres + rng.normal(scale=spread, size=(n_groups, per_group, dim))
    rows[:, 1] = rows[:, 0]  # the same photo under two product ids
    return unit_rows(rows.reshape(-1, dim))


def test_rankings_do_not_depend_on_how_many_queries_share_a_matrix_product() -> None:
    catalog = near_ties()
    ids = np.arange(5000, 5000 + len(catalog))
    knn = ImageKnnIndex(ids, catalog, [f"/img/{i}.jpg" for i in ids], [f"product {i}" for i in ids])
    queries = unit_rows(catalog[::7] + np.random.default_rng(1).normal(scale=0.05, size=catalog[::7].shape))
    ranked = {chunk: [[r.product_id for r in response.results] for response in knn.search_vectors(queries, 10, chunk)]
              for chunk in (1, 7, 256)}
    assert ranked[1] == ranked[7] == ranked[256]
    alone = [[r.product_id for r in knn.search_vector(q, 10).results] for q in queries[:40]]
    assert alone == ranked[1][:40]
    space = Space("image_knn:encoder", queries, catalog, ids)
    assert space.top(10, chunk=1) == space.top(10, chunk=5) == space.top(10, chunk=512) == ranked[1]


def test_ties_go_to_the_smaller_id_and_scores_are_exact() -> None:
    catalog = near_ties(n_groups=20, spread=0.1)
    ids = np.arange(len(catalog))[::-1].copy()  # larger ids first, so the tie-break is not the row order
    query = catalog[12]  # group 2's photo shared by rows 12 and 13
    rows, scores = exact_top(catalog @ query, catalog, ids, query, k=2)
    assert sorted(rows.tolist()) == [12, 13] and ids[rows[0]] < ids[rows[1]] and scores[0] == scores[1]
    assert scores[0] == np.dot(catalog[12].astype(np.float64), query.astype(np.float64))


def test_a_saved_index_loads_with_the_same_bits(tmp_path: Path) -> None:
    raw = np.random.default_rng(2).normal(size=(500, 64)).astype(np.float32) * 5
    ids = np.arange(500)
    knn = ImageKnnIndex(ids, raw, [f"/img/{i}.jpg" for i in ids], [f"product {i}" for i in ids])
    loaded = ImageKnnIndex.load(knn.save(tmp_path / "knn"))
    assert np.array_equal(loaded.vectors, knn.vectors)  # normalising unit rows again used to move ~4% of floats
    assert np.array_equal(unit_rows(knn.vectors), knn.vectors)
    assert np.array_equal(unit_rows(np.zeros((2, 3))), np.zeros((2, 3)))
