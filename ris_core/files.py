"""Atomic file writes and digests: every writer in the library goes through here.

A reader sees the old file or the new one, never half of either. Each write goes to a temp file in the
target's folder whose name is unique per call (`tempfile.mkstemp`: all dashboard sessions share one process,
so a PID is not enough), is flushed to disk, made readable by others, and `os.replace`d onto the target.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

FILE_MODE = 0o644  # results are shared: mkstemp's 0600 would hide them from other users


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp path beside `path`; once the block returns, the temp file becomes `path`.

    The block writes the temp file by any means (numpy, safetensors, sqlite). On an exception the temp file
    is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # the data reaches the disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_csv_atomic(path: str | Path, frame: pd.DataFrame) -> None:
    write_text_atomic(path, frame.to_csv(index=False))


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a handle: numpy appends no suffix to it
        np.save(handle, array)


def load_npy(path: str | Path) -> np.ndarray | None:
    """The array, or None when missing or torn (callers recompute it). Never unpickles."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None


def digest(*parts: object) -> str:
    """A short stable hash of JSON-able parts: the cache keys of evaluations, indexes and feature files."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            sha.update(block)
    return sha.hexdigest()
