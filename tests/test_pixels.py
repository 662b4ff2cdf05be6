"""Pixels for the encoder: the lookup-table path equals the image processor's bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ris_core.images import open_image, square
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
