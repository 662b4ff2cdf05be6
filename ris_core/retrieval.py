"""Retrieval evaluation: judge ranked results by known attributes, aggregate with bootstrap intervals.

A query product's results are relevant at level R1 (same articleType), R2 (+ baseColour) or
R3 (+ gender); see `ris_core.metrics.RELEVANCE_LEVELS`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ris_core.metrics import RELEVANCE_LEVELS, bootstrap_ci, paired_bootstrap_diff, ranking_metrics

METRICS = ["p_at_1", "p_at_5", "p_at_10", "mrr", "ndcg_at_10", "zero_hit"]


def relevant_counts(catalog: pd.DataFrame, level: str) -> pd.Series:
    """How many catalog products share each attribute combination (the ideal for nDCG)."""
    return catalog.groupby(list(RELEVANCE_LEVELS[level]), dropna=True).size()


def judge_rankings(hits: list[list[int]], query_ids: list[int], products: pd.DataFrame,
                   catalog: pd.DataFrame) -> pd.DataFrame:
    """Per query and level: ranking metrics of its hit list (columns `<level>_<metric>`)."""
    rows = []
    counts = {level: relevant_counts(catalog, level) for level in RELEVANCE_LEVELS}
    attrs = products.loc[query_ids]
    for qid, ranked in zip(query_ids, hits):
        row: dict[str, float] = {}
        query = attrs.loc[qid]
        for level in RELEVANCE_LEVELS:
            columns = list(RELEVANCE_LEVELS[level])
            key = tuple(query[c] for c in columns)
            if any(pd.isna(v) for v in key):
                relevance, total = [0] * len(ranked), 0
            else:
                found = catalog.loc[ranked, columns] if ranked else catalog.iloc[:0][columns]
                relevance = (found.to_numpy() == np.array(key, dtype=object)).all(axis=1).astype(int).tolist()
                total = int(counts[level].get(key if len(key) > 1 else key[0], 0))
            for name, value in ranking_metrics(relevance, n_relevant_total=total).items():
                row[f"{level}_{name}"] = value
        rows.append(row)
    return pd.DataFrame(rows, index=pd.Index(query_ids, name="id"))


def summarize(per_query: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """One row per (strategy, level): mean and 95% bootstrap interval of every metric."""
    rows = []
    for strategy, group in per_query.groupby("strategy", sort=False):
        for level in RELEVANCE_LEVELS:
            row = {"strategy": strategy, "source": group["source"].iloc[0], "level": level, "n": len(group)}
            for metric in METRICS:
                mean, low, high = bootstrap_ci(group[f"{level}_{metric}"].to_numpy(float), n_boot=n_boot, seed=seed)
                row[metric], row[f"{metric}_ci"] = mean, [low, high]
            rows.append(row)
    return rows


def paired_difference(per_query: pd.DataFrame, a: str, b: str, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean of (a - b) per query with its 95% interval, for every level and metric; same queries only."""
    left = per_query[per_query["strategy"] == a].set_index("id")
    right = per_query[per_query["strategy"] == b].set_index("id")
    common = left.index.intersection(right.index)
    out: dict = {"a": a, "b": b, "n": len(common)}
    for level in RELEVANCE_LEVELS:
        for metric in METRICS:
            column = f"{level}_{metric}"
            diff, low, high = paired_bootstrap_diff(left.loc[common, column].to_numpy(float),
                                                    right.loc[common, column].to_numpy(float),
                                                    n_boot=n_boot, seed=seed)
            out[column] = {"diff": diff, "ci": [low, high]}
    return out
