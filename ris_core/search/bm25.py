"""SQLite FTS5's `bm25()` as a sparse matrix: every query of a strategy scored in one product.

FTS5 scores a row for the query terms t (an OR of quoted terms) as

    sum_t idf(t) * f(t) * (k1 + 1) / (f(t) + k1 * (1 - b + b * D / avgdl)),   k1 = 1.2, b = 0.75

with f(t) the column-weighted count of t in the row, D the row's length in tokens over all columns,
avgdl the mean of D over the table, and idf(t) = log((N - n_t + 0.5) / (n_t + 0.5)) floored at 1e-6 (N rows,
n_t rows containing t); see `fts5Bm25Function` in SQLite's fts5_aux.c. Everything but the query is fixed, so
the per-(row, term) contributions form one sparse matrix S and a batch of queries is Q @ S.T. bm25s is not
used because it has no per-column weights, and a weighted count changes both f and D in its formula.

One tokeniser for both paths: the documents' tokens are read back from the FTS5 index (`fts5vocab`), and a
query term is tokenised by FTS5 too when it is not plain ASCII. A term FTS5 splits into several tokens is a
phrase, which a bag of terms cannot score: such queries are answered by FTS5 itself (`phrase_terms`).
Ties break as `CatalogIndex.search` breaks them: by rowid (product id), ascending.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence

import numpy as np
from scipy import sparse

K1, B = 1.2, 0.75  # FTS5's constants
IDF_FLOOR = 1e-6  # FTS5 floors a non-positive idf (terms in more than half the rows) at this
QUERY_CHUNK = 256  # queries scored per sparse product at most
MAX_SCORES = 16_000_000  # (query, product) scores held at once, ~200 MB: a huge catalog gets smaller chunks


class BM25Matrix:
    """The bm25 contributions of an FTS5 table's rows, for scoring many bag-of-terms queries at once."""

    def __init__(self, ids: np.ndarray, vocabulary: dict[str, int], contributions: sparse.csr_matrix,
                 tokenize: sqlite3.Connection) -> None:
        self.ids = ids  # rowids, ascending: column j of a score row is product ids[j]
        self.vocabulary = vocabulary
        self._by_term = contributions  # terms x rows (CSR): one query is the sum of a few of its rows
        self._tokenizer = tokenize
        self._tokenizer_lock = threading.Lock()
        self._tokens: dict[str, tuple[str, ...]] = {}

    @classmethod
    def from_fts5(cls, conn: sqlite3.Connection, table: str, weights: Sequence[float], tokenizer: str
                  ) -> BM25Matrix:
        """Read `table`'s tokens back from FTS5; `weights` per column, as passed to bm25()."""
        columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
        weight_of = {c: (weights[i] if i < len(weights) else 1.0) for i, c in enumerate(columns)}
        ids = np.fromiter((r[0] for r in conn.execute(f"SELECT rowid FROM {table} ORDER BY rowid")), dtype=np.int64)
        conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.ris_vocab USING fts5vocab(main, {table}, instance)")
        try:
            rows = conn.execute("SELECT term, doc, col FROM temp.ris_vocab").fetchall()
        finally:
            conn.execute("DROP TABLE IF EXISTS temp.ris_vocab")
        terms, docs, cols = zip(*rows) if rows else ((), (), ())
        vocabulary: dict[str, int] = {}
        term_index = np.fromiter((vocabulary.setdefault(t, len(vocabulary)) for t in terms), dtype=np.int64,
                                 count=len(terms))
        doc_index = np.searchsorted(ids, np.asarray(docs, dtype=np.int64))
        weight = np.fromiter((weight_of[c] for c in cols), dtype=np.float64, count=len(cols))
        shape = (len(ids), len(vocabulary))
        # f(t): summed weights of t's instances; D: instances per row (unweighted), as FTS5 counts them
        freq = sparse.coo_matrix((weight, (doc_index, term_index)), shape=shape).tocsr()
        freq.sum_duplicates()
        length = np.bincount(doc_index, minlength=len(ids)).astype(np.float64)
        n_rows = max(len(ids), 1)
        avgdl = max(length.sum() / n_rows, 1e-12)
        hits = np.bincount(freq.indices, minlength=len(vocabulary)).astype(np.float64)  # rows holding t
        idf = np.log((n_rows - hits + 0.5) / (hits + 0.5))
        idf[idf <= 0] = IDF_FLOOR
        norm = K1 * (1 - B + B * length / avgdl)  # per row
        f = freq.data
        row_of = np.repeat(np.arange(len(ids)), np.diff(freq.indptr))
        freq.data = idf[freq.indices] * f * (K1 + 1) / (f + norm[row_of])
        return cls(ids, vocabulary, freq.T.tocsr(), _tokenizer_connection(tokenizer))

    def __len__(self) -> int:
        return len(self.ids)

    def tokens(self, term: str) -> tuple[str, ...]:
        """FTS5's tokens of one query term (ASCII letters and digits are their own token, lowercased)."""
        if term.isascii() and term.isalnum():
            return (term.lower(),)
        if term not in self._tokens:
            with self._tokenizer_lock:
                self._tokens[term] = _fts5_tokens(self._tokenizer, term)
        return self._tokens[term]

    def phrase_terms(self, terms: Sequence[str]) -> bool:
        """True when a term is a phrase (several FTS5 tokens) or no token at all: FTS5 must answer it."""
        return any(len(self.tokens(t)) != 1 for t in terms)

    def top_k(self, queries: Sequence[Sequence[str]], k: int) -> list[list[tuple[int, float]]]:
        """For each query (its terms, none a phrase), the best `k` (row, score), best first; row indexes `ids`."""
        out: list[list[tuple[int, float]]] = []
        chunk = max(1, min(QUERY_CHUNK, MAX_SCORES // max(len(self.ids), 1)))
        for start in range(0, len(queries), chunk):
            scores = (self._query_matrix(queries[start:start + chunk]) @ self._by_term).tocsr()
            for i in range(scores.shape[0]):  # a row's non-zeros are exactly the products the OR query matches
                lo, hi = scores.indptr[i], scores.indptr[i + 1]
                out.append(_best(scores.indices[lo:hi], scores.data[lo:hi], k))
        return out

    def _query_matrix(self, queries: Sequence[Sequence[str]]) -> sparse.csr_matrix:
        rows, cols = [], []
        for i, terms in enumerate(queries):
            # a list, not a set: two terms with one token ("café", "cafe") are two phrases to FTS5, both scored
            found = [self.vocabulary[token] for t in terms for token in self.tokens(t) if token in self.vocabulary]
            rows += [i] * len(found)
            cols += found
        data = np.ones(len(rows), dtype=np.float64)
        return sparse.csr_matrix((data, (rows, cols)), shape=(len(queries), len(self.vocabulary)))


def _best(rows: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The `k` best (row, score), best first, ties by ascending row (FTS5's ORDER BY bm25, rowid)."""
    if k <= 0 or not len(rows):
        return []
    if len(rows) > k:  # keep every candidate tied with the k-th so the tie-break stays exact
        keep = scores >= _kth_largest(scores, k)
        rows, scores = rows[keep], scores[keep]
    order = np.lexsort((rows, -scores))[:k]
    return [(int(rows[j]), float(scores[j])) for j in order]


def _kth_largest(scores: np.ndarray, k: int, stride: int = 16) -> float:
    """The k-th largest score. A long row (an OR of common words matches half the catalog) is first cut to the
    scores at or above the k-th largest of every `stride`-th one: a subset's k-th largest is never above the
    whole's, so nothing that could reach the top k is dropped, and selecting among the ~stride * k left is cheap."""
    if len(scores) >= 4 * stride * k:
        sample = scores[::stride]
        scores = scores[scores >= np.partition(sample, len(sample) - k)[len(sample) - k]]
    return scores[np.argpartition(scores, len(scores) - k)[len(scores) - k]]


def _tokenizer_connection(tokenizer: str) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.execute(f"CREATE VIRTUAL TABLE t USING fts5(x, tokenize='{tokenizer}')")
    conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, instance)")
    return conn


def _fts5_tokens(conn: sqlite3.Connection, text: str) -> tuple[str, ...]:
    with conn:
        conn.execute("DELETE FROM t")
        conn.execute("INSERT INTO t (rowid, x) VALUES (1, ?)", (text,))
        tokens = tuple(term for term, in conn.execute("SELECT term FROM v ORDER BY offset"))
        conn.execute("DELETE FROM t")
    return tokens
