"""Text search over the product catalog: SQLite FTS5 with bm25 ranking, plus a slow naive baseline.

Any user text is searched as plain words: it is split into word tokens and each token is quoted as an
FTS5 string, so quotes, `*`, `NEAR`, `AND`/`OR`/`NOT`, `-`, `^`, parentheses and `col:` prefixes are
never interpreted as query syntax and never cause an error.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from ris_core.files import atomic_path
from ris_core.search import SearchResponse, SearchResult
from ris_core.search.bm25 import BM25Matrix

SCHEMA_VERSION = "1"
MAX_TERMS = 64  # a caption has ~10-20 words; more terms only slow bm25 down without changing the top hits
MAX_QUERY_CHARS = 20_000  # bound the per-character tokenizer loop on absurd inputs

# (FTS column, products column, bm25 weight). Why these weights: the display name is the text a
# caption is meant to reproduce, so it dominates; articleType and baseColour are the most
# discriminative attributes ("what" and "which colour"); gender is useful but coarse; the category
# levels, season and usage are broad (e.g. "Apparel" covers half the catalog) and only break ties.
FIELDS: list[tuple[str, str, float]] = [
    ("name", "productDisplayName", 4.0),
    ("gender", "gender", 1.0),
    ("master", "masterCategory", 0.5),
    ("sub", "subCategory", 0.5),
    ("article", "articleType", 1.5),
    ("colour", "baseColour", 1.5),
    ("season", "season", 0.5),
    ("usage", "usage", 0.5),
]
_WEIGHT_LIST = [w for _, _, w in FIELDS] + [0.0]  # the last, unindexed column is the image path
_WEIGHTS = ", ".join(map(str, _WEIGHT_LIST))
_FTS_COLUMNS = ", ".join(c for c, _, _ in FIELDS) + ", image UNINDEXED"
_TOKENIZER = "unicode61 remove_diacritics 2"


def query_terms(text: str, max_terms: int = MAX_TERMS) -> list[str]:
    """Lowercased, de-duplicated word tokens of any text, in order of first appearance.

    A token is a run of letters, digits and combining marks (marks kept so Devanagari or Arabic
    words stay whole); everything else, including NUL, control characters, emoji, punctuation and
    FTS operators, is a separator. Lone surrogates are dropped too, so the result always encodes.
    """
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    terms: list[str] = []
    seen: set[str] = set()
    current: list[str] = []

    def flush() -> None:
        if current:
            term = "".join(current).casefold()
            current.clear()
            if term not in seen:
                seen.add(term)
                terms.append(term)

    for ch in text[:MAX_QUERY_CHARS]:
        if unicodedata.category(ch)[0] in "LNM":
            current.append(ch)
            continue
        flush()
        if len(terms) >= max_terms:
            return terms
    flush()
    return terms[:max_terms]


def fts_query(terms: Iterable[str], mode: str = "any") -> str:
    """An FTS5 MATCH expression where every term is a quoted string, joined by OR (any) or AND (all)."""
    if mode not in ("any", "all"):
        raise ValueError(f"mode must be 'any' or 'all', got {mode!r}")
    quoted = ['"' + t.replace('"', '""') + '"' for t in terms]
    return (" OR " if mode == "any" else " AND ").join(quoted)


def _rows(products: pd.DataFrame, image_dir: Path) -> list[tuple]:
    """(id, name, attributes..., image path) per product; missing values become empty strings."""
    try:
        ids = [int(i) for i in products.index]
    except (TypeError, ValueError) as exc:
        raise ValueError("products must be indexed by integer product id (as load_catalog returns)") from exc
    columns = []
    for _, source, _ in FIELDS:
        if source in products.columns:
            columns.append(products[source].astype("string").fillna("").tolist())
        else:
            columns.append([""] * len(ids))  # tolerate trimmed tables, e.g. in tests
    images = [str(Path(image_dir) / f"{i}.jpg") for i in ids]
    return list(zip(ids, *columns, images, strict=True))


def _fingerprint(rows: list[tuple]) -> str:
    """Hash of everything indexed (ids, names, attributes, image paths) plus the schema version."""
    digest = hashlib.sha256(SCHEMA_VERSION.encode())
    digest.update(json.dumps(rows, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _create(conn: sqlite3.Connection, rows: list[tuple], fingerprint: str) -> None:
    with conn:  # one transaction: 44k rows insert in about a second instead of one commit per row
        conn.execute(f"CREATE VIRTUAL TABLE products USING fts5({_FTS_COLUMNS}, tokenize='{_TOKENIZER}')")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        placeholders = ", ".join("?" * (len(FIELDS) + 2))
        names = ", ".join(c for c, _, _ in FIELDS)
        conn.executemany(f"INSERT INTO products (rowid, {names}, image) VALUES ({placeholders})", rows)
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [("fingerprint", fingerprint), ("schema", SCHEMA_VERSION), ("rows", str(len(rows))),
             ("built_at", str(time.time()))],
        )
        conn.execute("INSERT INTO products (products) VALUES ('optimize')")  # merge segments: faster queries


def _connect_readonly(path: Path) -> sqlite3.Connection:
    # check_same_thread=False: the dashboard serves requests from several threads; a lock serialises use.
    return sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, check_same_thread=False)


def _stored_fingerprint(path: Path) -> str | None:
    """The fingerprint of an existing index file, or None when it is missing, foreign or corrupt."""
    if not path.is_file():
        return None
    try:
        conn = _connect_readonly(path)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
            conn.execute("SELECT rowid FROM products LIMIT 1").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return row[0] if row else None


class CatalogIndex:
    """Full-text index of the catalog; `search` ranks products by weighted bm25 (name counts most)."""

    name = "catalog"

    def __init__(self, conn: sqlite3.Connection, db_path: str | Path = ":memory:") -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.db_path = str(db_path)
        self.reused = False  # True when `build` found an up-to-date file and skipped indexing
        self._matrix: BM25Matrix | None = None
        self._titles: list[str] = []
        self._images: list[str] = []
        self._len = int(conn.execute("SELECT count(*) FROM products").fetchone()[0])

    @classmethod
    def build(cls, products: pd.DataFrame, image_dir: Path, db_path: str | Path = ":memory:") -> CatalogIndex:
        """Index `products`; an existing `db_path` holding the same products is reused, else rebuilt atomically."""
        rows = _rows(products, Path(image_dir))
        fingerprint = _fingerprint(rows)
        if str(db_path) == ":memory:":
            conn = sqlite3.connect(":memory:", check_same_thread=False)
            _create(conn, rows, fingerprint)
            return cls(conn, db_path)

        path = Path(db_path)
        if _stored_fingerprint(path) == fingerprint:
            index = cls(_connect_readonly(path), path)
            index.reused = True
            return index

        # Build into a temp file beside the target, then os.replace: readers (and a concurrent
        # builder) see the old complete file or the new complete one, never a half-written index.
        with atomic_path(path) as tmp:
            conn = sqlite3.connect(tmp)
            try:
                # The temp file is thrown away on any failure, so durability pragmas only cost time.
                conn.execute("PRAGMA journal_mode = OFF")
                conn.execute("PRAGMA synchronous = OFF")
                _create(conn, rows, fingerprint)
            finally:
                conn.close()
        return cls(_connect_readonly(path), path)

    @classmethod
    def open(cls, db_path: str | Path) -> CatalogIndex:
        """Open an index file written by `build` (read-only)."""
        path = Path(db_path)
        if not path.is_file():
            raise FileNotFoundError(f"no catalog index at {path}: create it with CatalogIndex.build(...)")
        if _stored_fingerprint(path) is None:
            raise ValueError(f"{path} is not a catalog index (or is corrupt): rebuild it with CatalogIndex.build(...)")
        return cls(_connect_readonly(path), path)

    def __len__(self) -> int:
        return self._len

    @property
    def fingerprint(self) -> str:
        """Hash of everything indexed and the schema version: equal fingerprints rank every query the same."""
        with self._lock:
            return self._conn.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> CatalogIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def matrix(self) -> BM25Matrix:
        """The same bm25 as a sparse matrix (built on first use, ~1 s for 44k products): fast and batched."""
        with self._lock:
            if self._matrix is None:
                self._matrix = BM25Matrix.from_fts5(self._conn, "products", _WEIGHT_LIST, _TOKENIZER)
                rows = self._conn.execute("SELECT name, image FROM products ORDER BY rowid").fetchall()
                self._titles = [r[0] for r in rows]
                self._images = [r[1] for r in rows]
            return self._matrix

    def search(self, query: str, k: int = 10, mode: str = "any") -> SearchResponse:
        """Top `k` products for any text, best first; `score` is -bm25 (larger = better).

        mode="any" matches products containing at least one word (bm25 puts products matching more
        and rarer words first); mode="all" requires every word. Text without any word gives no results.
        """
        return self.search_many([query], k=k, mode=mode)[0]

    def search_many(self, queries: list[str], k: int = 10, mode: str = "any") -> list[SearchResponse]:
        """`search` for every query, scored together; the same rankings as FTS5's own `bm25()` (tests)."""
        start = time.perf_counter()
        terms = [query_terms(q) for q in queries]
        matches = [fts_query(t, mode) for t in terms]  # validates mode even for empty queries
        answers: list[list[tuple[int, str, str, float]]] = [[] for _ in queries]
        batched = [i for i, t in enumerate(terms) if t and k > 0]
        if mode == "any" and batched:
            matrix = self.matrix
            batched = [i for i in batched if not matrix.phrase_terms(terms[i])]
            for i, best in zip(batched, matrix.top_k([terms[i] for i in batched], k)):
                answers[i] = [(int(matrix.ids[j]), self._titles[j], self._images[j], score) for j, score in best]
        done = set(batched) if mode == "any" else set()
        for i, match in enumerate(matches):
            if match and k > 0 and i not in done:
                answers[i] = self._fts5(match, k)
        seconds = (time.perf_counter() - start) / max(len(queries), 1)
        return [SearchResponse(query=q, backend=self.name, seconds=seconds, results=[
            SearchResult(rank=r, title=title, image=image, product_id=pid, score=score)
            for r, (pid, title, image, score) in enumerate(found, start=1)]) for q, found in zip(queries, answers)]

    def _fts5(self, match: str, k: int) -> list[tuple[int, str, str, float]]:
        """FTS5's own ranking: the reference, and the path for phrases and mode="all"."""
        sql = (f"SELECT rowid, name, image, bm25(products, {_WEIGHTS}) AS r FROM products "
               "WHERE products MATCH ? ORDER BY r, rowid LIMIT ?")
        with self._lock:
            rows = self._conn.execute(sql, (match, int(k))).fetchall()
        return [(int(pid), name, image, -float(bm)) for pid, name, image, bm in rows]


def naive_search(products: pd.DataFrame, query: str, k: int = 10, image_dir: Path | None = None) -> SearchResponse:
    """The slow baseline for benchmarks: a Python loop counting query words in each lowercased name.

    Deliberately unindexed (O(products x name length) per query) to show what FTS5 buys; ties keep
    catalog order. `score` is the number of distinct query words found in the name.
    """
    start = time.perf_counter()
    terms = query_terms(query)
    scored: list[tuple[int, int, str]] = []
    if terms:
        for pid, name in zip(products.index, products["productDisplayName"], strict=True):
            words = set(query_terms(str(name).lower(), max_terms=10_000))
            hits = sum(1 for t in terms if t in words)
            if hits:
                scored.append((hits, int(pid), str(name)))
    scored.sort(key=lambda s: -s[0])  # stable: equal counts stay in catalog order
    results = [
        SearchResult(
            rank=i, title=name, image=str(Path(image_dir) / f"{pid}.jpg") if image_dir is not None else "",
            product_id=pid, score=float(hits),
        )
        for i, (hits, pid, name) in enumerate(scored[: max(k, 0)], start=1)
    ]
    return SearchResponse(query=query, backend="naive", results=results, seconds=time.perf_counter() - start)
