"""Result refinement (the paper's section IV-B, never implemented by its code): re-rank search results by how
well each one agrees with the query image.

Every result image is captioned with the same captioner as the query (batched, cached by the sha256 of the
image bytes), and scored against the query's caption and embedding:

    agreement = w_last * [result caption's last word == query caption's last word]
              + w_tok  * jaccard(word set of the result caption, word set of the query caption)
              + w_img  * max(0, cosine(result image embedding, query image embedding))

with w_last=0.4, w_tok=0.3, w_img=0.3 by default. Words are `ris_core.strategies.words`, casefolded; the
last word of a product name is usually its article type ("Shirt", "Heels"), hence its weight. Each part lies
in [0, 1] (a negative cosine counts as no agreement), so with weights summing to 1 the agreement does too.
Results are sorted by agreement, highest first (ties keep the backend's order); with a threshold, those
below it are dropped and counted.

Result images are local paths (catalog, image kNN) or URLs (web thumbnails). URLs go through `fetch`
(default `fetch_url`: 5 s timeout, 2 MB cap); any failure to get or decode an image skips that result and
counts it in `failed`, it never stops the refinement.

    batch = captioner.run_batch([query_image])
    outcome = refine(captioner, batch.captions[0], batch.embeddings[0], response.results, threshold=0.3)
"""

from __future__ import annotations

import hashlib
import sqlite3
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ris_core.images import open_image
from ris_core.search import SearchResult, one_line
from ris_core.strategies import words

FETCH_TIMEOUT = 5.0  # seconds per image: a slow host must not hold up the page
MAX_IMAGE_BYTES = 2 * 1024 * 1024  # thumbnails are ~10-50 kB; anything over 2 MB is not one
USER_AGENT = "Mozilla/5.0 (compatible; ris-eval refine)"  # some image hosts refuse urllib's default agent


class CaptionerLike(Protocol):
    """What refinement needs: `Captioner` and `NotebookCaptionerAdapter` both fit."""

    def run_batch(self, images: list[Image.Image], references: list[str] | None = None,
                  num_beams: int = 1): ...  # -> an object with .captions (list[str]) and .embeddings (B, D)


@dataclass(frozen=True)
class AgreementWeights:
    last_word: float = 0.4
    tokens: float = 0.3
    image: float = 0.3


@dataclass
class RefinedResult:
    result: SearchResult  # unchanged, its `rank` is still the backend's
    agreement: float  # in [0, 1] with the default weights
    parts: dict  # {"last_word_match", "token_jaccard", "image_cosine"}, each in [0, 1], before weighting
    caption: str  # the result image's generated caption


@dataclass
class RefineOutcome:
    ranked: list[RefinedResult]  # highest agreement first
    dropped: int = 0  # below the threshold
    failed: int = 0  # image could not be fetched or decoded
    failures: list[tuple[SearchResult, str]] = field(default_factory=list)  # each failed result and why


class FetchError(OSError):
    """An image URL could not be used (refused scheme, too big, HTTP error); the message says which."""


