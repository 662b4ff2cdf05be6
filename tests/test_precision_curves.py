"""P@k curves recomputed from stored top-k ids judge relevance as the evaluation does."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ris_core.evaluation.precision_curves import precision_curves, relevance_at_ranks
from ris_core.metrics import is_relevant, precision_at_k

PRODUCTS = pd.DataFrame({"articleType": ["Shirts", " shirts", "Shoes", None, "Shirts"],
                         "baseColour": ["Blue", "blue", "Blue", "Blue", None]}, index=[1, 2, 3, 4, 5])


def test_relevance_matches_is_relevant_rank_by_rank_and_short_lists_count_as_misses():
    retrieval = pd.DataFrame({"id": [1, 4, 2], "strategy": "s", "source": "caption",
                              "hits": ["2 3 4 5", "1 2", ""]})
    for level in ("R1", "R2"):
        rel = relevance_at_ranks(retrieval, PRODUCTS, level, k=4)
        for row, (query, hits) in enumerate(zip(retrieval["id"], retrieval["hits"])):
            ids = [int(h) for h in hits.split()]
            expected = [is_relevant(PRODUCTS.loc[query].to_dict(), PRODUCTS.loc[h].to_dict(), level) for h in ids]
            assert rel[row].tolist() == expected + [False] * (4 - len(ids)), (level, query)
    assert relevance_at_ranks(retrieval, PRODUCTS, "R1", k=4)[0].tolist() == [True, False, False, True]
    with pytest.raises(KeyError, match="unknown relevance level"):
        relevance_at_ranks(retrieval, PRODUCTS, "R9")


def test_curves_are_mean_precision_at_each_k_with_a_band_around_it():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 6, size=(200, 5))
    retrieval = pd.DataFrame({"id": rng.integers(1, 6, 200), "strategy": np.where(np.arange(200) < 100, "a", "b"),
                              "source": "caption", "hits": [" ".join(map(str, r)) for r in ids]})
    curves = precision_curves(retrieval, PRODUCTS, "R1", k=5, n_boot=200)
    assert sorted(curves["strategy"].unique()) == ["a", "b"] and curves["k"].max() == 5
    rel = relevance_at_ranks(retrieval, PRODUCTS, "R1", k=5)
    for strategy, rows in (("a", slice(0, 100)), ("b", slice(100, 200))):
        for k in (1, 3, 5):
            row = curves[(curves["strategy"] == strategy) & (curves["k"] == k)].iloc[0]
            assert row["precision"] == pytest.approx(np.mean([precision_at_k(r, k) for r in rel[rows]]))
            assert row["low"] <= row["precision"] <= row["high"] and row["high"] - row["low"] > 0
    only_b = precision_curves(retrieval, PRODUCTS, "R1", k=5, strategies=["b"], n_boot=200)
    assert set(only_b["strategy"]) == {"b"} and (only_b["n"] == 100).all()
