"""Catalog text search: index time for the full 44k products, query latency, and the speed-up over a Python loop;
batch retrieval (one sparse product per strategy, as the evaluation searches) beside FTS5 query by query.

Queries are what the evaluation sends: every strategy applied to a seeded sample of real product names (the
oracle queries), e.g. last_two_words gives "Blue Shirt" and full_caption the whole name.
"""

from __future__ import annotations

import random
import time

import pandas as pd

from bench.common import FULL_SMALL, ms, percentile
from ris_core.data import DEFAULT_DATA_DIR, load_catalog
from ris_core.search.catalog import CatalogIndex, fts_query, naive_search, query_terms
from ris_core.strategies import STRATEGIES

FULL_PRODUCTS = 44_000
EVAL_QUERIES = 4_443  # the reference evaluation's held-out products: one strategy's batch


def products(quick: bool) -> tuple[pd.DataFrame, str]:
    """The full small dataset when present, else data/demo's rows replicated (new ids) up to 44k."""
    if not quick and (FULL_SMALL / "styles.csv").is_file():
        catalog = load_catalog(FULL_SMALL, require_images=False)  # the index stores image paths, never reads them
        return catalog.products, f"{FULL_SMALL} ({len(catalog):,} products)"
    demo = load_catalog(DEFAULT_DATA_DIR, require_images=False).products
    target = 3_000 if quick else FULL_PRODUCTS
    copies = -(-target // len(demo))
    frames = [demo.set_axis(demo.index + k * 10_000_000) for k in range(copies)]
    frame = pd.concat(frames).iloc[:target]
    return frame, f"data/demo's {len(demo):,} rows replicated to {len(frame):,}"


def realistic_queries(frame: pd.DataFrame, count: int, seed: int = 0) -> list[str]:
    names = frame["productDisplayName"].dropna().astype(str).tolist()
    rng = random.Random(seed)
    sample = rng.sample(names, min(len(names), count // len(STRATEGIES) + 1))
    queries = [fn(name) for name in sample for fn in STRATEGIES.values()]
    return [q for q in queries if q][:count]


def latencies(search, queries: list[str]) -> list[float]:
    out = []
    for query in queries:
        start = time.perf_counter()
        search(query)
        out.append(time.perf_counter() - start)
    return out


def bench_search(quick: bool = False) -> dict:
    frame, source = products(quick)
    start = time.perf_counter()
    index = CatalogIndex.build(frame, DEFAULT_DATA_DIR / "images")  # in memory, as the dashboard and evaluation do
    index_seconds = time.perf_counter() - start
    start = time.perf_counter()
    index.matrix  # noqa: B018 - built on first use; timed apart from the queries
    matrix_seconds = time.perf_counter() - start
    queries = realistic_queries(frame, 40 if quick else 500)
    latencies(lambda q: index.search(q, k=10), queries[:10])  # warm-up: page cache, statement cache
    fts = latencies(lambda q: index.search(q, k=10), queries)
    per_strategy = {name: latencies(lambda q: index.search(q, k=10), [fn(q) for q in queries[:200]])
                    for name, fn in STRATEGIES.items()}
    subset = queries[: 5 if quick else 40]  # the loop is slow: time it on fewer queries, FTS5 on the same ones
    naive = latencies(lambda q: naive_search(frame, q, k=10), subset)
    fts_subset = latencies(lambda q: index.search(q, k=10), subset)
    return {
        "catalog": source, "products": len(frame), "queries": len(queries),
        "index_seconds": round(index_seconds, 2), "bm25_matrix_seconds": round(matrix_seconds, 2),
        "query_p50_ms": ms(percentile(fts, 50)), "query_p99_ms": ms(percentile(fts, 99)),
        "query_max_ms": ms(max(fts)),
        "query_p99_ms_worst_strategy": max(ms(percentile(v, 99)) for v in per_strategy.values()),
        "query_p50_ms_per_strategy": {name: ms(percentile(v, 50)) for name, v in per_strategy.items()},
        "naive_queries": len(subset), "naive_p50_ms": ms(percentile(naive, 50)),
        "naive_over_fts_p50": round(percentile(naive, 50) / percentile(fts_subset, 50), 1),
        "naive_over_fts_mean": round(sum(naive) / sum(fts_subset), 1),
        **batch_retrieval(index, frame, 300 if quick else EVAL_QUERIES),
    }


def batch_retrieval(index: CatalogIndex, frame: pd.DataFrame, count: int) -> dict:
    """One strategy's queries scored at once (the evaluation's path) beside SQLite FTS5 one query at a time."""
    names = frame["productDisplayName"].dropna().astype(str).tolist()
    queries = [STRATEGIES["full_caption"](n) for n in random.Random(1).sample(names, min(count, len(names)))]
    start = time.perf_counter()
    batched = index.search_many(queries, k=10)
    batch_seconds = time.perf_counter() - start
    sample = queries[:500]  # FTS5 takes ~20 ms a query: time 500 and scale, the rankings compared on those
    start = time.perf_counter()
    one_by_one = [index._fts5(fts_query(query_terms(q)), 10) for q in sample]
    fts5_seconds = (time.perf_counter() - start) * len(queries) / len(sample)
    same = sum([r.product_id for r in b.results] == [row[0] for row in f] for b, f in zip(batched, one_by_one))
    return {"batch_queries": len(queries), "batch_strategy": "full_caption",
            "batch_seconds": round(batch_seconds, 2), "fts5_one_by_one_seconds_scaled": round(fts5_seconds, 1),
            "fts5_over_batch": round(fts5_seconds / batch_seconds, 1),
            "batch_identical_rankings": f"{same}/{len(sample)}"}
