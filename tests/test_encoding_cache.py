"""The encoder-output cache: an image met again skips the encoder and gets exactly the same output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ris_core.encoding_cache import MAX_BUDGET_MB, EncodingCache, default_budget_mb, image_key


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)) for _ in range(n)]


class CountingEncoder:
    """A deterministic stand-in: a bf16-exact part, a float32 part, and a part the model lacks (None)."""

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, images: list[Image.Image]):
        self.seen += len(images)
        pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images])
        return pixels.to(torch.bfloat16).float(), pixels / 7.0, None


def test_images_met_again_are_not_encoded_again_and_get_the_same_parts():
    encoder, cache = CountingEncoder(), EncodingCache(budget_bytes=1 << 20)
    first, second = _images(5), _images(3, seed=1)
    cache.encode(first, encoder)
    mixed = [second[0], first[3], second[1], first[0], second[2], second[0]]  # repeats and new ones, shuffled
    got = cache.encode(mixed, encoder)
    assert encoder.seen == 5 + 4  # only the new ones (the repeated new one twice, in one call)
    expected = CountingEncoder()(mixed)
    assert got[2] is None
    for part, want in zip(got[:2], expected[:2]):
        assert part.dtype == torch.float32 and torch.equal(part, want)
    assert (cache.hits, cache.misses) == (2, 9)


def test_parts_are_kept_in_bf16_only_where_nothing_is_lost():
    cache = EncodingCache(budget_bytes=1 << 20)
    cache.encode(_images(1), CountingEncoder())
    exact, divided, _ = next(iter(cache._rows.values()))
    assert exact.dtype == torch.bfloat16 and divided.dtype == torch.float32


def test_the_least_recently_used_image_goes_once_the_budget_is_spent():
    images = _images(4)
    per_image = 8 * 6 * 3 * (2 + 4)  # the bf16 part and the float32 part
    encoder, cache = CountingEncoder(), EncodingCache(budget_bytes=3 * per_image)
    cache.encode(images[:3], encoder)
    cache.encode([images[0]], encoder)  # used again: now the most recent
    cache.encode([images[3]], encoder)  # over budget: images[1] goes
    assert len(cache) == 3 and cache.bytes == 3 * per_image
    encoder.seen = 0
    cache.encode([images[0], images[2], images[3]], encoder)
    assert encoder.seen == 0
    cache.encode([images[1]], encoder)
    assert encoder.seen == 1


def test_a_full_cache_answers_a_batch_whose_new_images_push_out_its_kept_ones():
    """A batch of kept and new images when the budget is spent: the new ones push out the least recent rows,
    which may be this batch's own kept ones (seen in a full evaluation of an fp32 captioner)."""
    images = _images(4)
    per_image = 8 * 6 * 3 * (2 + 4)
    encoder, cache = CountingEncoder(), EncodingCache(budget_bytes=2 * per_image)
    cache.encode(images[:2], encoder)
    batch = [images[0], images[2], images[3], images[1]]  # two kept (the older first), two new
    got = cache.encode(batch, encoder)
    for part, want in zip(got[:2], CountingEncoder()(batch)[:2]):
        assert torch.equal(part, want)
    assert (cache.hits, cache.misses) == (2, 4) and len(cache) == 2 and cache.bytes == 2 * per_image


def test_a_budget_too_small_for_one_image_keeps_nothing_and_still_encodes():
    encoder, cache = CountingEncoder(), EncodingCache(budget_bytes=10)
    images = _images(2)
    assert torch.equal(cache.encode(images, encoder)[1], CountingEncoder()(images)[1])
    assert len(cache) == 0 and cache.bytes == 0
    assert cache.encode([], lambda todo: ("empty", len(todo))) == ("empty", 0)  # the encoder's own empty answer


def test_keys_tell_pixels_mode_and_size_apart():
    image = _images(1)[0]
    assert image_key(image) == image_key(image.copy())
    assert image_key(image) != image_key(image.convert("L").convert("RGB"))
    assert image_key(image) != image_key(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert image_key(image) != image_key(Image.frombytes("RGB", (8, 6), image.tobytes()))  # same bytes, turned


def test_the_default_budget_is_a_quarter_of_the_free_memory_at_most_4_gb(tmp_path: Path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    2048000 kB\n")
    assert default_budget_mb(meminfo) == 500  # 2,000 MB free
    meminfo.write_text("MemAvailable:   64000000 kB\n")
    assert default_budget_mb(meminfo) == MAX_BUDGET_MB
    meminfo.write_text("nothing useful\n")
    assert default_budget_mb(meminfo) == MAX_BUDGET_MB
    assert default_budget_mb(tmp_path / "missing") == MAX_BUDGET_MB


@pytest.mark.slow
def test_the_captioner_with_a_cache_encodes_and_captions_exactly_as_without(tiny_run: Path, tiny_catalog: Path):
    from ris_core.captioner import Captioner
    from ris_core.data import load_catalog

    catalog = load_catalog(tiny_catalog)
    images = [Image.open(catalog.image_path(i)).convert("RGB") for i in catalog.products.index[:12]]
    plain, cached = Captioner.load(tiny_run), Captioner.load(tiny_run)
    cached.encodings = EncodingCache(budget_bytes=1 << 30)
    assert np.array_equal(cached.embed(images[:8]), plain.embed(images[:8]))  # as the catalog pass fills it
    batch = images[4:12]  # half met before
    want, got = plain.encode(batch), cached.encode(batch)
    assert cached.encodings.hits == 4 and cached.encodings.misses == 12
    for name in ("raw", "hidden", "pooled"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert cached.caption(batch) == plain.caption(batch)
