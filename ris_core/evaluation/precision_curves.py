"""Precision at every cut-off k = 1..K per strategy, with 95% bootstrap bands, from an evaluation's retrieval.csv.

The evaluation stores each query's top-K product ids (`hits`); relevance at each rank is recomputed from the
catalog's attributes exactly as `ris_core.metrics.is_relevant` judges it (case-folded, missing never matches),
so the curve at k = 1, 5, 10 equals the evaluation's own P@1, P@5 and P@10.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ris_core.metrics import RELEVANCE_LEVELS, _attr_key, _resample_counts


def _keys(frame: pd.DataFrame, attrs: tuple[str, ...]) -> pd.Series:
    """One comparable key per product for `attrs`; NaN when any attribute is missing (never relevant)."""
    keys = pd.Series("", index=frame.index, dtype=object)
    for a in attrs:
        part = frame[a].map(_attr_key) if a in frame else pd.Series(None, index=frame.index, dtype=object)
        keys = keys + "\x1f" + part  # a missing part (None) makes the whole key NaN
    return keys


def relevance_at_ranks(retrieval: pd.DataFrame, products: pd.DataFrame, level: str, k: int = 10) -> np.ndarray:
    """(rows of `retrieval`, k) booleans: is the result at each rank relevant to the row's query product?
    Ranks past the end of a shorter result list are not relevant (P@k keeps k as its denominator)."""
    if level not in RELEVANCE_LEVELS:
        raise KeyError(f"unknown relevance level {level!r}; known: {sorted(RELEVANCE_LEVELS)}")
    keys = _keys(products, RELEVANCE_LEVELS[level])
    hits = retrieval["hits"].fillna("").astype(str).str.split()
    ranked = np.full((len(retrieval), k), -1, dtype=np.int64)
    for row, ids in enumerate(hits):
        top = [int(i) for i in ids[:k]]
        ranked[row, : len(top)] = top
    result_keys = keys.reindex(ranked.ravel()).to_numpy().reshape(ranked.shape)
    query_keys = keys.reindex(retrieval["id"].astype(np.int64)).to_numpy()[:, None]
    known = pd.notna(result_keys) & pd.notna(query_keys)
    return known & (result_keys == query_keys)


def precision_curves(retrieval: pd.DataFrame, products: pd.DataFrame, level: str, k: int = 10,
                     strategies: list[str] | None = None, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Rows (strategy, source, k, precision, low, high, n): mean P@k over each strategy's queries and its
    percentile-bootstrap 95% interval (the evaluation's own resampling: same seed, same draws)."""
    rows = retrieval if strategies is None else retrieval[retrieval["strategy"].isin(strategies)]
    relevant = relevance_at_ranks(rows, products, level, k)
    precision = np.cumsum(relevant, axis=1) / np.arange(1, k + 1)
    out = []
    for (strategy, source), index in rows.groupby(["strategy", "source"], sort=False).indices.items():
        values = precision[index]
        # every k at once: the same resample counts bootstrap_ci draws, times all k columns
        means = _resample_counts(len(index), n_boot, seed) @ values / len(index)
        low, high = np.quantile(means, [0.025, 0.975], axis=0)
        for cut in range(k):
            out.append({"strategy": strategy, "source": source, "k": cut + 1, "precision": float(values[:, cut].mean()),
                        "low": float(low[cut]), "high": float(high[cut]), "n": len(index)})
    return pd.DataFrame(out)
