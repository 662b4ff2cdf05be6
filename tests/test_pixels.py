"""Pixels for the encoder: larger photos shrunk as tuned, and the lookup-table path equals the image processor's
bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ris_core.data import load_catalog
from ris_core.encoder_decoder import Captioner
from ris_core.images import open_image, shrink_to_source, square
from ris_core.modeling import ModelSpec, image_processor, pixel_values
from tests.conftest import REPO


@pytest.mark.parametrize("encoder", ["mobilenet_v2", "google/vit-base-patch16-224-in21k"])  # two normalisations
def test_pixel_values_equal_the_processor_s_bit_for_bit(encoder: str):
    spec = ModelSpec(encoder=encoder)
    photos = sorted(Path(REPO / "data/demo/images").glob("*.jpg"))[:40]
    squares = [square(open_image(p), spec.image_size, spec.source_max_side) for p in photos]
    squares.append(Image.new("RGB", (spec.image_size,) * 2, (0, 128, 255)))  # extreme levels
    squares.append(Image.fromarray(np.arange(spec.image_size ** 2 * 3, dtype=np.uint32).astype(np.uint8)
                                   .reshape(spec.image_size, spec.image_size, 3)))  # every level in every channel
    expected = image_processor(spec)(images=squares, return_tensors="pt")["pixel_values"]
    got = pixel_values(spec, squares)
    assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected)


def test_images_not_at_the_model_s_size_go_through_the_processor():
    spec = ModelSpec()
    odd = [Image.new("RGB", (60, 80), (10, 20, 30)), Image.new("L", (spec.image_size,) * 2, 77).convert("RGB")]
    expected = image_processor(spec)(images=odd, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixel_values(spec, odd), expected)
    assert pixel_values(spec, odd).shape == (2, 3, spec.image_size, spec.image_size)


def test_larger_photos_are_shrunk_to_the_training_size_bicubic():
    """Bicubic won the shrink probe (bench/probe_shrink.py) on held-out products outside data/demo."""
    photo = open_image(sorted(Path(REPO / "data/demo/images").glob("*.jpg"))[0])
    size = photo.size
    assert max(size) > 80
    shrunk = shrink_to_source(photo, 80)
    assert max(shrunk.size) == 80 and photo.size == size  # aspect kept; the caller's image untouched
    ways = {}
    for name, resample in (("bicubic", Image.Resampling.BICUBIC), ("bilinear", Image.Resampling.BILINEAR)):
        ways[name] = photo.copy()
        ways[name].thumbnail((80, 80), resample)
    assert np.array_equal(np.asarray(shrunk), np.asarray(ways["bicubic"]))
    assert not np.array_equal(np.asarray(shrunk), np.asarray(ways["bilinear"]))  # the choice shows in the pixels
    small = Image.new("RGB", (60, 80), (1, 2, 3))
    assert shrink_to_source(small, 80) is small and shrink_to_source(photo, None) is photo
    assert np.array_equal(np.asarray(square(photo, 128, 80)), np.asarray(square(shrunk, 128)))


def test_every_cache_of_shrunk_photos_keys_on_the_shrink(tiny_run, tiny_catalog, monkeypatch):
    """Maps, embeddings and captions of photos shrunk another way are other files, never reused."""
    import ris_core.encoder_decoder
    import training.data

    captioner = Captioner.load(tiny_run)
    catalog = load_catalog(tiny_catalog)
    ids = [int(i) for i in catalog.products.index[:3]]
    before = captioner.embedding_key(), training.data._cache_key(catalog, ids, captioner.spec)
    monkeypatch.setattr(ris_core.encoder_decoder, "SHRINK_NAME", "lanczos")
    monkeypatch.setattr(training.data, "SHRINK_NAME", "lanczos")
    after = captioner.embedding_key(), training.data._cache_key(catalog, ids, captioner.spec)
    assert before[0] is not None and before[0] != after[0] and before[1] != after[1]
