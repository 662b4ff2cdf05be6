"""What a captioner offers, and how to open the one of any run folder.

    captioner = load_any_captioner("results/runs/reference-cpu")
    captioner.caption([image])                  # greedy captions
    captioner.embed([image])                    # L2-normalised image embeddings (the image-kNN baseline)
    if captioner.can_rerank:                    # beam n-best and candidate likelihoods (ris_core/rerank.py)
        captioner.n_best([image], num_beams=5)

Implementations: `ris_core.encoder_decoder.Captioner` (our runs' model/ folder) and
`ris_core.paper_notebook.NotebookCaptionerAdapter` (an imported paper notebook's notebook/ folder).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from ris_core.allocator import keep_freed_memory
from ris_core.captioning import CaptionBatch, CaptionerBase, ProgressHook
from ris_core.encoder_decoder import Captioner
from ris_core.paper_notebook import DEFAULT_MODE, NotebookCaptionerAdapter, is_notebook_run

if TYPE_CHECKING:
    import torch

__all__ = ["CaptionBatch", "Captioner", "CaptionerBase", "ImageCaptioner", "ProgressHook", "load_any_captioner"]


@runtime_checkable
class ImageCaptioner(Protocol):
    """Everything the evaluation, the reranker, refinement and the dashboard ask of a captioner."""

    name: str
    stats: dict
    can_rerank: bool  # n_best and log_likelihoods work (False: the pipeline skips reranking)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor: ...

    def run_batch(self, images: list[Image.Image], references: list[str] | None = None, num_beams: int = 1,
                  max_new_tokens: int = 32) -> CaptionBatch: ...

    def caption(self, images: list[Image.Image], batch_size: int = 64, num_beams: int = 1) -> list[str]: ...

    def caption_paths(self, items: Iterable[tuple[int, Path]], batch_size: int = 64, num_beams: int = 1,
                      references: dict[int, str] | None = None, progress: bool = True, desc: str = "captioning",
                      hook: ProgressHook | None = None,
                      ) -> Iterator[tuple[list[int], CaptionBatch, list[tuple[int, str]]]]: ...

    def embed(self, images: list[Image.Image]) -> np.ndarray: ...

    def embed_paths(self, items: list[tuple[int, Path]], batch_size: int = 128, progress: bool = True,
                    desc: str = "embedding", hook: ProgressHook | None = None,
                    ) -> tuple[list[int], np.ndarray, list[int]]: ...

    def n_best(self, images: list[Image.Image], num_beams: int = 5, max_new_tokens: int = 32) -> list[list[str]]: ...

    def log_likelihoods(self, images: list[Image.Image], candidates: list[list[str]]) -> list[np.ndarray]: ...

    def backbone_arithmetic(self) -> str | None: ...


def load_any_captioner(run_dir: str | Path, notebook_mode: str = DEFAULT_MODE) -> ImageCaptioner:
    """The captioner of any run folder: the notebook adapter for an imported paper notebook, else ours.

    CheckpointError says what is wrong when the folder holds no usable checkpoint."""
    keep_freed_memory()  # a process that runs a captioner reuses its activations' memory (ris_core/allocator.py)
    if is_notebook_run(run_dir):
        return NotebookCaptionerAdapter.load(run_dir, mode=notebook_mode)
    return Captioner.load(run_dir)
