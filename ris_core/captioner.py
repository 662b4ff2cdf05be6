"""Caption images with a trained run: batched, greedy by default, deterministic; embeddings for image kNN."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutput

from ris_core.images import ImageError, open_image, square
from ris_core.modeling import (
    CheckpointError,
    ModelSpec,
    image_processor,
    load_model_dir,
    sequence_log_likelihoods,
    token_cross_entropy,
)
from ris_core.tokenizer import encode_captions, gpt2_tokenizer


@dataclass
class CaptionBatch:
    """What one pass over a batch of images gives: captions, pooled embeddings, and optionally the loss."""

    captions: list[str]
    embeddings: np.ndarray  # (B, D) L2-normalised, for image kNN
    loss_sum: float = 0.0  # summed token cross-entropy against the references, if given
    tokens: int = 0


@dataclass
class Captioner:
    model: torch.nn.Module
    spec: ModelSpec
    name: str = "captioner"
    stats: dict = field(default_factory=dict)
    can_rerank: ClassVar[bool] = True  # n_best and log_likelihoods work with this model (ris_core/rerank.py)

    @classmethod
    def load(cls, path: str | Path) -> Captioner:
        """From a run folder (uses its model/) or a model folder; CheckpointError says what is wrong."""
        path = Path(path)
        model_dir = path / "model" if (path / "model").is_dir() or (path / "run.json").is_file() else path
        if not model_dir.is_dir():
            raise CheckpointError(f"{path} has no model/ folder: this run has no checkpoint to caption with")
        model, spec = load_model_dir(model_dir)
        return cls(model=model, spec=spec, name=path.name)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        squared = [square(im, self.spec.image_size, self.spec.source_max_side) for im in images]
        processor = image_processor(self.spec)
        return processor(images=squared, return_tensors="pt")["pixel_values"]

    def _encode(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(encoder tokens, the same projected to the decoder's width, pooled image embedding)."""
        pixels = self.preprocess(images)
        encoder = self.model.encoder
        if hasattr(encoder, "backbone_maps"):
            mid, final = encoder.backbone_maps(pixels)
            raw = encoder.tokens_from_maps(mid, final)
            pooled = final.mean(dim=(2, 3))  # ImageNet CNN embedding: the visual-search baseline
        else:
            raw = encoder(pixel_values=pixels).last_hidden_state
            pooled = raw.mean(dim=1)
        projection = getattr(self.model, "enc_to_dec_proj", None)
        hidden = projection(raw) if projection is not None and _has_projection(self.model) else raw
        return raw, hidden, pooled

    @torch.no_grad()
    def run_batch(self, images: list[Image.Image], references: list[str] | None = None, num_beams: int = 1,
                  max_new_tokens: int = 32) -> CaptionBatch:
        raw, hidden, pooled = self._encode(images)
        out = CaptionBatch(captions=[], embeddings=torch.nn.functional.normalize(pooled, dim=1).numpy())
        if references is not None:
            loss, tokens = token_cross_entropy(self.model, hidden, _label_tensor(references))
            out.loss_sum, out.tokens = loss.item() * tokens, tokens
        # the encoder ran once; generate() projects `raw` itself. The mask only says "every image token is real":
        # pad == eos, so generate() cannot infer it and warns otherwise (same tokens either way).
        token_mask = torch.ones(raw.shape[:2], dtype=torch.long)
        generated = self.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=raw),
                                        attention_mask=token_mask,
                                        num_beams=num_beams, max_new_tokens=max_new_tokens)
        out.captions = [c.strip() for c in gpt2_tokenizer().batch_decode(generated, skip_special_tokens=True)]
        return out

    @torch.no_grad()
    def log_likelihoods(self, images: list[Image.Image], candidates: list[list[str]]) -> list[np.ndarray]:
        """The model's summed log-probability of each image's candidate captions (one array per image)."""
        _, hidden, _ = self._encode(images)
        rows = [i for i, texts in enumerate(candidates) for _ in texts]
        flat = [text for texts in candidates for text in texts]
        if not flat:
            return [np.zeros(0) for _ in candidates]
        scores = sequence_log_likelihoods(self.model, hidden[rows], _label_tensor(flat)).numpy()
        bounds = np.cumsum([0] + [len(texts) for texts in candidates])
        return [scores[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    @torch.no_grad()
    def n_best(self, images: list[Image.Image], num_beams: int = 5, max_new_tokens: int = 32) -> list[list[str]]:
        """Each image's beam-search hypotheses, likeliest first (candidates for reranking)."""
        raw, _, _ = self._encode(images)
        generated = self.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=raw),
                                        attention_mask=torch.ones(raw.shape[:2], dtype=torch.long),
                                        num_beams=num_beams, num_return_sequences=num_beams,
                                        max_new_tokens=max_new_tokens)
        texts = [c.strip() for c in gpt2_tokenizer().batch_decode(generated, skip_special_tokens=True)]
        return [texts[i * num_beams : (i + 1) * num_beams] for i in range(len(images))]

    def caption(self, images: list[Image.Image], batch_size: int = 64, num_beams: int = 1) -> list[str]:
        captions: list[str] = []
        for start in range(0, len(images), batch_size):
            captions += self.run_batch(images[start : start + batch_size], num_beams=num_beams).captions
        return captions

    def caption_paths(self, items: Iterable[tuple[int, Path]], batch_size: int = 64, num_beams: int = 1,
                      references: dict[int, str] | None = None, progress: bool = True,
                      desc: str = "captioning") -> Iterator[tuple[list[int], CaptionBatch, list[tuple[int, str]]]]:
        """Stream (ids, batch result, skipped [(id, why)]) over image files; unreadable images are skipped."""
        items = list(items)
        bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, mininterval=2)
        started, done = time.perf_counter(), 0
        for start in range(0, len(items), batch_size):
            ids, images, skipped = [], [], []
            for pid, path in items[start : start + batch_size]:
                try:
                    images.append(open_image(path))
                    ids.append(pid)
                except ImageError as err:
                    skipped.append((pid, str(err)))
            result = CaptionBatch(captions=[], embeddings=np.zeros((0, 1)))
            if images:
                refs = [references[i] for i in ids] if references is not None else None
                result = self.run_batch(images, references=refs, num_beams=num_beams)
            done += len(ids)
            bar.update(len(ids) + len(skipped))
            self.stats["images_per_second"] = done / max(time.perf_counter() - started, 1e-9)
            yield ids, result, skipped
        bar.close()


