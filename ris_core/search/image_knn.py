"""The traditional reverse image search baseline: nearest catalog images by cosine similarity.

Embeddings come from elsewhere (the captioner's image encoder); this module only stores and searches
them. Rows are L2-normalised once, so cosine similarity is a single matrix-vector product.
"""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ris_core.files import atomic_path, write_json_atomic
from ris_core.search import SearchResponse, SearchResult
from ris_core.search.cosine import exact_top, unit_rows


class ImageKnnIndex:
    """Product ids, their unit-length float32 embeddings, image paths and names (row i = product i)."""

    name = "image_knn"

    def __init__(
        self, ids: Sequence[int] | np.ndarray, vectors: np.ndarray, image_paths: Sequence[str], names: Sequence[str]
    ) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be a 2-D (products x dim) array, got shape {vectors.shape}")
        self.ids = np.asarray(ids, dtype=np.int64)
        n = len(self.ids)
        if not (vectors.shape[0] == len(image_paths) == len(names) == n):
            raise ValueError(
                f"ids ({n}), vectors ({vectors.shape[0]}), image_paths ({len(image_paths)}) and names "
                f"({len(names)}) must have the same length"
            )
        self.vectors = np.ascontiguousarray(unit_rows(np.nan_to_num(vectors)))
        self.image_paths = [str(p) for p in image_paths]
        self.names = [str(s) for s in names]
        self._row = {int(pid): i for i, pid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def search_vector(
        self, vector: np.ndarray, k: int = 10, exclude_id: int | None = None, query: str = "<image>"
    ) -> SearchResponse:
        """Top `k` products by cosine similarity to `vector`, best first; `exclude_id` drops one product
        (the query image itself when evaluating on catalog images)."""
        start = time.perf_counter()
        q = np.nan_to_num(np.asarray(vector, dtype=np.float32).reshape(-1))
        if q.shape[0] != self.dim:
            raise ValueError(f"query vector has {q.shape[0]} dimensions, the index has {self.dim}")
        q = unit_rows(q)
        scores = self.vectors @ q
        if exclude_id is not None and int(exclude_id) in self._row:
            scores[self._row[int(exclude_id)]] = -np.inf
        results = self._ranked(*exact_top(scores, self.vectors, self.ids, q, k))
        return SearchResponse(query=query, backend=self.name, results=results, seconds=time.perf_counter() - start)

    def search_vectors(self, vectors: np.ndarray, k: int = 10, chunk: int = 256) -> list[SearchResponse]:
        """`search_vector` for every row of `vectors`, shortlisted by matrix products of `chunk` queries at a
        time (a query at a time is a pass over the whole index each: ~10 ms for 40k products)."""
        queries = unit_rows(np.nan_to_num(np.asarray(vectors, dtype=np.float32)))
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query vectors have shape {queries.shape}, the index has {self.dim} dimensions")
        out: list[SearchResponse] = []
        for start in range(0, len(queries), chunk):
            began = time.perf_counter()
            part = queries[start : start + chunk]
            ranked = [self._ranked(*exact_top(row, self.vectors, self.ids, query, k))
                      for row, query in zip(part @ self.vectors.T, part)]
            seconds = (time.perf_counter() - began) / max(len(part), 1)
            out += [SearchResponse(query="<image>", backend=self.name, results=results, seconds=seconds)
                    for results in ranked]
        return out

    def _ranked(self, rows: np.ndarray, scores: np.ndarray) -> list[SearchResult]:
        """Catalog `rows` (best first, as `exact_top` orders them) as results."""
        return [SearchResult(rank=r, title=self.names[i], image=self.image_paths[i], thumbnail=self.image_paths[i],
                             product_id=int(self.ids[i]), score=float(score))
                for r, (i, score) in enumerate(zip(rows, scores), start=1)]

    @staticmethod
    def _paths(path: str | Path) -> tuple[Path, Path]:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        return path, path.with_suffix(".json")

    def save(self, path: str | Path) -> Path:
        """Write `<path>.npz` (ids, vectors: arrays only) and `<path>.json` (image paths, names); returns the npz."""
        npz, meta = self._paths(path)
        write_json_atomic(meta, {"image_paths": self.image_paths, "names": self.names, "rows": len(self.ids)})
        with atomic_path(npz) as tmp, open(tmp, "wb") as f:  # a file object: numpy appends no ".npz" to it
            np.savez(f, ids=self.ids, vectors=self.vectors)
        return npz

    @classmethod
    def load(cls, path: str | Path) -> ImageKnnIndex:
        npz, meta = cls._paths(path)
        with np.load(npz, allow_pickle=False) as arrays:  # never unpickle: the file may come from anywhere
            ids, vectors = arrays["ids"], arrays["vectors"]
        strings = json.loads(meta.read_text())
        return cls(ids, vectors, strings["image_paths"], strings["names"])


KNN_COVERAGE = 0.9  # an evaluation's index serves a catalog when it holds this share of the wanted products


class IndexNotBuilt(LookupError):
    """No stored index covers the catalog and embedding it was not allowed here (a job should build it)."""


def index_for_catalog(wanted: Sequence[int], products: pd.DataFrame, image_path: Callable[[int], Path],
                      embed_paths: Callable[[list[tuple[int, Path]]], tuple[list[int], np.ndarray, list[int]]]
                      | None = None, evaluation_index: Path | None = None,
                      cache_path: Path | None = None) -> ImageKnnIndex:
    """The image-kNN index over `wanted` products, from the cheapest source that has it.

    1. an evaluation's `catalog_knn` embedded with the same model, when it covers `KNN_COVERAGE` of them;
    2. `cache_path`, an index this function saved before (keyed by its caller);
    3. `embed_paths` over the images (a minute on 2 cores for a few thousand), saved to `cache_path`;
       without `embed_paths`, IndexNotBuilt.
    Unreadable, torn or foreign files are skipped, never trusted."""
    names = products["productDisplayName"]
    unreadable = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)
    if evaluation_index is not None and evaluation_index.is_file():
        try:
            stored = ImageKnnIndex.load(evaluation_index)
        except unreadable:
            stored = None
        if stored is not None:
            rows = [i for i, pid in enumerate(stored.ids) if int(pid) in products.index]
            if len(rows) >= KNN_COVERAGE * len(wanted):
                kept = stored.ids[rows]
                return ImageKnnIndex(kept, stored.vectors[rows], [str(image_path(i)) for i in kept],
                                     names.loc[kept].tolist())
    if cache_path is not None:
        try:
            return ImageKnnIndex.load(cache_path)
        except unreadable:
            pass  # absent, torn or unreadable: embed afresh
    if embed_paths is None:
        raise IndexNotBuilt(f"no stored image index covers these {len(wanted):,} products yet")
    kept, matrix, _ = embed_paths([(int(i), image_path(int(i))) for i in wanted])
    index = ImageKnnIndex(np.asarray(kept), matrix, [str(image_path(i)) for i in kept], names.loc[kept].tolist())
    if cache_path is not None:
        try:
            index.save(cache_path)
        except OSError:
            pass  # a read-only checkout still works, it just embeds again next time
    return index
