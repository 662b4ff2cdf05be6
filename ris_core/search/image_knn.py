"""The traditional reverse image search baseline: nearest catalog images by cosine similarity.

Embeddings come from elsewhere (the captioner's image encoder); this module only stores and searches
them. Rows are L2-normalised once, so cosine similarity is a single matrix-vector product.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ris_core.runs import write_json_atomic
from ris_core.search import SearchResponse, SearchResult


def _normalise(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)  # an all-zero row stays zero (cosine 0 with everything)


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
        self.vectors = np.ascontiguousarray(_normalise(np.nan_to_num(vectors)), dtype=np.float32)
        self.image_paths = [str(p) for p in image_paths]
        self.names = [str(s) for s in names]
        self._row = {int(pid): i for i, pid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def vector_of(self, product_id: int) -> np.ndarray:
        """The stored (normalised) embedding of a catalog product, e.g. to query with its own image."""
        return self.vectors[self._row[int(product_id)]]

    def search_vector(
        self, vector: np.ndarray, k: int = 10, exclude_id: int | None = None, query: str = "<image>"
    ) -> SearchResponse:
        """Top `k` products by cosine similarity to `vector`, best first; `exclude_id` drops one product
        (the query image itself when evaluating on catalog images)."""
        start = time.perf_counter()
        q = np.nan_to_num(np.asarray(vector, dtype=np.float32).reshape(-1))
        if q.shape[0] != self.dim:
            raise ValueError(f"query vector has {q.shape[0]} dimensions, the index has {self.dim}")
        scores = self.vectors @ _normalise(q)
        if exclude_id is not None and int(exclude_id) in self._row:
            scores[self._row[int(exclude_id)]] = -np.inf
            available = len(scores) - 1
        else:
            available = len(scores)
        k = max(0, min(int(k), available))
        results: list[SearchResult] = []
        if k:
            # argpartition finds the top k in O(n); only those k are then sorted.
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.lexsort((self.ids[top], -scores[top]))]  # ties broken by id for stable output
            results = [
                SearchResult(
                    rank=r, title=self.names[i], image=self.image_paths[i], thumbnail=self.image_paths[i],
                    product_id=int(self.ids[i]), score=float(scores[i]),
                )
                for r, i in enumerate(top, start=1)
            ]
        return SearchResponse(query=query, backend=self.name, results=results, seconds=time.perf_counter() - start)

    @staticmethod
    def _paths(path: str | Path) -> tuple[Path, Path]:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        return path, path.with_suffix(".json")

    def save(self, path: str | Path) -> Path:
        """Write `<path>.npz` (ids, vectors: arrays only) and `<path>.json` (image paths, names); returns the npz."""
        npz, meta = self._paths(path)
        npz.parent.mkdir(parents=True, exist_ok=True)
        tmp = npz.with_name(f".{npz.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:  # a file object stops numpy appending its own ".npz" to the temp name
            np.savez(f, ids=self.ids, vectors=self.vectors)
        write_json_atomic(meta, {"image_paths": self.image_paths, "names": self.names, "rows": len(self.ids)})
        os.replace(tmp, npz)
        return npz

    @classmethod
    def load(cls, path: str | Path) -> ImageKnnIndex:
        npz, meta = cls._paths(path)
        with np.load(npz, allow_pickle=False) as arrays:  # never unpickle: the file may come from anywhere
            ids, vectors = arrays["ids"], arrays["vectors"]
        strings = json.loads(meta.read_text())
        return cls(ids, vectors, strings["image_paths"], strings["names"])
