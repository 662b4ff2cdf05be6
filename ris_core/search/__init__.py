"""Search backends behind one interface: the local catalog (SQLite FTS5), DuckDuckGo images, image kNN.

Every backend answers a text query with a `SearchResponse`; `search_safely` turns any failure into a
response with `error` set, so one broken strategy never loses the other strategies' results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = [
    "SearchBackend",
    "SearchResponse",
    "SearchResult",
    "SearchUnavailable",
    "one_line",
    "search_safely",
]


@dataclass
class SearchResult:
    rank: int  # 1-based
    title: str
    image: str  # local path or URL of the full image
    thumbnail: str | None = None  # URL or local path of a small image
    product_id: int | None = None  # catalog products only
    score: float | None = None  # backend score, larger = better (bm25 is negated)
    source_url: str | None = None  # page the image came from (web results)


@dataclass
class SearchResponse:
    query: str
    backend: str
    results: list[SearchResult] = field(default_factory=list)
    seconds: float = 0.0
    from_cache: bool = False
    error: str | None = None  # one clear line when the backend failed; results are then empty

    @property
    def ok(self) -> bool:
        return self.error is None


class SearchUnavailable(RuntimeError):
    """A backend cannot answer now (offline, rate limited after retries, replay miss); message is one clear line."""


@runtime_checkable
class SearchBackend(Protocol):
    name: str

    def search(self, query: str, k: int = 10) -> SearchResponse: ...


def one_line(text: object, limit: int = 300) -> str:
    """Collapse any message (tracebacks, reprs with newlines) to one short line for the UI."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def search_safely(backend: SearchBackend, query: str, k: int = 10) -> SearchResponse:
    """Run `backend.search` and never raise: a failure becomes a response with `error` set.

    Only `Exception` is caught, so Ctrl-C and SystemExit still stop the program.
    """
    name = str(getattr(backend, "name", type(backend).__name__))
    start = time.perf_counter()
    try:
        return backend.search(query, k)
    except SearchUnavailable as exc:
        message = one_line(exc) or "search unavailable"
    except Exception as exc:  # noqa: BLE001 - the point of this function is to contain any failure
        detail = one_line(exc)
        message = f"{name} search failed ({type(exc).__name__}{': ' + detail if detail else ''})"
    return SearchResponse(
        query=query, backend=name, results=[], seconds=time.perf_counter() - start, error=one_line(message)
    )
