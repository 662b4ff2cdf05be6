"""`NotebookCaptionerAdapter`: the notebook's model behind the same captioner interface as our runs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from ris_core.captioning import CaptionBatch, CaptionerBase
from ris_core.images import square
from ris_core.modeling import ModelSpec
from ris_core.paper_notebook.checkpoint import load_notebook_dir
from ris_core.paper_notebook.layout import DECODING_MODES, DEFAULT_MODE, NOTEBOOK_DIR
from ris_core.paper_notebook.model import NotebookCaptioner

PREPROCESSING = ("stretch", "pad")  # the notebook's own (every notebook checkpoint was trained on it), or ours


def stretched(image: Image.Image, size: int) -> torch.Tensor:
    """(1, 3, size, size) float pixels 0-255: `image` resized as albumentations' Resize does (OpenCV INTER_LINEAR:
    bilinear, half-pixel centres, no antialiasing) and rounded to 8 bits as its uint8 output is."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    return resized.round().clamp(0, 255)


def recorded_preprocessing(model_dir: Path) -> str:
    """What the importer recorded in notebook/config.json ("stretch" when it recorded nothing)."""
    try:
        extra = json.loads((Path(model_dir) / "config.json").read_text()).get("extra") or {}
    except (OSError, ValueError, AttributeError):
        extra = {}
    value = extra.get("preprocessing") if isinstance(extra, dict) else None
    return value if value in PREPROCESSING else "stretch"


@dataclass
class NotebookCaptionerAdapter(CaptionerBase):
    """`ris_core.captioner.ImageCaptioner` over the notebook's model: captions, losses and embeddings; no
    beam search and no candidate scoring, so `can_rerank` is False and the pipeline skips reranking.

    Preprocessing as the notebook trained: every image stretched to `image_size` x `image_size` (224; bilinear,
    as albumentations' `Resize`, i.e. OpenCV's INTER_LINEAR, rounded back to 8 bits), then (x/255 - 0.5) / 0.5.
    `preprocessing="pad"` pads to a white square first instead, like our runs (the importer records "stretch").
    Held-out loss: both definitions, ours (first token predicted from BOS) and the notebook's (`LOSS_DEFINITIONS`).
    """

    model: NotebookCaptioner
    spec: ModelSpec  # descriptive only: what the dashboard shows about the model's shape
    name: str = "paper-notebook"
    mode: str = DEFAULT_MODE  # one of DECODING_MODES
    seed: int = 0  # used by the "notebook" (sampling) mode only
    preprocessing: str = "stretch"  # one of PREPROCESSING
    stats: dict = field(default_factory=dict)
    can_rerank: ClassVar[bool] = False  # its model scores no candidate captions and has no beam search

    @classmethod
    def from_model(cls, model: NotebookCaptioner, name: str = "paper-notebook", mode: str = DEFAULT_MODE,
                   seed: int = 0, preprocessing: str = "stretch") -> NotebookCaptionerAdapter:
        if mode not in DECODING_MODES:
            raise ValueError(f"unknown decoding mode {mode!r}; choose one of {sorted(DECODING_MODES)}")
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"unknown preprocessing {preprocessing!r}; choose one of {sorted(PREPROCESSING)}")
        c = model.config
        spec = ModelSpec(
            encoder="paper-notebook-vit", image_size=c.image_size, multi_scale=False, vit_patch=c.patch,
            vit_layers=c.depth, vit_width=c.width, decoder="paper-notebook-gpt2", n_layer=c.depth, n_embd=c.width,
            n_head=c.heads, n_positions=c.n_positions, dropout=0.0, source_max_side=None,
        )
        return cls(model=model, spec=spec, name=name, mode=mode, seed=seed, preprocessing=preprocessing)

    @classmethod
    def load(cls, path: str | Path, mode: str = DEFAULT_MODE, seed: int = 0) -> NotebookCaptionerAdapter:
        """From an imported run folder (uses its notebook/) or from a notebook/ folder itself."""
        path = Path(path)
        model_dir = path / NOTEBOOK_DIR if (path / NOTEBOOK_DIR).is_dir() else path
        name = path.name if model_dir != path else path.parent.name
        return cls.from_model(load_notebook_dir(model_dir), name=name, mode=mode, seed=seed,
                              preprocessing=recorded_preprocessing(model_dir))

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        size = self.model.config.image_size
        if self.preprocessing == "pad":
            arrays = [np.asarray(square(im.convert("RGB"), size), dtype=np.float32) for im in images]
            pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        else:
            pixels = torch.cat([stretched(im, size) for im in images])
        return (pixels / 255.0 - 0.5) / 0.5

    @torch.no_grad()
    def run_batch(self, images: list[Image.Image], references: list[str] | None = None, num_beams: int = 1,
                  max_new_tokens: int = 32) -> CaptionBatch:
        if num_beams != 1:
            raise ValueError(f"the paper notebook's decoder has no beam search (num_beams={num_beams}): pass "
                             f"num_beams=1; its decoding modes are {sorted(DECODING_MODES)}")
        states = self.model.encode(self.preprocess(images))  # the encoder runs once per batch
        out = CaptionBatch(captions=[], embeddings=self.model.image_embeddings(states).numpy().astype(np.float32))
        if references is not None:
            out.loss_sum, out.tokens = self.model.reference_loss(references, states=states)
            out.other_losses["notebook"] = self.model.reference_loss(references, states=states, definition="notebook")
        out.captions = self.model.generate(mode=self.mode, max_new_tokens=max_new_tokens, seed=self.seed,
                                           states=states)
        return out

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """L2-normalised mean of the final ViT tokens: the image-kNN embedding."""
        states = self.model.encode(self.preprocess(images))
        return self.model.image_embeddings(states).numpy().astype(np.float32)

    def n_best(self, images: list[Image.Image], num_beams: int = 5, max_new_tokens: int = 32) -> list[list[str]]:
        raise NotImplementedError("the paper notebook's decoder has no beam search (can_rerank is False)")

    def log_likelihoods(self, images: list[Image.Image], candidates: list[list[str]]) -> list[np.ndarray]:
        raise NotImplementedError("the paper notebook adapter scores no candidate captions (can_rerank is False)")
