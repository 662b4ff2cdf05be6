"""What every captioner shares: the result of one batch, and batched captioning of images and image files.

`CaptionerBase` gives `caption`, `caption_paths` and `embed_paths` to any class with `run_batch` and `embed`
(our encoder-decoder in `ris_core.encoder_decoder`, the paper notebook's in `ris_core.paper_notebook`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ris_core.errors import ImageError
from ris_core.images import open_image

ProgressHook = Callable[[str, int, int], None]  # (stage, done, total): drives a CLI bar or a page's progress bar


@dataclass
class CaptionBatch:
    """What one pass over a batch of images gives: captions, pooled embeddings, and optionally the loss."""

    captions: list[str]
    embeddings: np.ndarray  # (B, D) L2-normalised, for image kNN
    loss_sum: float = 0.0  # summed token cross-entropy against the references, if given
    tokens: int = 0
    other_losses: dict[str, tuple[float, int]] = field(default_factory=dict)  # other definitions: (sum, tokens)


def _open_all(items: list[tuple[int, Path]]) -> tuple[list[int], list[Image.Image], list[tuple[int, str]]]:
    """(ids decoded, images, [(id, why)] of the unreadable ones)."""
    ids, images, skipped = [], [], []
    for pid, path in items:
        try:
            images.append(open_image(path))
            ids.append(pid)
        except ImageError as err:
            skipped.append((pid, str(err)))
    return ids, images, skipped


class CaptionerBase:
    """Batched captioning over `run_batch(images, references, num_beams)` and `embed(images)`."""

    stats: dict

    def run_batch(self, images: list[Image.Image], references: list[str] | None = None, num_beams: int = 1,
                  max_new_tokens: int = 32) -> CaptionBatch:
        raise NotImplementedError

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        raise NotImplementedError

    def backbone_arithmetic(self) -> str | None:
        """How a frozen bf16/fp32 backbone computes on this machine, where the captioner has one."""
        return None

    def caption(self, images: list[Image.Image], batch_size: int = 64, num_beams: int = 1) -> list[str]:
        captions: list[str] = []
        for start in range(0, len(images), batch_size):
            captions += self.run_batch(images[start : start + batch_size], num_beams=num_beams).captions
        return captions

    def caption_paths(self, items: Iterable[tuple[int, Path]], batch_size: int = 64, num_beams: int = 1,
                      references: dict[int, str] | None = None, progress: bool = True, desc: str = "captioning",
                      hook: ProgressHook | None = None,
                      ) -> Iterator[tuple[list[int], CaptionBatch, list[tuple[int, str]]]]:
        """Stream (ids, batch result, skipped [(id, why)]) over image files; unreadable images are skipped."""
        items = list(items)
        bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, mininterval=2)
        started, done = time.perf_counter(), 0
        for start in range(0, len(items), batch_size):
            ids, images, skipped = _open_all(items[start : start + batch_size])
            result = CaptionBatch(captions=[], embeddings=np.zeros((0, 1)))
            if images:
                refs = [references[i] for i in ids] if references is not None else None
                result = self.run_batch(images, references=refs, num_beams=num_beams)
            done += len(ids)
            bar.update(len(ids) + len(skipped))
            if hook is not None:
                hook(desc, min(start + batch_size, len(items)), len(items))
            self.stats["images_per_second"] = done / max(time.perf_counter() - started, 1e-9)
            yield ids, result, skipped
        bar.close()

    def embed_paths(self, items: list[tuple[int, Path]], batch_size: int = 128, progress: bool = True,
                    desc: str = "embedding", hook: ProgressHook | None = None,
                    ) -> tuple[list[int], np.ndarray, list[int]]:
        """Embeddings of image files: (ids kept, matrix, ids skipped because unreadable)."""
        kept, chunks, skipped = [], [], []
        for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", disable=not progress,
                          mininterval=2):
            ids, images, bad = _open_all(items[start : start + batch_size])
            skipped += [pid for pid, _ in bad]
            if images:
                chunks.append(self.embed(images))
                kept += ids
            if hook is not None:
                hook(desc, min(start + batch_size, len(items)), len(items))
        matrix = np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype=np.float32)
        return kept, matrix.astype(np.float32), skipped
