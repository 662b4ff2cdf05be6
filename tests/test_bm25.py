"""The batched bm25 (ris_core/search/bm25.py) ranks exactly as SQLite FTS5's bm25() does.

Real queries: every strategy applied to the committed reference evaluation's captions (greedy, reranked and
true names), searched in the bundled demo catalog. Ties break by product id in both paths.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ris_core.data import load_catalog
from ris_core.search.catalog import CatalogIndex, fts_query, query_terms
from ris_core.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ROOT / "results/runs/reference-cpu/eval/captions.csv"


@pytest.fixture(scope="module")
def demo_index() -> CatalogIndex:
    catalog = load_catalog(ROOT / "data/demo")
    return CatalogIndex.build(catalog.products, catalog.image_dir)


def real_queries(n: int = 150) -> list[str]:
    captions = pd.read_csv(CAPTIONS, keep_default_na=False).head(n)
    texts = [*captions["generated"], *captions["reranked"], *captions["reference"]]
    return [fn(text) for fn in STRATEGIES.values() for text in texts]


def fts5_ranking(index: CatalogIndex, query: str, k: int) -> list[tuple[int, float]]:
    match = fts_query(query_terms(query))
    return [(pid, score) for pid, _, _, score in index._fts5(match, k)] if match else []


@pytest.mark.parametrize("k", [10, 100])
def test_batched_bm25_ranks_real_queries_exactly_as_fts5(demo_index: CatalogIndex, k: int) -> None:
    queries = real_queries()
    batched = demo_index.search_many(queries, k=k)
    differing = []
    for query, response in zip(queries, batched, strict=True):
        expected = fts5_ranking(demo_index, query, k)
        got = [(r.product_id, r.score) for r in response.results]
        if [pid for pid, _ in got] != [pid for pid, _ in expected]:
            differing.append(query)
        assert all(abs(a[1] - b[1]) <= 1e-9 * max(1.0, abs(b[1])) for a, b in zip(got, expected))
    assert len(queries) > 2000 and not differing, differing[:5]


def test_titles_and_images_come_with_the_batched_results(demo_index: CatalogIndex) -> None:
    catalog = load_catalog(ROOT / "data/demo")
    first = demo_index.search("black watch", k=3).results
    assert [r.rank for r in first] == [1, 2, 3]
    for result in first:
        assert result.title == catalog.products.loc[result.product_id, "productDisplayName"]
        assert Path(result.image).name == f"{result.product_id}.jpg"


def products(names: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"id": range(1, len(names) + 1), "productDisplayName": names}).set_index("id")


def test_ties_break_by_product_id_and_k_cuts_inside_a_tie() -> None:
    index = CatalogIndex.build(products(["Blue Shirt", "Red Shirt", "Blue Shirt", "Blue Shirt"]), Path("/i"))
    assert [r.product_id for r in index.search("blue shirt", k=2).results] == [1, 3]
    assert [r.product_id for r in index.search("blue shirt", k=2).results] == \
        [pid for pid, _ in fts5_ranking(index, "blue shirt", 2)]


def test_accents_phrases_and_odd_text_match_fts5() -> None:
    names = ["Café Crème Top", "Cafe Shirt", "हिन्दी कुर्ता", "Straße Shoes", "Nike 2 Pack Socks", ""]
    index = CatalogIndex.build(products(names), Path("/i"))
    queries = ["café cafe", "CAFE", "हिन्दी", "हिन्दी shirt", "strasse", "straße", "2", "", "👕", '"OR" NOT *',
               "x" * 5000, "shirt " * 200]
    for query, response in zip(queries, index.search_many(queries, k=5), strict=True):
        assert [(r.product_id, round(r.score, 9)) for r in response.results] == \
            [(pid, round(score, 9)) for pid, score in fts5_ranking(index, query, 5)], query
    # two query terms with one token are two phrases to FTS5: "café cafe" scores above "cafe" alone
    assert index.search("café cafe").results[0].score > index.search("cafe").results[0].score
    assert index.matrix.phrase_terms(query_terms("हिन्दी"))  # Devanagari splits into a phrase: FTS5 answers it


def test_a_query_batch_larger_than_one_chunk_keeps_its_order(demo_index: CatalogIndex) -> None:
    queries = [("black watch", "red dress")[i % 2] for i in range(600)]  # more than QUERY_CHUNK = 256
    tops = [r.results[0].product_id for r in demo_index.search_many(queries, k=1)]
    assert tops[0::2] == [tops[0]] * 300 and tops[1::2] == [tops[1]] * 300 and tops[0] != tops[1]


def test_a_catalog_too_large_for_one_product_is_scored_in_smaller_chunks(demo_index, monkeypatch) -> None:
    from ris_core.search import bm25

    queries = real_queries(20)
    expected = [[r.product_id for r in response.results] for response in demo_index.search_many(queries, k=10)]
    monkeypatch.setattr(bm25, "MAX_SCORES", len(demo_index))  # one query per product
    assert [[r.product_id for r in response.results] for response in demo_index.search_many(queries, k=10)] \
        == expected


@pytest.mark.parametrize("k", [1, 10, 100])
def test_the_top_k_of_long_rows_is_the_full_sort_s_ties_included(k: int) -> None:
    """`_best` narrows a long row by the k-th largest of a sample before selecting: the same k as a full sort by
    (score descending, row ascending), with scores drawn from few values so that ties cross the k-th place."""
    import numpy as np

    from ris_core.search.bm25 import _best

    rng = np.random.default_rng(0)
    for n in (k + 1, 64 * k, 20_000):
        rows = np.sort(rng.choice(100_000, size=n, replace=False))
        scores = rng.choice(rng.random(40), size=n)  # 40 distinct values: many ties
        expected = sorted(zip(rows.tolist(), scores.tolist()), key=lambda pair: (-pair[1], pair[0]))[:k]
        assert _best(rows, scores, k) == expected
