"""Search backends: catalog FTS5 (ranking, hostile queries, reuse), DuckDuckGo with a fake DDGS, image kNN.

Everything is offline and in-memory or under tmp_path: no network, no /work/shared, no real sleeping.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException

from ris_core.search import SearchResponse, SearchUnavailable, search_safely
from ris_core.search.catalog import MAX_TERMS, CatalogIndex, fts_query, naive_search, query_terms
from ris_core.search.duckduckgo import DuckDuckGoImages
from ris_core.search.image_knn import ImageKnnIndex

IMAGE_DIR = Path("/images")


def make_products() -> pd.DataFrame:
    rows = [
        (1, "Men", "Apparel", "Topwear", "Shirts", "Red", "Summer", "Casual", "Roadster Men Red Cotton Shirt"),
        (2, "Men", "Apparel", "Topwear", "Shirts", "Blue", "Summer", "Casual", "Roadster Men Blue Cotton Shirt"),
        (3, "Women", "Footwear", "Shoes", "Heels", "Red", "Winter", "Party", "Catwalk Women Red Leather Heels"),
        (4, "Men", "Apparel", "Bottomwear", "Jeans", "Blue", "Fall", "Casual", "Levis Men Blue Denim Jeans"),
        (5, "Women", "Accessories", "Watches", "Watches", "Black", "Winter", "Formal", "Titan Women Black Watch"),
        (6, "Men", "Apparel", "Topwear", "Tshirts", "Black", "Summer", "Sports", "Nike Men Black Polo Tshirt"),
        (7, "Women", "Apparel", "Topwear", "Tops", "White", "Summer", "Casual", "Café Crème Women Top"),
        (8, "Women", "Accessories", "Scarves", "Scarves", "Blue", "Winter", "Casual", "شال أزرق"),
    ]
    columns = ["id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage",
               "productDisplayName"]
    return pd.DataFrame(rows, columns=columns).set_index("id")


@pytest.fixture(scope="module")
def index() -> CatalogIndex:
    return CatalogIndex.build(make_products(), IMAGE_DIR)


def ids(response: SearchResponse) -> list[int]:
    return [r.product_id for r in response.results]


# ---------------------------------------------------------------- catalog: ranking


def test_bm25_ranks_full_match_above_partial_matches(index: CatalogIndex) -> None:
    response = index.search("red cotton shirt", k=10)
    assert response.backend == "catalog" and response.error is None
    assert ids(response)[0] == 1  # matches all three words
    assert set(ids(response)) >= {2, 3}  # one or two words only, still found in "any" mode
    assert ids(response).index(1) < ids(response).index(3)
    scores = [r.score for r in response.results]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]
    assert [r.rank for r in response.results] == list(range(1, len(scores) + 1))
    top = response.results[0]
    assert top.title == "Roadster Men Red Cotton Shirt" and top.image == str(IMAGE_DIR / "1.jpg")


def test_name_weighs_more_than_attributes() -> None:
    base = {"gender": "Men", "masterCategory": "Apparel", "subCategory": "Topwear", "articleType": "Tshirts",
            "season": "Summer", "usage": "Casual"}
    products = pd.DataFrame(
        [{**base, "baseColour": "Black", "productDisplayName": "Nike Red Polo Tshirt"},
         {**base, "baseColour": "Red", "productDisplayName": "Nike Blue Polo Tshirt"}],
        index=[10, 20],
    )
    assert ids(CatalogIndex.build(products, IMAGE_DIR).search("red")) == [10, 20]


def test_k_limits_and_len(index: CatalogIndex) -> None:
    assert len(index) == 8
    assert len(index.search("men", k=2).results) == 2
    assert index.search("men", k=0).results == []


def test_mode_all_requires_every_word(index: CatalogIndex) -> None:
    assert set(ids(index.search("red shirt", mode="any"))) == {1, 2, 3}
    assert ids(index.search("red shirt", mode="all")) == [1]
    assert ids(index.search("red shirt watch", mode="all")) == []
    with pytest.raises(ValueError):
        index.search("red", mode="fuzzy")


def test_diacritics_and_non_latin_text_match(index: CatalogIndex) -> None:
    assert ids(index.search("cafe creme")) == [7]
    assert ids(index.search("شال")) == [8]


HOSTILE = [
    '"', "'", "*", "NEAR(a b)", "a AND", "OR", "-shirt", "name:shirt", "(((", "\x00", "\x01\x02\x1b[31m\x7f",
    "x" * 10000, "شال أزرق", "👕 shirt", "^shirt", "", "   \t\n ", "shirt\x00red", "\ud800 lone surrogate",
    "AND OR NOT", '"unbalanced', "shirt*", "{name}: red", "\u202eshirt\u200f", "NOT shirt",
]


@pytest.mark.parametrize("mode", ["any", "all"])
@pytest.mark.parametrize("query", HOSTILE, ids=lambda q: repr(q[:12]))
def test_hostile_queries_never_raise(index: CatalogIndex, query: str, mode: str) -> None:
    response = index.search(query, k=5, mode=mode)
    assert isinstance(response.results, list) and response.error is None
    assert all(isinstance(r.product_id, int) for r in response.results)


def test_operators_are_plain_words(index: CatalogIndex) -> None:
    shirts = {1, 2}
    # As FTS syntax these would be NOT shirt / a column filter / a prefix query; as words they find shirts.
    assert set(ids(index.search("-shirt"))) == shirts
    assert set(ids(index.search("NOT shirt", mode="all"))) == set()  # "not" is a word no product has
    assert shirts <= set(ids(index.search("name:shirt")))
    assert set(ids(index.search("^shirt"))) == shirts
    assert ids(index.search("shir*")) == []  # no prefix matching
    assert ids(index.search("👕 shirt")) == ids(index.search("shirt"))


def test_query_terms_are_bounded_and_clean() -> None:
    assert query_terms("Red  RED red, Shirt!") == ["red", "shirt"]
    assert query_terms("\x00\x01 ((( * ") == []
    assert query_terms(" ".join(f"w{i}" for i in range(500))) == [f"w{i}" for i in range(MAX_TERMS)]
    assert query_terms("x" * 10000) == ["x" * 10000]
    # Every term is an FTS5 string even if it looks like an operator (defence in depth beyond lowercasing).
    assert fts_query(["NEAR", 'a"b'], "any") == '"NEAR" OR "a""b"'
    assert fts_query(["red", "shirt"], "all") == '"red" AND "shirt"'
    assert fts_query([], "any") == ""


# ---------------------------------------------------------------- catalog: reuse, rebuild, baseline


def test_index_file_reused_then_rebuilt(tmp_path: Path) -> None:
    db = tmp_path / "idx" / "catalog.sqlite"
    products = make_products()
    first = CatalogIndex.build(products, IMAGE_DIR, db)
    assert not first.reused and len(first) == 8
    again = CatalogIndex.build(products, IMAGE_DIR, db)
    assert again.reused and ids(again.search("watch")) == [5]

    changed = products.copy()
    changed.loc[5, "productDisplayName"] = "Titan Women Black Wristwatch"
    rebuilt = CatalogIndex.build(changed, IMAGE_DIR, db)
    assert not rebuilt.reused
    assert ids(rebuilt.search("wristwatch")) == [5]
    assert ids(CatalogIndex.open(db).search("wristwatch")) == [5]
    assert ids(again.search("watch")) == [5]  # an open reader keeps its (old) snapshot: replace was atomic

    db.write_bytes(b"not a database at all")
    assert not CatalogIndex.build(products, IMAGE_DIR, db).reused
    assert sorted(p.name for p in db.parent.iterdir()) == ["catalog.sqlite"]  # no temp files left behind


def test_open_missing_or_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        CatalogIndex.open(tmp_path / "missing.sqlite")
    (tmp_path / "junk.sqlite").write_text("junk")
    with pytest.raises(ValueError):
        CatalogIndex.open(tmp_path / "junk.sqlite")


def test_naive_baseline_agrees_on_top_match(index: CatalogIndex) -> None:
    products = make_products()
    for query in ["red cotton shirt", "blue denim jeans", "black watch"]:
        naive = naive_search(products, query, k=3, image_dir=IMAGE_DIR)
        assert naive.results[0].product_id == index.search(query, k=3).results[0].product_id
    assert naive_search(products, "((( *", k=3).results == []


# ---------------------------------------------------------------- DuckDuckGo (fake DDGS, fake time)


class FakeTime:
    """A clock that only moves when someone sleeps; records every sleep."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeDDGS:
    """Stands in for ddgs.DDGS: pops scripted outcomes (an exception to raise, or None for success)."""

    def __init__(self, script: list[BaseException | None] | None = None, time: FakeTime | None = None) -> None:
        self.script = list(script or [])
        self.time = time
        self.calls: list[tuple[str, dict]] = []
        self.call_times: list[float] = []

    def __call__(self) -> FakeDDGS:  # used as the factory
        return self

    def images(self, query: str, **kwargs: object) -> list[dict]:
        self.calls.append((query, kwargs))
        if self.time is not None:
            self.call_times.append(self.time.now)
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome
        return [
            {"title": f"{query} #{i}", "image": f"https://img.example/{i}.jpg",
             "thumbnail": f"https://tse.example/{i}.jpg", "url": f"https://shop.example/{i}", "height": 80,
             "width": 60, "source": "Bing"}
            for i in range(int(kwargs.get("max_results", 10)))
        ]


