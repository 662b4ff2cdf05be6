"""The visual baseline a practitioner would deploy: a CLIP-style image-text embedding trained on the same
products and names as the captioner (as FashionCLIP is), on frozen features, in seconds on 2 cores.

Image side: the captioner encoder's pooled features (MobileNetV2 for our runs) through a 2-layer projection;
text side: frozen all-MiniLM-L6-v2 name embeddings through another. Symmetric InfoNCE with a learned
temperature, trained on the training split only. Two searches come out of it: image-to-image kNN in the
learned space, and image-to-name (a photo against the catalog's names, no caption generated).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ris_core.construction import MODEL_CONSTRUCTION
from ris_core.files import atomic_path


@dataclass(frozen=True)
class ContrastiveConfig:
    dim: int = 256  # the shared embedding's width
    hidden: int = 512
    epochs: int = 15
    batch_size: int = 512
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0


class Projection(nn.Module):
    """Standardise the frozen features, then Linear-GELU-Linear to the shared space (unit length)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net((x - self.mean) / self.std), dim=-1)


class ContrastiveModel(nn.Module):
    def __init__(self, image_dim: int, text_dim: int, config: ContrastiveConfig) -> None:
        super().__init__()
        self.image = Projection(image_dim, config.hidden, config.dim)
        self.text = Projection(text_dim, config.hidden, config.dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    @torch.no_grad()
    def embed_images(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        return _apply(self.image, features, batch_size)

    @torch.no_grad()
    def embed_texts(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        return _apply(self.text, features, batch_size)


def _apply(module: nn.Module, features: np.ndarray, batch_size: int) -> np.ndarray:
    module.eval()
    chunks = [module(torch.from_numpy(np.ascontiguousarray(features[i : i + batch_size], dtype=np.float32)))
              for i in range(0, len(features), batch_size)]
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, module.net[-1].out_features), np.float32)


def train_contrastive(image_features: np.ndarray, text_features: np.ndarray, config: ContrastiveConfig,
                      progress: Callable[[int, int], None] | None = None) -> ContrastiveModel:
    """Fit both projections so each image is nearest its own name among the batch's (symmetric InfoNCE)."""
    if len(image_features) != len(text_features) or len(image_features) < 2:
        raise ValueError(f"need paired features for at least 2 products, got {len(image_features)} and "
                         f"{len(text_features)}")
    torch.manual_seed(config.seed)
    images = torch.from_numpy(np.asarray(image_features, dtype=np.float32))
    texts = torch.from_numpy(np.asarray(text_features, dtype=np.float32))
    with MODEL_CONSTRUCTION:
        model = ContrastiveModel(images.shape[1], texts.shape[1], config)
    for projection, data in ((model.image, images), (model.text, texts)):
        projection.mean.copy_(data.mean(0))
        projection.std.copy_(data.std(0).clamp(min=1e-6))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = config.epochs * max(1, len(images) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=steps,
                                                   pct_start=0.1)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - config.batch_size + 1 if len(images) >= config.batch_size else 1,
                           config.batch_size):
            rows = order[start : start + config.batch_size]
            a, b = model.image(images[rows]), model.text(texts[rows])
            logits = model.logit_scale.exp().clamp(max=100) * a @ b.T
            target = torch.arange(len(rows))
            loss = (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step < steps - 1:
                schedule.step()
            step += 1
            if progress is not None:
                progress(step, steps)
    return model.eval()


def save_contrastive(model: ContrastiveModel, config: ContrastiveConfig, path: Path, key: str) -> None:
    """Weights as safetensors, with the config and the cache key in its metadata."""
    from safetensors.torch import save_file

    metadata = {"key": key, **{k: str(v) for k, v in asdict(config).items()},
                "image_dim": str(model.image.mean.numel()), "text_dim": str(model.text.mean.numel())}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)


def load_contrastive(path: Path, key: str) -> ContrastiveModel | None:
    """The saved model when it was trained under `key`; None when absent, torn or trained on something else."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("key") != key:
            return None
        config = ContrastiveConfig(**{f: type(getattr(ContrastiveConfig(), f))(meta[f])
                                      for f in asdict(ContrastiveConfig())})
        with MODEL_CONSTRUCTION:
            model = ContrastiveModel(int(meta["image_dim"]), int(meta["text_dim"]), config)
        model.load_state_dict(load_file(str(path)))
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError):
        return None
    return model.eval()
