"""Web search as the dashboard uses it: the web first, the local catalog when the web fails, and thumbnails
of web results fetched for refinement. No Streamlit here: the page keeps a `WebFallback`'s `down` per session
and one `WebImages` for every session."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ris_core import refine  # refine.fetch_url is looked up per call: tests patch it
from ris_core.search import SearchBackend, SearchResponse, one_line, search_safely

WEB_RETRY_SECONDS = 60.0  # after the web failed, searches within this time go straight to the catalog
WEB_IMAGE_TTL = 600.0  # seconds a fetched web thumbnail (or its failure) is reused


@dataclass
class WebFallback:
    """Answer each query from the web backend, or from the catalog when the web cannot answer.

    After a failure the web is not tried again for `retry_seconds` (`down` = (when, why)), so a page that reruns
    on every click does not wait on an unreachable network each time."""

    retry_seconds: float = WEB_RETRY_SECONDS
    down: tuple[float, str] | None = None
    clock: Callable[[], float] = time.monotonic

    def search(self, queries: dict[str, str], k: int, catalog: SearchBackend,
               web: Callable[[], SearchBackend]) -> tuple[dict[str, SearchResponse], str | None]:
        """({name: response}, why the web was not used or None). `web()` builds the backend (may raise OSError)."""
        offline = self.down[1] if self.down and self.clock() - self.down[0] < self.retry_seconds else None
        responses: dict[str, SearchResponse] = {}
        backend: SearchBackend | None = None
        for name, query in queries.items():
            if offline is None:
                if backend is None:
                    try:
                        backend = web()
                    except Exception as err:  # noqa: BLE001 - e.g. its result cache cannot be opened
                        offline = one_line(f"its result cache cannot be opened: {err}")
                if backend is not None:
                    response = search_safely(backend, query, k)
                    if response.ok:
                        responses[name] = response
                        continue
                    offline = response.error
            responses[name] = catalog.search(query, k=k)
        if offline and not (self.down and self.down[1] == offline):
            self.down = (self.clock(), offline)
        return responses, offline


@dataclass
class WebImages:
    """Web thumbnails for refinement, fetched by refine's own fetcher (5 s timeout, 2 MB cap), several at a
    time. Each answer, bytes or the error, is kept for `ttl` seconds: reruns neither fetch again nor wait
    again on a host that just timed out. Thread-safe: one instance serves every session."""

    ttl: float = WEB_IMAGE_TTL
    max_items: int = 500  # ~50 kB per thumbnail: at most ~25 MB
    workers: int = 8
    _items: OrderedDict = field(default_factory=OrderedDict, repr=False)  # url -> (when, bytes | None, error)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _fresh(self, url: str) -> tuple | None:
        with self._lock:
            item = self._items.get(url)
        return item if item is not None and time.monotonic() - item[0] < self.ttl else None

    def _fetch(self, url: str) -> tuple:
        try:
            data, error = refine.fetch_url(url), ""
        except Exception as err:  # noqa: BLE001 - any failure costs this one result (refine counts it)
            data, error = None, one_line(f"{type(err).__name__}: {err}")
        item = (time.monotonic(), data, error)
        with self._lock:
            self._items[url] = item
            self._items.move_to_end(url)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return item

    def prefetch(self, urls: list[str]) -> None:
        missing = [u for u in dict.fromkeys(urls) if self._fresh(u) is None]
        if missing:
            with ThreadPoolExecutor(min(self.workers, len(missing))) as pool:
                list(pool.map(self._fetch, missing))

    def __call__(self, url: str) -> bytes:
        _, data, error = self._fresh(url) or self._fetch(url)
        if data is None:
            raise refine.FetchError(error)
        return data