def make_ddg(tmp_path: Path, fake: FakeDDGS, t: FakeTime, **kwargs: object) -> DuckDuckGoImages:
    return DuckDuckGoImages(cache_path=tmp_path / "ddg.sqlite", ddgs_factory=fake, sleep=t.sleep, clock=t.clock,
                            **kwargs)


def test_ddg_success_maps_results(tmp_path: Path) -> None:
    t = FakeTime()
    fake = FakeDDGS(time=t)
    response = make_ddg(tmp_path, fake, t).search("navy blue shirt", k=3)
    assert response.backend == "duckduckgo" and not response.from_cache and response.error is None
    assert [r.rank for r in response.results] == [1, 2, 3]
    first = response.results[0]
    assert (first.title, first.image, first.thumbnail, first.source_url) == (
        "navy blue shirt #0", "https://img.example/0.jpg", "https://tse.example/0.jpg", "https://shop.example/0")
    assert first.product_id is None
    query, kwargs = fake.calls[0]
    assert query == "navy blue shirt" and kwargs["backend"] == "duckduckgo" and kwargs["max_results"] == 3


def test_ddg_rate_limit_backoff_then_success_and_min_interval(tmp_path: Path) -> None:
    t = FakeTime()
    fake = FakeDDGS([RatelimitException("202 Ratelimit"), TimeoutException("timed out")], time=t)
    ddg = make_ddg(tmp_path, fake, t, min_interval=0.1, backoff=2.0)  # below the 1 s floor: clamped
    assert ddg.min_interval == 1.0
    response = ddg.search("red dress", k=2)
    assert len(response.results) == 2 and len(fake.calls) == 3
    backoffs = t.sleeps[:2]
    assert 2.0 <= backoffs[0] < backoffs[1]  # exponential: ~2 s then ~4 s, plus jitter

    ddg.search("blue jeans", k=2)  # immediately afterwards: must wait for the 1 s interval
    assert t.sleeps[-1] == pytest.approx(1.0)
    DuckDuckGoImages(cache_path=tmp_path / "other.sqlite", ddgs_factory=fake, sleep=t.sleep,
                     clock=t.clock).search("green hat", k=2)  # another instance shares the schedule
    gaps = np.diff(fake.call_times)
    assert len(gaps) == 4 and (gaps >= 1.0 - 1e-9).all()


