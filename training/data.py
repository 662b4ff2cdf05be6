"""Training data: decode each image once, cache frozen encoder maps on disk, batch captions."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm
from transformers.trainer_pt_utils import get_length_grouped_indices

from ris_core.data import Catalog
from ris_core.files import atomic_path, digest, write_json_atomic
from ris_core.images import BACKGROUND, SHRINK_NAME, ImageError, open_image, square
from ris_core.modeling import ModelSpec, image_processor
from ris_core.precision import fast_bf16

logger = logging.getLogger(__name__)


def decode_images(catalog: Catalog, ids: list[int], spec: ModelSpec,
                  jitter_seed: int | None = None) -> tuple[torch.Tensor, list[int], list[int]]:
    """All images as one uint8 tensor (N, 3, S, S), decoded and resized once.

    Returns the tensor, the ids it holds, and the ids whose image could not be decoded (skipped).
    `jitter_seed` crops, rescales and mirrors each image at random first (`jitter`), the same way every time:
    each product's draw depends on the seed and its id only, not on which other products are decoded with it.
    """
    size = spec.image_size
    pixels = np.empty((len(ids), size, size, 3), dtype=np.uint8)
    kept, broken = [], []
    desc = "decoding images" if jitter_seed is None else f"decoding jittered images (view {jitter_seed})"
    for pid in tqdm(ids, desc=desc, unit="img", mininterval=2):
        try:
            image = open_image(catalog.image_path(pid))
            if jitter_seed is not None:
                image = jitter(image, np.random.default_rng([jitter_seed, int(pid)]))
            image = square(image, size, spec.source_max_side)
        except ImageError as err:
            logger.warning("skipping product %s: %s", pid, err)
            broken.append(pid)
            continue
        pixels[len(kept)] = np.asarray(image)
        kept.append(pid)
    return torch.from_numpy(pixels[: len(kept)]).permute(0, 3, 1, 2).contiguous(), kept, broken


# A crop keeps 60-100% of the photo's area at an aspect up to 1.2x off the original; then the product is
# shrunk into a margin of up to a quarter of its size: the framing and scale a user's photo may have.
JITTER_AREA = (0.6, 1.0)
JITTER_ASPECT = 1.2
JITTER_MARGIN = 0.25


def jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop, aspect change, margin and left-right mirror of `image` (drawn from `rng`)."""
    width, height = image.size
    area = rng.uniform(*JITTER_AREA)
    aspect = math.exp(rng.uniform(-math.log(JITTER_ASPECT), math.log(JITTER_ASPECT)))
    crop_w = max(1, min(width, round(width * math.sqrt(area * aspect))))
    crop_h = max(1, min(height, round(height * math.sqrt(area / aspect))))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    image = image.crop((left, top, left + crop_w, top + crop_h))
    margin = rng.uniform(0.0, JITTER_MARGIN)
    if margin > 0:
        canvas = Image.new("RGB", (round(crop_w * (1 + margin)), round(crop_h * (1 + margin))), BACKGROUND)
        canvas.paste(image, (int(rng.integers(0, canvas.width - crop_w + 1)),
                             int(rng.integers(0, canvas.height - crop_h + 1))))
        image = canvas
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def normalize(pixels_uint8: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    processor = image_processor(spec)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (pixels_uint8.float() / 255.0 - mean) / std


def _cache_key(catalog: Catalog, ids: list[int], spec: ModelSpec, jitter_seed: int | None = None) -> str:
    ident = {
        "data_dir": str(Path(catalog.image_dir).resolve()),
        "ids": [int(i) for i in ids],
        "encoder": spec.encoder, "image_size": spec.image_size, "source_max_side": spec.source_max_side,
        "version": 2,  # 2: backbone in bf16 autocast
        "shrink": SHRINK_NAME,  # how larger photos were brought to source_max_side
    }
    if jitter_seed is not None:  # another draw, or other bounds, are other maps
        ident["jitter"] = [jitter_seed, JITTER_AREA, JITTER_ASPECT, JITTER_MARGIN, "drawn per product"]
    if spec.backbone_precision != "bf16" or not fast_bf16():  # fp32 maps, or bf16 emulated: not the same bytes
        ident["backbone"] = spec.backbone_precision if spec.backbone_precision != "bf16" else "bf16-emulated"
    return digest(ident)


@torch.no_grad()
def cached_backbone_maps(model, catalog: Catalog, ids: list[int], spec: ModelSpec, cache_dir: Path,
                         batch_size: int = 256, mirrored: bool = False,
                         jitter_seed: int | None = None) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Frozen backbone maps for every id (float16), extracted once and stored as safetensors.

    Returns {"ids", "mid", "final"} and the ids skipped because their image was unreadable.
    `mirrored` extracts (once) the maps of the left-right mirrored images, for flip augmentation;
    `jitter_seed` those of one seeded draw of randomly cropped, rescaled and mirrored images (`jitter`).
    """
    key = _cache_key(catalog, ids, spec, jitter_seed)
    suffix = "-mirrored" if mirrored else "" if jitter_seed is None else f"-jitter{jitter_seed}"
    name = f"{spec.encoder}-{key}{suffix}.safetensors"
    path = Path(cache_dir) / "features" / name
    if path.is_file():
        try:
            cached = load_file(path)
            meta = json.loads(path.with_suffix(".json").read_text())
            logger.info("loaded cached encoder maps from %s", path)
            return cached, meta["broken"]
        except (OSError, ValueError, KeyError) as err:  # a torn or foreign file: rebuild it
            logger.warning("ignoring unreadable feature cache %s (%s)", path, err)
    pixels, kept, broken = decode_images(catalog, ids, spec, jitter_seed)
    mids, finals = [], []
    if mirrored:
        pixels = pixels.flip(-1)
    desc = f"extracting {suffix.lstrip('-') + ' ' if suffix else ''}encoder maps"
    for start in tqdm(range(0, len(kept), batch_size), desc=desc, unit="batch"):
        mid, final = model.encoder.backbone_maps(normalize(pixels[start : start + batch_size], spec))
        mids.append(mid.half())
        finals.append(final.half())
    maps = {"ids": torch.tensor(kept, dtype=torch.int64), "mid": torch.cat(mids), "final": torch.cat(finals)}
    write_json_atomic(path.with_suffix(".json"), {"broken": broken})
    with atomic_path(path) as tmp:
        save_file(maps, tmp)
    return maps, broken


@dataclass
class CaptionDataset(Dataset):
    """Rows of (encoder input, caption token ids): cached maps or normalised pixels."""

    labels: list[list[int]]
    maps: tuple[torch.Tensor, torch.Tensor] | None = None
    pixels: torch.Tensor | None = None  # uint8, normalised per batch
    spec: ModelSpec | None = None
    mirrored_maps: tuple[torch.Tensor, torch.Tensor] | None = None  # the same rows, images mirrored
    larger: LargerPhotos | None = None  # some rows' maps from a larger photo of the same product
    jittered: JitteredViews | None = None  # rows' maps from randomly cropped, rescaled, mirrored copies

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {"labels": self.labels[i]}
        if self.maps is None:
            item["pixels"] = self.pixels[i]
            return item
        if self.jittered is not None and (j := int(self.jittered.row[i])) >= 0 and torch.rand(()) < self.jittered.p:
            mid, final = self.jittered.views[int(torch.randint(len(self.jittered.views), ()))]
            item["mid"], item["final"] = mid[j], final[j]
            if self.mirrored_maps is not None:  # mirrored at random already: the collator's flip keeps it as it is
                item["mid_mirrored"], item["final_mirrored"] = item["mid"], item["final"]
            return item
        maps, mirrored = self.maps, self.mirrored_maps
        if self.larger is not None and (j := int(self.larger.row[i])) >= 0 and torch.rand(()) < self.larger.p:
            maps, mirrored, i = self.larger.maps, self.larger.mirrored_maps, j
        item["mid"], item["final"] = maps[0][i], maps[1][i]
        if mirrored is not None:
            item["mid_mirrored"], item["final_mirrored"] = mirrored[0][i], mirrored[1][i]
        return item


@dataclass
class LargerPhotos:
    """Maps of larger photos of some training products: `row[i]` indexes them for dataset row i (-1: none).

    A 168x224 photo shrunk to the model's 60x80 input is not the Kaggle 60x80 JPEG (other resampling, no
    block artefacts); showing both during training is what makes the captioner indifferent to the input's size.
    """

    row: torch.Tensor
    maps: tuple[torch.Tensor, torch.Tensor]
    mirrored_maps: tuple[torch.Tensor, torch.Tensor] | None
    p: float


@dataclass
class JitteredViews:
    """Maps of seeded random crops, rescalings and mirrorings of the training images (`jitter`), one set per
    view: with chance `p` a row is shown from one of them, so the framing and scale of a photo matter less.
    `row[i]` indexes the views for dataset row i (-1: none).
    """

    row: torch.Tensor
    views: list[tuple[torch.Tensor, torch.Tensor]]
    p: float


class LengthBucketedSampler(Sampler[int]):
    """Batches of captions of similar length, the batches in random order.

    Batches are padded to their longest caption; random batches of 64 product names are 46% padding. Trainer's own
    `LengthGroupedSampler` groups them (sorted within mega-batches of 50 batches) but keeps each mega-batch's order,
    longest to shortest: for 50 steps at a time the model sees ever shorter captions, and an epoch ends on the
    shortest (an 8-layer decoder ended its first epoch at val perplexity 14.2 that way, 6.5 with random batches;
    results/cpu-preset.md). Here the same groups are shuffled as whole batches, the short last one kept last so
    every other batch stays whole. Draws from torch's global generator, which Trainer seeds and checkpoints.
    """

    def __init__(self, lengths: list[int], batch_size: int):
        self.lengths, self.batch_size = list(lengths), batch_size

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        grouped = get_length_grouped_indices(self.lengths, self.batch_size)
        batches = [grouped[k : k + self.batch_size] for k in range(0, len(grouped), self.batch_size)]
        whole, rest = (batches[:-1], batches[-1:]) if len(batches[-1]) < self.batch_size else (batches, [])
        for b in torch.randperm(len(whole)).tolist():
            yield from whole[b]
        for batch in rest:
            yield from batch


def make_collator(spec: ModelSpec, flip_p: float = 0.0):
    """Pads captions with -100; with flip_p > 0 mirrors that share of the batch left-right (training only).

    Pixels are flipped; cached maps are swapped for the maps of the mirrored image when the dataset has
    them. Flipping the maps themselves would be no substitute (`python -m bench.probe_flip`).
    """

    def collate(items: list[dict]) -> dict:
        width = max(len(it["labels"]) for it in items)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for row, it in enumerate(items):
            labels[row, : len(it["labels"])] = torch.tensor(it["labels"])
        batch = {"labels": labels}
        if "final" in items[0]:
            batch["mid"] = torch.stack([it["mid"] for it in items])
            batch["final"] = torch.stack([it["final"] for it in items])
        else:
            batch["pixel_values"] = normalize(torch.stack([it["pixels"] for it in items]), spec)
        if flip_p > 0:
            flip = torch.rand(len(items)) < flip_p
            if "pixel_values" in batch:
                batch["pixel_values"][flip] = batch["pixel_values"][flip].flip(-1)
            elif "final_mirrored" in items[0] and flip.any():
                chosen = [it for it, mirrored in zip(items, flip.tolist()) if mirrored]  # copy only those rows
                for key in ("mid", "final"):
                    batch[key][flip] = torch.stack([it[f"{key}_mirrored"] for it in chosen])
        return batch

    return collate
