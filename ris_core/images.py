"""Safe image loading: any mode or format Pillow reads becomes a square RGB image, or a clear error."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ris_core.errors import ImageError

MAX_PIXELS = 40_000_000  # a 100-megapixel upload is refused before it is decoded
MAX_ASPECT = 25.0  # a 1 x 40,000,000 strip fits the pixel budget but is no photo (and costs gigabytes to pad)
BACKGROUND = (255, 255, 255)  # product photos are shot on white; pad with the same
# How a larger photo is brought down to the training images' resolution. Bicubic beat bilinear, lanczos, box and
# JPEG round trips on held-out products outside data/demo for both runs probed (`python -m bench.probe_shrink`;
# results/cpu-preset.md, "Shrinking larger photos another way"). Part of every cache key of shrunk images.
SHRINK = Image.Resampling.BICUBIC
SHRINK_NAME = SHRINK.name.lower()


def open_image(source: str | Path | bytes, max_pixels: int = MAX_PIXELS,
               max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Decode to RGB, first frame only, alpha flattened onto white, 16-bit and CMYK converted.

    The declared size is checked before any pixel is decoded: over `max_pixels`, or longer than `max_aspect`
    times its width (or height), the file is refused with ImageError."""
    name = "upload" if isinstance(source, bytes) else str(source)
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as err:
        raise ImageError(f"{name}: cannot open ({err.strerror})") from err
    with stream, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(stream)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{name}: {width}x{height} is {width * height / 1e6:.0f} megapixels, over the "
                    f"{max_pixels / 1e6:.0f}-megapixel limit; downscale it first"
                )
            if min(width, height) >= 1 and max(width, height) > max_aspect * min(width, height):
                raise ImageError(f"{name}: {width}x{height} is not a photo's shape (sides over {max_aspect:.0f}:1)")
            image.seek(0)  # animated GIF/WebP: the first frame
            image.load()
        except ImageError:
            raise
        except UnidentifiedImageError as err:  # its message names the stream object, not the file
            raise ImageError(f"{name}: not an image in a format Pillow reads (JPEG, PNG, WebP, GIF, ...)") from err
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageError(f"{name}: not a readable image ({err})") from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageError(f"{name}: truncated or corrupt image ({err})") from err
    if width < 1 or height < 1:
        raise ImageError(f"{name}: empty image")
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float64)), 0, None)
        peak = array.max()
        # float images usually hold 0-1 intensities; integer ones use part of their range
        peak = 1.0 if image.mode == "F" and peak <= 1.0 else (peak or 1.0)
        image = Image.fromarray((array * (255.0 / peak)).round().astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        canvas = Image.new("RGB", image.size, BACKGROUND)
        canvas.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return canvas
    return image.convert("RGB")


def shrink_to_source(image: Image.Image, source_max_side: int | None) -> Image.Image:
    """A photo larger than `source_max_side` shrunk (aspect kept) to the resolution the model was trained on
    (60x80 for the small dataset), so a sharp 240-px photo looks like the training data; others unchanged."""
    if not source_max_side or max(image.size) <= source_max_side:
        return image
    image = image.copy()
    image.thumbnail((source_max_side, source_max_side), SHRINK)
    return image


def square(image: Image.Image, size: int, source_max_side: int | None = None) -> Image.Image:
    """Pad to a white square and resize to `size`, after `shrink_to_source(image, source_max_side)`."""
    image = shrink_to_source(image, source_max_side)
    if max(image.size) > 4 * size:  # e.g. 1x39999: padding first would allocate gigabytes
        image = image.copy()
        image.thumbnail((4 * size, 4 * size), Image.Resampling.BILINEAR)
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas.resize((size, size), Image.Resampling.BILINEAR)
