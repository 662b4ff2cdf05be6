"""What the encoder made of an image, kept by the image's content so that a second pass over it skips the encoder.

An evaluation meets most images twice: a catalog product's photo is embedded for the visual index and later
captioned when it is a result to refine; a held-out photo is captioned and later reranked. The encoder (for
ours, the frozen CNN backbone, most of an image's cost) is deterministic and gives each image the same output
whatever batch it is in, so its output can be looked up instead of computed again.

    cache = EncodingCache(budget_bytes=4 << 30)
    parts = cache.encode(images, lambda todo: encoder_parts_of(todo))  # a tuple of (B, ...) tensors

Parts are kept per image in bfloat16 where that loses nothing (our backbone's bf16 maps), else as they are; the
least recently used image goes first once the budget is spent.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

Parts = tuple[torch.Tensor | None, ...]  # one encoder output, batched; None for a part a model does not have
MAX_BUDGET_MB = 4096  # the reference evaluation (44k photos) keeps 2.4 GB


def default_budget_mb(meminfo: str | Path = "/proc/meminfo") -> int:
    """A quarter of the memory available now, at most MAX_BUDGET_MB (MAX_BUDGET_MB where that cannot be read)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(meminfo).read_text().splitlines() if ":" in line)
        available_mb = int(fields["MemAvailable"].split()[0]) // 1024  # reported in kB
    except (OSError, KeyError, ValueError, IndexError):
        return MAX_BUDGET_MB
    return max(0, min(MAX_BUDGET_MB, available_mb // 4))


def image_key(image: Image.Image) -> bytes:
    """The image's pixels, size and mode, hashed: equal for two decodings of the same file."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(f"{image.mode}:{image.size}".encode())
    hasher.update(image.tobytes())
    return hasher.digest()


def _compact(row: torch.Tensor) -> torch.Tensor:
    """bfloat16 when every value survives the round trip, else an own copy in the original type."""
    if row.dtype == torch.float32:
        small = row.to(torch.bfloat16)
        if torch.equal(small.float(), row):
            return small
    return row.clone()


class EncodingCache:
    """Encoder outputs by image content within a byte budget; `hits` and `misses` count images."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._rows: OrderedDict[bytes, tuple[torch.Tensor | None, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def encode(self, images: list[Image.Image], compute: Callable[[list[Image.Image]], Parts]) -> Parts:
        """`compute(images)`, calling it only on the images not kept; the parts come back in float32."""
        if not images:
            return compute(images)
        keys = [image_key(image) for image in images]
        # the kept rows are taken (and made recent) first: keeping the new ones may push out old ones of this batch
        found = {i: self._use(key) for i, key in enumerate(keys) if key in self._rows}
        todo = [i for i in range(len(images)) if i not in found]
        self.hits, self.misses = self.hits + len(found), self.misses + len(todo)
        if todo:
            parts = compute([images[i] for i in todo])
            for row, i in enumerate(todo):
                found[i] = tuple(None if part is None else part[row] for part in parts)
                self._keep(keys[i], found[i])
        rows = [found[i] for i in range(len(images))]
        return tuple(None if rows[0][p] is None else torch.stack([r[p].float() for r in rows])
                     for p in range(len(rows[0])))

    def _use(self, key: bytes) -> tuple:
        self._rows.move_to_end(key)
        return self._rows[key]

    def _keep(self, key: bytes, row: tuple) -> None:
        if key in self._rows:  # the same image twice in one batch
            return
        kept = tuple(None if part is None else _compact(part) for part in row)
        size = sum(part.numel() * part.element_size() for part in kept if part is not None)
        if size > self.budget_bytes:
            return
        self._rows[key] = kept
        self.bytes += size
        while self.bytes > self.budget_bytes:
            _, dropped = self._rows.popitem(last=False)
            self.bytes -= sum(part.numel() * part.element_size() for part in dropped if part is not None)