def test_ddg_rate_limit_exhausted(tmp_path: Path) -> None:
    t = FakeTime()
    fake = FakeDDGS([RatelimitException("403")] * 10, time=t)
    with pytest.raises(SearchUnavailable, match="rate-limited us 4 times"):
        make_ddg(tmp_path, fake, t, max_retries=3).search("shoes")
    assert len(fake.calls) == 4


@pytest.mark.parametrize(
    "error, expected",
    [
        (DDGSException("ConnectError: error sending request\nTraceback (most recent call last):\n  File x"),
         "ConnectError"),
        (OSError("Network is unreachable"), "OSError"),
        (DDGSException("No results found."), "no results"),
    ],
)
def test_ddg_permanent_failure_is_one_line_and_not_retried(tmp_path: Path, error: Exception, expected: str) -> None:
    t = FakeTime()
    fake = FakeDDGS([error], time=t)
    ddg = make_ddg(tmp_path, fake, t)
    with pytest.raises(SearchUnavailable) as info:
        ddg.search("shirt")
    message = str(info.value)
    assert expected in message and "\n" not in message and "Traceback" not in message
    assert len(fake.calls) == 1 and t.sleeps == []

    fake.script = [error]
    safe = search_safely(ddg, "shirt", 5)  # a failed search becomes a response, never an exception
    assert safe.results == [] and safe.error == message and safe.backend == "duckduckgo"


def test_ddg_cache_hit_and_ttl_expiry(tmp_path: Path) -> None:
    t = FakeTime()
    fake = FakeDDGS(time=t)
    ddg = make_ddg(tmp_path, fake, t, ttl_seconds=60)
    live = ddg.search("white sneakers", k=4)
    cached = ddg.search("  white   sneakers ", k=4)
    assert len(fake.calls) == 1 and cached.from_cache and not live.from_cache
    assert cached.results == live.results
    assert make_ddg(tmp_path, fake, t).search("white sneakers", k=4).from_cache  # persists across instances
    ddg.search("white sneakers", k=5)  # different parameters, different key
    assert len(fake.calls) == 2

    t.now += 61
    refreshed = ddg.search("white sneakers", k=4)
    assert not refreshed.from_cache and len(fake.calls) == 3


