"""DuckDuckGo image search through the `ddgs` package, with a polite rate limit, retries and a cache.

DuckDuckGo throttles clients that query fast, so this backend:
- waits at least `min_interval` (>= 1 s) between live calls, across all instances in the process;
- retries rate-limit and timeout errors with exponential backoff plus random jitter;
- caches every answer in SQLite (WAL, busy timeout) keyed by all request parameters, so reruns of an
  evaluation, or `replay=True` on a machine without internet, need no network at all.
`ddgs_factory`, `sleep` and `clock` are injectable so tests never touch the network or wait.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from ris_core.search import SearchResponse, SearchResult, SearchUnavailable, one_line

DEFAULT_CACHE_PATH = Path(".cache") / "duckduckgo_images.sqlite"
DEFAULT_TTL_SECONDS = 7 * 24 * 3600
MIN_INTERVAL_FLOOR = 1.0  # seconds; going faster gets the client blocked within a few dozen queries

# Module-level so every instance in the process shares one schedule. Keyed by the clock function so a
# test's fake clock never mixes with the real one (all real instances share `time.time`).
_RATE_LOCK = threading.Lock()
_NEXT_ALLOWED: dict[Callable[[], float], float] = {}


def _default_ddgs_factory(timeout: float) -> Any:
    from ddgs import DDGS  # imported lazily: the catalog-only dashboard should not pay for it

    return DDGS(timeout=timeout)


def _ddgs_exceptions() -> tuple[type[BaseException], type[BaseException], type[BaseException]]:
    try:
        from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException
    except ImportError:  # no ddgs installed: nothing can be one of its exceptions
        class _Never(Exception):
            pass

        return _Never, _Never, _Never
    return DDGSException, RatelimitException, TimeoutException


class ResultCache:
    """Raw backend results in SQLite, safe for several processes writing at once.

    One short-lived connection per operation (no connection shared across threads or forks); WAL lets
    readers proceed during a write, `busy_timeout` makes concurrent writers wait instead of failing,
    and `BEGIN IMMEDIATE` takes the write lock up front so two writers never deadlock on an upgrade.
    """

    def __init__(self, path: str | Path, busy_timeout_ms: int = 30_000) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn:
            conn.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file once set
            conn.execute(
                "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, params TEXT NOT NULL, "
                "results TEXT NOT NULL, created REAL NOT NULL)"
            )

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN ourselves; timeout is the busy timeout in seconds.
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        return conn

    @staticmethod
    def key(params: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(params, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> tuple[list[dict[str, Any]], float] | None:
        """(results, created timestamp) or None."""
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT results, created FROM results WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0]), float(row[1])
        except ValueError:  # a damaged entry is a miss, not a crash
            return None

    def put(self, key: str, params: dict[str, Any], results: list[dict[str, Any]], created: float) -> None:
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "INSERT OR REPLACE INTO results (key, params, results, created) VALUES (?, ?, ?, ?)",
                    (key, json.dumps(params, sort_keys=True, ensure_ascii=False),
                     json.dumps(results, ensure_ascii=False, default=str), created),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def __len__(self) -> int:
        with closing(self._connect()) as conn:
            return int(conn.execute("SELECT count(*) FROM results").fetchone()[0])


class DuckDuckGoImages:
    """Web image search (name "duckduckgo"); `search` raises SearchUnavailable with a one-line reason."""

    name = "duckduckgo"

    def __init__(
        self,
        cache_path: str | Path | None = None,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        min_interval: float = MIN_INTERVAL_FLOOR,
        max_retries: int = 3,
        backoff: float = 2.0,
        timeout: float = 10,
        replay: bool = False,
        region: str = "us-en",
        safesearch: str = "moderate",
        ddgs_factory: Callable[[], Any] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Resolve the default against the current dir now, so a later chdir does not split the cache.
        self.cache = ResultCache(Path(cache_path) if cache_path is not None else Path.cwd() / DEFAULT_CACHE_PATH)
        self.ttl_seconds = float(ttl_seconds)
        self.min_interval = max(MIN_INTERVAL_FLOOR, float(min_interval))
        self.max_retries = max(0, int(max_retries))
        self.backoff = float(backoff)
        self.timeout = timeout
        self.replay = replay
        self.region = region
        self.safesearch = safesearch
        self._factory = ddgs_factory or (lambda: _default_ddgs_factory(self.timeout))
        self._sleep = sleep
        self._clock = clock  # wall-clock seconds: cache timestamps must mean the same in every process
        self.live_calls = 0  # attempts that reached DDGS (for tests and the dashboard's status line)

    def params(self, query: str, k: int) -> dict[str, Any]:
        """Everything that changes the answer; the cache key is a hash of exactly this."""
        return {
            "kind": "images",
            "query": query,
            "backend": "duckduckgo",
            "max_results": int(k),
            "region": self.region,
            "safesearch": self.safesearch,
        }

    def search(self, query: str, k: int = 10) -> SearchResponse:
        start = time.perf_counter()
        # whitespace variants share one cache entry; lone surrogates (not encodable) become U+FFFD
        text = " ".join(str(query).encode("utf-8", "replace").decode("utf-8").split())
        if not text or k <= 0:
            return SearchResponse(query=query, backend=self.name, results=[], seconds=time.perf_counter() - start)
        params = self.params(text, k)
        key = ResultCache.key(params)
        cached = self.cache.get(key)
        if cached is not None:
            raw, created = cached
            if self.replay or self._clock() - created <= self.ttl_seconds:
                return self._response(query, raw, start, from_cache=True)
        if self.replay:
            raise SearchUnavailable(f"no cached results for {text[:80]!r} (replay mode)")
        raw = self._fetch(text, k)
        self.cache.put(key, params, raw, self._clock())
        return self._response(query, raw, start, from_cache=False)

    def _response(self, query: str, raw: list[dict[str, Any]], start: float, from_cache: bool) -> SearchResponse:
        results = [
            SearchResult(
                rank=i,
                title=str(item.get("title") or ""),
                image=str(item.get("image") or ""),
                thumbnail=item.get("thumbnail") or None,
                source_url=item.get("url") or None,
            )
            for i, item in enumerate((r for r in raw if isinstance(r, dict) and r.get("image")), start=1)
        ]
        return SearchResponse(
            query=query, backend=self.name, results=results, seconds=time.perf_counter() - start, from_cache=from_cache
        )

    def _wait_for_slot(self) -> None:
        """Sleep until `min_interval` has passed since the previous live call of any instance."""
        with _RATE_LOCK:
            now = self._clock()
            slot = max(now, _NEXT_ALLOWED.get(self._clock, now))
            _NEXT_ALLOWED[self._clock] = slot + self.min_interval  # reserve the slot, then sleep outside the lock
        if slot > now:
            self._sleep(slot - now)

    def _fetch(self, text: str, k: int) -> list[dict[str, Any]]:
        ddgs_error, ratelimit_error, timeout_error = _ddgs_exceptions()
        failures = 0
        while True:
            self._wait_for_slot()
            self.live_calls += 1
            try:
                raw = self._factory().images(
                    text, backend="duckduckgo", max_results=k, region=self.region, safesearch=self.safesearch
                )
                return [dict(r) for r in (raw or [])]
            except (ratelimit_error, timeout_error, TimeoutError) as exc:
                failures += 1
                if failures > self.max_retries:
                    kind = "rate-limited" if isinstance(exc, ratelimit_error) else "timed out on"
                    raise SearchUnavailable(
                        f"DuckDuckGo {kind} us {failures} times; try again later or use replay mode"
                    ) from None
                # Exponential backoff with jitter in [0, 50%): delays strictly increase and clients
                # that were throttled together do not all come back at the same instant.
                base = self.backoff * 2 ** (failures - 1)
                self._sleep(base * (1 + 0.5 * random.random()))
            except (ddgs_error, OSError) as exc:
                raise SearchUnavailable(_permanent_message(exc)) from None


def _permanent_message(exc: BaseException) -> str:
    """One line for errors that retrying will not fix (offline, DNS, TLS, blocked, malformed answer)."""
    detail = one_line(exc, limit=160)
    advice = "use the local catalog or replay mode"
    if "no results found" in detail.lower():
        # ddgs reports both a genuinely empty answer and an HTTP 403/429 from DuckDuckGo this way.
        return f"DuckDuckGo returned no results (an empty answer or silent throttling); {advice}"
    if isinstance(exc, OSError):
        return f"DuckDuckGo is unreachable ({type(exc).__name__}); {advice}"
    head = detail.split(":", 1)[0]
    if head.isidentifier() and head != detail:  # ddgs wraps transport errors as "ConnectError: ..."
        return f"DuckDuckGo is unreachable ({head}); {advice}"
    return one_line(f"DuckDuckGo search failed ({type(exc).__name__}: {detail or 'no detail'}); {advice}")