def fetch_url(url: str, timeout: float = FETCH_TIMEOUT, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes at an http(s) URL, reading at most max_bytes + 1 of them; FetchError when over the cap."""
    if not url.lower().startswith(("http://", "https://")):
        raise FetchError(f"{url[:80]}: only http(s) image URLs are fetched")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # scheme checked above: no file:// or ftp://
        declared = (getattr(response, "headers", None) or {}).get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise FetchError(f"{url[:80]}: {int(declared):,} bytes, over the {max_bytes:,}-byte cap")
        data = response.read(max_bytes + 1)  # one byte more tells "too big" from "exactly at the cap"
    if len(data) > max_bytes:
        raise FetchError(f"{url[:80]}: over the {max_bytes:,}-byte cap")
    return data


class CaptionCache:
    """Captions and embeddings by image sha256, for ONE captioner: in memory, or in a small SQLite file.

    Pass `model_key` (e.g. the run folder and its weights' stamp) when a file is shared between models.
    """

    def __init__(self, path: str | Path | None = None, model_key: str = "default") -> None:
        self.path, self.model_key = (Path(path) if path else None), model_key
        self.memory: dict[str, tuple[str, np.ndarray]] = {}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                con.execute("CREATE TABLE IF NOT EXISTS captions (model TEXT, sha256 TEXT, caption TEXT, "
                            "embedding BLOB, PRIMARY KEY (model, sha256))")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)  # a connection per call: safe across Streamlit threads

    def get(self, sha256: str) -> tuple[str, np.ndarray] | None:
        if sha256 in self.memory or self.path is None:
            return self.memory.get(sha256)
        with self._connect() as con:
            row = con.execute("SELECT caption, embedding FROM captions WHERE model = ? AND sha256 = ?",
                              (self.model_key, sha256)).fetchone()
        if row is None:
            return None
        self.memory[sha256] = (row[0], np.frombuffer(row[1], dtype=np.float32).copy())
        return self.memory[sha256]

    def put(self, sha256: str, caption: str, embedding: np.ndarray) -> None:
        self.put_many([(sha256, caption, embedding)])

    def put_many(self, items: Sequence[tuple[str, str, np.ndarray]]) -> None:
        """Store (sha256, caption, embedding) rows in one transaction (one commit per batch, not per image)."""
        rows = []
        for sha256, caption, embedding in items:
            vector = np.asarray(embedding, dtype=np.float32).ravel()
            self.memory[sha256] = (caption, vector)
            rows.append((self.model_key, sha256, caption, vector.tobytes()))
        if self.path is not None and rows:
            with self._connect() as con:
                con.executemany("INSERT OR REPLACE INTO captions VALUES (?, ?, ?, ?)", rows)

    def __len__(self) -> int:
        if self.path is None:
            return len(self.memory)
        with self._connect() as con:
            return int(con.execute("SELECT COUNT(*) FROM captions WHERE model = ?", (self.model_key,)).fetchone()[0])


# ---------------------------------------------------------------- scoring


def _folded_words(caption: str) -> list[str]:
    return [w.casefold() for w in words(caption)]


def last_word_match(a: str, b: str) -> float:
    wa, wb = _folded_words(a), _folded_words(b)
    return float(bool(wa) and bool(wb) and wa[-1] == wb[-1])


def token_jaccard(a: str, b: str) -> float:
    sa, sb = set(_folded_words(a)), set(_folded_words(b))
    return len(sa & sb) / len(sa | sb) if sa | sb else 0.0


def image_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two embeddings clipped to [0, 1]; 0 when either is all zeros."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"embeddings of different sizes ({a.size} vs {b.size}): use the query's captioner")
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return max(0.0, min(1.0, float(a @ b) / norm)) if norm > 0 else 0.0


def agreement_parts(query_caption: str, query_embedding: np.ndarray, caption: str,
                    embedding: np.ndarray) -> dict[str, float]:
    return {"last_word_match": last_word_match(caption, query_caption),
            "token_jaccard": token_jaccard(caption, query_caption),
            "image_cosine": image_cosine(embedding, query_embedding)}


def agreement(parts: dict[str, float], weights: AgreementWeights = AgreementWeights()) -> float:
    return (weights.last_word * parts["last_word_match"] + weights.tokens * parts["token_jaccard"]
            + weights.image * parts["image_cosine"])


# ---------------------------------------------------------------- refinement


def image_source(result: SearchResult) -> str:
    """Which image to caption: the local file when there is one, else the (small) thumbnail URL."""
    if result.image and not _is_url(result.image):
        return result.image
    return result.thumbnail or result.image


def _is_url(source: str) -> bool:
    return "://" in source


def _read(source: str, fetch: Callable[[str], bytes]) -> bytes:
    if _is_url(source):
        return fetch(source)
    with open(source, "rb") as stream:  # local catalog files are trusted, but keep the same cap
        data = stream.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise FetchError(f"{source}: over the {MAX_IMAGE_BYTES:,}-byte cap")
    return data


def refine(captioner: CaptionerLike, query_caption: str, query_embedding: np.ndarray,
           results: Sequence[SearchResult], threshold: float | None = None,
           fetch: Callable[[str], bytes] | None = None, *, weights: AgreementWeights = AgreementWeights(),
           cache: CaptionCache | None = None, batch_size: int = 16) -> RefineOutcome:
    """Caption every result image, score its agreement with the query, re-rank, drop those below `threshold`.

    Args:
        captioner: the captioner that captioned the query (anything with `run_batch`).
        query_caption: the query image's generated caption.
        query_embedding: the query image's embedding from the same captioner (`CaptionBatch.embeddings[i]`).
        results: search results, in the backend's order.
        threshold: drop results whose agreement is below it (None keeps all).
        fetch: URL -> bytes for web images (default `fetch_url`); any exception marks the result failed.
        weights: the three weights of the score (module docstring).
        cache: captions by image sha256; pass one per captioner to reuse across calls (default: this call only).
        batch_size: result images captioned per `run_batch` call.
    """
    fetch = fetch_url if fetch is None else fetch
    cache = CaptionCache() if cache is None else cache

    # 1. Bytes of every result image; failures are recorded, not raised
    digests: list[str | None] = []
    pending: dict[str, Image.Image] = {}  # sha256 -> decoded image, captioned once even if repeated
    failures: list[tuple[SearchResult, str]] = []
    for result in results:
        source = image_source(result)
        try:
            data = _read(source, fetch)
            sha = hashlib.sha256(data).hexdigest()
            if sha not in pending and cache.get(sha) is None:
                pending[sha] = open_image(data)
            digests.append(sha)
        except Exception as err:  # noqa: BLE001 - network, HTTP, missing file, not an image, too big, a custom
            # fetch's own errors: each costs one result, never the refinement
            failures.append((result, one_line(f"{type(err).__name__}: {err}")))
            digests.append(None)

    # 2. Caption the images not cached yet, in batches
    todo = list(pending.items())
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        batch = captioner.run_batch([image for _, image in chunk])
        for (sha, _), caption, embedding in zip(chunk, batch.captions, batch.embeddings, strict=True):
            cache.put(sha, caption, embedding)

    # 3. Score, re-rank (stable: ties keep the backend's order), apply the threshold
    scored = []
    for result, sha in zip(results, digests, strict=True):
        if sha is None:
            continue
        caption, embedding = cache.get(sha)
        parts = agreement_parts(query_caption, query_embedding, caption, embedding)
        scored.append(RefinedResult(result=result, agreement=agreement(parts, weights), parts=parts, caption=caption))
    scored.sort(key=lambda r: -r.agreement)
    kept = scored if threshold is None else [r for r in scored if r.agreement >= threshold]
    return RefineOutcome(ranked=kept, dropped=len(scored) - len(kept), failed=len(failures), failures=failures)