def test_ddg_replay_mode(tmp_path: Path) -> None:
    t = FakeTime()
    fake = FakeDDGS(time=t)
    make_ddg(tmp_path, fake, t).search("black boots", k=2)
    t.now += 365 * 24 * 3600  # long expired: replay serves it anyway
    replay = make_ddg(tmp_path, fake, t, replay=True)
    hit = replay.search("black boots", k=2)
    assert hit.from_cache and len(hit.results) == 2 and len(fake.calls) == 1
    with pytest.raises(SearchUnavailable, match=r"no cached results .* \(replay mode\)"):
        replay.search("never searched", k=2)
    assert len(fake.calls) == 1


def _write_cache_entries(path: str, worker: int, count: int) -> None:
    t = FakeTime()
    ddg = DuckDuckGoImages(cache_path=path, ddgs_factory=FakeDDGS(), sleep=t.sleep, clock=t.clock)
    for i in range(count):
        ddg.search(f"worker {worker} query {i}", k=1)


def test_ddg_cache_survives_concurrent_writers(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    workers = [context.Process(target=_write_cache_entries, args=(path, w, 50)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=60)
    assert [p.exitcode for p in workers] == [0, 0]

    t = FakeTime()
    fake = FakeDDGS()
    replay = DuckDuckGoImages(cache_path=path, replay=True, ddgs_factory=fake, sleep=t.sleep, clock=t.clock)
    assert len(replay.cache) == 100
    for w in range(2):
        for i in range(50):
            response = replay.search(f"worker {w} query {i}", k=1)
            assert response.from_cache and response.results[0].title == f"worker {w} query {i} #0"
    assert fake.calls == []


def test_search_safely_contains_any_exception() -> None:
    class Broken:
        name = "broken"

        def search(self, query: str, k: int = 10) -> SearchResponse:
            raise KeyError("boom\nsecond line")

    response = search_safely(Broken(), "q", 3)
    assert response.backend == "broken" and response.results == [] and response.error
    assert "KeyError" in response.error and "\n" not in response.error


# ---------------------------------------------------------------- image kNN


def make_knn(n: int = 30, dim: int = 16) -> tuple[ImageKnnIndex, np.ndarray]:
    vectors = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32) * 3  # deliberately not unit length
    product_ids = np.arange(100, 100 + n)
    knn = ImageKnnIndex(product_ids, vectors, [f"/img/{i}.jpg" for i in product_ids],
                        [f"product {i}" for i in product_ids])
    return knn, vectors


def test_knn_top1_is_own_vector_and_exclude() -> None:
    knn, vectors = make_knn()
    response = knn.search_vector(vectors[7] * 10, k=5)
    assert response.backend == "image_knn" and ids(response)[0] == 107
    assert response.results[0].score == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(np.linalg.norm(knn.vectors, axis=1), 1.0, atol=1e-5)
    scores = [r.score for r in response.results]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5

    excluded = knn.search_vector(vectors[7], k=5, exclude_id=107)
    assert 107 not in ids(excluded) and len(excluded.results) == 5
    assert ids(excluded) == ids(response)[1:] + ids(excluded)[4:]  # same order, shifted by one
    assert len(knn.search_vector(vectors[0], k=1000, exclude_id=100).results) == 29
    with pytest.raises(ValueError):
        knn.search_vector(np.ones(3))


def test_knn_batch_search_ranks_as_one_query_at_a_time() -> None:
    knn, vectors = make_knn(n=300)
    queries = np.concatenate([vectors[:20] * 2, vectors[:1] * 0, np.repeat(vectors[5:6], 3, axis=0)])  # + a zero row
    batched = knn.search_vectors(queries, k=7, chunk=8)  # several chunks, one of them partial
    assert len(batched) == len(queries)
    for query, response in zip(queries, batched, strict=True):
        alone = knn.search_vector(query, k=7)
        assert ids(response) == ids(alone)
        assert [r.score for r in response.results] == pytest.approx([r.score for r in alone.results], abs=1e-5)
    assert ids(batched[0])[0] == 100 and len(knn.search_vectors(queries[:2], k=1000)[0].results) == 300
    assert knn.search_vectors(np.zeros((0, 16)), k=3) == []
    with pytest.raises(ValueError, match="dimensions"):
        knn.search_vectors(np.ones((2, 3)))


def test_knn_save_load_round_trip(tmp_path: Path) -> None:
    knn, vectors = make_knn()
    saved = knn.save(tmp_path / "knn")
    assert saved.name == "knn.npz" and (tmp_path / "knn.json").is_file()
    with np.load(saved, allow_pickle=False) as arrays:
        assert set(arrays.files) == {"ids", "vectors"} and arrays["vectors"].dtype == np.float32
    loaded = ImageKnnIndex.load(tmp_path / "knn.npz")
    assert np.array_equal(loaded.ids, knn.ids) and np.allclose(loaded.vectors, knn.vectors)
    assert loaded.names == knn.names and loaded.image_paths == knn.image_paths
    assert loaded.search_vector(vectors[3], k=4).results == knn.search_vector(vectors[3], k=4).results
