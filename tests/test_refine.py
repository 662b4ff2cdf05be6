"""Result refinement with a fake captioner: re-ranking, threshold, failed fetches, the caption cache."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ris_core.captioner import CaptionBatch
from ris_core.refine import (
    MAX_IMAGE_BYTES,
    AgreementWeights,
    CaptionCache,
    FetchError,
    fetch_url,
    refine,
)
from ris_core.search import SearchResult

QUERY_CAPTION = "Nike Men Navy Blue Shirt"
QUERY_EMBEDDING = np.array([1.0, 0.0, 0.0], dtype=np.float32)


class FakeCaptioner:
    """Each test image is one solid colour; the caption is the file name it was written under."""

    def __init__(self) -> None:
        self.by_colour: dict[tuple[int, int, int], tuple[str, np.ndarray]] = {}
        self.captioned = 0
        self.batches: list[int] = []

    def register(self, colour: tuple[int, int, int], caption: str, embedding: list[float]) -> None:
        self.by_colour[colour] = (caption, np.asarray(embedding, dtype=np.float32))

    def run_batch(self, images, references=None, num_beams=1) -> CaptionBatch:
        self.batches.append(len(images))
        self.captioned += len(images)
        found = [self.by_colour[image.getpixel((0, 0))] for image in images]
        return CaptionBatch(captions=[c for c, _ in found], embeddings=np.stack([e for _, e in found]))


def png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def catalog(tmp_path: Path):
    """Four local product images named by their captions, and the fake captioner that 'reads' the names."""
    fake = FakeCaptioner()
    specs = [  # (caption = file name, colour, embedding)
        ("Puma Women Red Heels", (200, 0, 0), [0.0, 1.0, 0.0]),  # nothing in common
        ("Nike Men Navy Blue Shirt", (0, 0, 120), [1.0, 0.0, 0.0]),  # the same product
        ("Roadster Men Blue Shirt", (0, 0, 200), [0.6, 0.8, 0.0]),  # same article, similar image
        ("Nike Men Navy Blue Tshirt", (0, 0, 90), [-1.0, 0.0, 0.0]),  # similar words, opposite image
    ]
    results = []
    for rank, (caption, colour, embedding) in enumerate(specs, start=1):
        path = tmp_path / f"{caption}.png"
        path.write_bytes(png(colour))
        fake.register(colour, path.stem, embedding)
        results.append(SearchResult(rank=rank, title=caption, image=str(path)))
    return fake, results


def test_reranks_by_agreement(catalog):
    fake, results = catalog
    outcome = refine(fake, QUERY_CAPTION, QUERY_EMBEDDING, results)
    assert [r.caption for r in outcome.ranked] == [
        "Nike Men Navy Blue Shirt", "Roadster Men Blue Shirt", "Nike Men Navy Blue Tshirt", "Puma Women Red Heels"]
    assert [r.result.rank for r in outcome.ranked] == [2, 3, 4, 1]  # the backend's ranks are kept
    best, second, third, last = outcome.ranked
    assert best.agreement == pytest.approx(1.0)
    assert best.parts == {"last_word_match": 1.0, "token_jaccard": 1.0, "image_cosine": pytest.approx(1.0)}
    # "roadster men blue shirt" vs "nike men navy blue shirt": {men, blue, shirt} of 6 words; cosine 0.6
    assert second.parts["token_jaccard"] == pytest.approx(3 / 6)
    assert second.agreement == pytest.approx(0.4 * 1 + 0.3 * 0.5 + 0.3 * 0.6)
    # 4 of 6 words shared, different last word, negative cosine clipped to 0
    assert third.parts == {"last_word_match": 0.0, "token_jaccard": pytest.approx(4 / 6), "image_cosine": 0.0}
    assert last.agreement == 0.0
    assert outcome.dropped == 0 and outcome.failed == 0
    assert all(0.0 <= v <= 1.0 for r in outcome.ranked for v in [r.agreement, *r.parts.values()])


def test_custom_weights_change_the_order(catalog):
    fake, results = catalog
    words_only = AgreementWeights(last_word=0.0, tokens=1.0, image=0.0)
    outcome = refine(fake, QUERY_CAPTION, QUERY_EMBEDDING, results, weights=words_only)
    assert [r.result.rank for r in outcome.ranked] == [2, 4, 3, 1]


def test_threshold_drops_and_counts(catalog):
    fake, results = catalog
    outcome = refine(fake, QUERY_CAPTION, QUERY_EMBEDDING, results, threshold=0.5)
    assert [r.result.rank for r in outcome.ranked] == [2, 3]
    assert outcome.dropped == 2 and outcome.failed == 0
    assert all(r.agreement >= 0.5 for r in outcome.ranked)


def test_failed_images_are_skipped_and_counted(catalog, tmp_path):
    fake, results = catalog
    fake.register((0, 120, 0), "Nike Men Green Shirt", [0.8, 0.6, 0.0])
    served = {"https://img.example/ok.png": png((0, 120, 0)), "https://img.example/text.png": b"<html>nope</html>"}
    requested = []

    def fetch(url: str) -> bytes:
        requested.append(url)
        if url not in served:
            raise TimeoutError("timed out")
        return served[url]

    web = [
        SearchResult(rank=5, title="ok", image="https://img.example/full.jpg", thumbnail="https://img.example/ok.png"),
        SearchResult(rank=6, title="not an image", image="https://img.example/text.png"),
        SearchResult(rank=7, title="timeout", image="https://img.example/x.jpg", thumbnail="https://img.example/slow"),
        SearchResult(rank=8, title="gone", image=str(tmp_path / "missing.png")),
    ]
    outcome = refine(fake, QUERY_CAPTION, QUERY_EMBEDDING, results + web, fetch=fetch)
    assert outcome.failed == 3 and len(outcome.ranked) == 5
    assert {r.title for r, _ in outcome.failures} == {"not an image", "timeout", "gone"}
    assert all(why and "\n" not in why for _, why in outcome.failures)
    assert "https://img.example/ok.png" in requested and "https://img.example/full.jpg" not in requested  # thumbnail
    assert "ok" in [r.result.title for r in outcome.ranked]


def test_cache_avoids_recaptioning(catalog, tmp_path):
    fake, results = catalog
    cache = CaptionCache()
    first = refine(fake, QUERY_CAPTION, QUERY_EMBEDDING, results, cache=cache, batch_size=3)
    assert fake.captioned == 4 and fake.batches == [3, 1]  # batched
    second = refine(fake, QUERY_CAPTION, QUERY_EMBEDDING, results, cache=cache)
    assert fake.captioned == 4  # every image was a cache hit
    assert [r.agreement for r in first.ranked] == [r.agreement for r in second.ranked]

    duplicates = [results[0], results[0], results[1]]  # the same image twice in one response
    refine(fake, QUERY_CAPTION, QUERY_EMBEDDING, duplicates)
    assert fake.captioned == 6

    stored = tmp_path / "cache" / "captions.sqlite"
    refine(fake, QUERY_CAPTION, QUERY_EMBEDDING, results, cache=CaptionCache(stored, model_key="run-a"))
    assert fake.captioned == 10
    reopened = CaptionCache(stored, model_key="run-a")
    assert len(reopened) == 4
    again = refine(fake, QUERY_CAPTION, QUERY_EMBEDDING, results, cache=reopened)
    assert fake.captioned == 10 and [r.caption for r in again.ranked] == [r.caption for r in first.ranked]
    refine(fake, QUERY_CAPTION, QUERY_EMBEDDING, results, cache=CaptionCache(stored, model_key="run-b"))
    assert fake.captioned == 14  # another model's captions are not reused


class FakeResponse:
    def __init__(self, body: bytes, length: str | None = None) -> None:
        self.body, self.reads = body, []
        self.headers = {"Content-Length": length} if length else {}

    def read(self, n: int = -1) -> bytes:
        self.reads.append(n)
        return self.body[:n] if n >= 0 else self.body

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def test_fetch_url_caps_size_and_scheme(monkeypatch):
    calls = []

    def fake_urlopen(request, timeout):
        calls.append((request.full_url, timeout))
        return responses.pop(0)

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    big = FakeResponse(b"x" * (MAX_IMAGE_BYTES + 500))
    responses = [FakeResponse(b"small"), big, FakeResponse(b"", length=str(MAX_IMAGE_BYTES * 10))]
    assert fetch_url("https://img.example/a.jpg") == b"small"
    assert calls[0] == ("https://img.example/a.jpg", 5.0)
    with pytest.raises(FetchError, match="cap"):
        fetch_url("https://img.example/big.jpg")
    assert big.reads == [MAX_IMAGE_BYTES + 1]  # never reads more than the cap + 1
    with pytest.raises(FetchError, match="cap"):
        fetch_url("https://img.example/declared.jpg")
    with pytest.raises(FetchError, match="http"):
        fetch_url("file:///etc/passwd")
    assert len(calls) == 3
