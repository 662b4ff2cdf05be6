"""Is flipping cached backbone maps a stand-in for the maps of a mirrored image? (It is not: see below.)

    python -m bench.probe_flip   # cosine similarities over the first 512 products, printed

Measured 2026-11-30: stride-16 maps 0.790 to the flipped maps vs 0.847 to the unflipped ones (0.653 between
different products); final maps 0.868 vs 0.917 (0.610). Hence `--flip_p` extracts the mirrored maps once.
"""

from __future__ import annotations

import torch

from ris_core.data import load_catalog
from ris_core.modeling import ModelSpec, build_captioner
from training.data import decode_images, normalize

SMALL = "../shared/data/fashion-product-images-small"


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(1), b.float().flatten(1)).mean().item()


def main(data_dir: str = SMALL, n: int = 512) -> None:
    spec = ModelSpec(encoder="mobilenet_v2", image_size=128, multi_scale=True, decoder="scratch", n_layer=1,
                     n_embd=256, n_head=4, source_max_side=80)
    model = build_captioner(spec).eval()
    catalog = load_catalog(data_dir)
    pixels, _, _ = decode_images(catalog, catalog.products.index.tolist()[:n], spec)
    with torch.no_grad():
        plain = model.encoder.backbone_maps(normalize(pixels, spec))
        mirrored = model.encoder.backbone_maps(normalize(pixels.flip(-1), spec))
    for name, a, b in zip(("stride-16", "final"), plain, mirrored):
        print(f"{name} maps: cos(maps(mirrored image), flipped maps) {cosine(b, a.flip(-1)):.3f} | "
              f"cos(maps(mirrored image), maps) {cosine(b, a):.3f} | different products {cosine(a, a.roll(1, 0)):.3f}")


if __name__ == "__main__":
    main()