def _label_tensor(texts: list[str]) -> torch.Tensor:
    """Caption token ids + EOS, padded with -100 (ignored by the loss)."""
    labels = encode_captions(texts)
    tensor = torch.full((len(labels), max(map(len, labels))), -100, dtype=torch.long)
    for row, seq in enumerate(labels):
        tensor[row, : len(seq)] = torch.tensor(seq)
    return tensor


def _has_projection(model) -> bool:
    return model.encoder.config.hidden_size != model.decoder.config.hidden_size


def embed_images(captioner: Captioner, images: list[Image.Image]) -> np.ndarray:
    """L2-normalised pooled encoder features (no decoding): the image-kNN embedding."""
    with torch.no_grad():
        pixels = captioner.preprocess(images)
        encoder = captioner.model.encoder
        if hasattr(encoder, "backbone_maps"):
            pooled = encoder.backbone_maps(pixels)[1].mean(dim=(2, 3))
        else:
            pooled = encoder(pixel_values=pixels).last_hidden_state.mean(dim=1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


def embed_paths(captioner: Captioner, items: list[tuple[int, Path]], batch_size: int = 128,
                progress: bool = True, desc: str = "embedding") -> tuple[list[int], np.ndarray, list[int]]:
    """Embeddings of image files: (ids kept, matrix, ids skipped because unreadable)."""
    kept, chunks, skipped = [], [], []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", disable=not progress,
                      mininterval=2):
        ids, images = [], []
        for pid, path in items[start : start + batch_size]:
            try:
                images.append(open_image(path))
                ids.append(pid)
            except ImageError:
                skipped.append(pid)
        if images:
            chunks.append(embed_images(captioner, images))
            kept += ids
    matrix = np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype=np.float32)
    return kept, matrix.astype(np.float32), skipped
