"""Rankings an evaluation already computed, keyed by what they were computed from, so a re-run searches only what
changed: a strategy whose queries are the same, or a visual space whose embeddings are the same, is read back.

    cache = RankingsCache.open(work_dir / "rankings_cache.npz")
    hits = cache.get(key)                 # list of id lists, or None
    cache.put(key, hits, scores)          # scores optional (the hybrids need the text side's BM25 scores)
    cache.save()                          # keeps only the entries this evaluation used

One .npz of plain arrays (never unpickled): per key, ids padded with -1 and optionally their scores.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ris_core.files import atomic_path

logger = logging.getLogger(__name__)


def _padded(rows: list[list[int]], width: int) -> np.ndarray:
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


@dataclass
class RankingsCache:
    path: Path
    stored: dict[str, np.ndarray] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, path: str | Path) -> RankingsCache:
        """The cache at `path`; a missing, torn or foreign file is an empty cache (everything is searched again)."""
        path = Path(path)
        if not path.is_file():
            return cls(path)
        try:
            with np.load(path, allow_pickle=False) as arrays:
                stored = {name: arrays[name] for name in arrays.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            logger.warning("ignoring the unreadable %s (%s): rankings are computed again", path.name, err)
            return cls(path)
        return cls(path, stored)

    def get(self, key: str) -> tuple[list[list[int]], list[list[float]] | None] | None:
        """(rankings, scores or None) stored under `key`, or None."""
        ids = self.stored.get(f"{key}.ids")
        if ids is None or ids.ndim != 2:
            return None
        scores = self.stored.get(f"{key}.scores")
        self.used.add(key)
        lengths = (ids >= 0).sum(axis=1)
        rankings = [row[:n].tolist() for row, n in zip(ids, lengths)]
        if scores is None or scores.shape != ids.shape:
            return rankings, None
        return rankings, [row[:n].tolist() for row, n in zip(scores, lengths)]

    def put(self, key: str, rankings: list[list[int]], scores: list[list[float]] | None = None) -> None:
        width = max((len(r) for r in rankings), default=0)
        self.stored[f"{key}.ids"] = _padded(rankings, width)
        if scores is not None:
            padded = np.zeros((len(scores), width))
            for i, row in enumerate(scores):
                padded[i, : len(row)] = row
            self.stored[f"{key}.scores"] = padded
        self.used.add(key)

    def save(self) -> None:
        """Write the entries used by this evaluation (older ones are dropped, so the file does not grow)."""
        kept = {name: array for name, array in self.stored.items() if name.split(".", 1)[0] in self.used}
        with atomic_path(self.path) as tmp, open(tmp, "wb") as handle:  # a file object: no ".npz" appended
            np.savez(handle, **kept)
