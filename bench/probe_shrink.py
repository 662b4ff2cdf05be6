"""How should a larger photo be shrunk so that the captioner sees what it was trained on (60x80 JPEGs)?

    python -m bench.probe_shrink --run results/runs/reference-cpu --larger_dir ../shared/data/fashion-product-images

Tuning data for `ris_core.images.shrink_to_source`: the run's held-out products that `--larger_dir` holds, minus
the 400 of `data/demo` (on which `bench.probe_resolution` reports the resolution target, so they stay unseen here).
Each is captioned (greedy) from its 60x80 image and from its larger photo shrunk to the 80-px side in each way;
prints BLEU-4, last-two match and the share of captions identical to the 60x80 ones, per way.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from bench.probe_resolution import scores
from ris_core.data import Split, load_catalog
from ris_core.encoder_decoder import Captioner
from ris_core.images import open_image

SIDE = 80
FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
           "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}


def shrunk(resample: Image.Resampling, quality: int | None, side: int = SIDE) -> Callable[[Image.Image], Image.Image]:
    def apply(image: Image.Image) -> Image.Image:
        image = image.copy()
        image.thumbnail((side, side), resample)
        if quality is None:
            return image
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return apply


def ways(qualities: list[int], sides: list[int]) -> dict[str, Callable[[Image.Image], Image.Image] | None]:
    out: dict = {"as the captioner shrinks it": None}
    for name, resample in FILTERS.items():
        out[name] = shrunk(resample, None)
        out |= {f"{name} + JPEG q{q}": shrunk(resample, q) for q in qualities}
        out |= {f"{name} to {side} px": shrunk(resample, None, side) for side in sides if side != SIDE}
    return out


def probe(run: Path, small_dir: Path, larger_dir: Path, exclude_dir: Path, qualities: list[int],
          sides: list[int], filters: list[str], limit: int | None = None) -> dict:
    captioner = Captioner.load(run)
    catalog = load_catalog(small_dir)
    excluded = {int(p.stem) for p in (exclude_dir / "images").glob("*.jpg")} if exclude_dir.is_dir() else set()
    ids = [i for i in Split.load(run / "split.json").val_ids
           if i not in excluded and (larger_dir / "images" / f"{i}.jpg").is_file()][:limit]
    if not ids:
        raise SystemExit(f"error: no held-out product of {run} in {larger_dir} outside {exclude_dir}")
    references = catalog.products.loc[ids, "productDisplayName"].tolist()
    small = captioner.caption([open_image(catalog.image_path(i)) for i in ids])
    larger = [open_image(larger_dir / "images" / f"{i}.jpg") for i in tqdm(ids, desc="reading", mininterval=2)]
    out: dict = {"run": str(run), "products": len(ids), "60x80": scores(small, references), "ways": {}}
    chosen = {name: way for name, way in ways(qualities, sides).items()
              if way is None or name.split()[0] in filters}
    for name, transform in tqdm(chosen.items(), desc="ways", mininterval=2):
        captions = captioner.caption([transform(im) if transform else im for im in larger])
        out["ways"][name] = scores(captions, references) | {
            "identical_to_60x80": sum(a == b for a, b in zip(captions, small)) / len(ids)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--small_dir", type=Path, default=Path("../shared/data/fashion-product-images-small"))
    parser.add_argument("--larger_dir", type=Path, default=Path("../shared/data/fashion-product-images"))
    parser.add_argument("--exclude_dir", type=Path, default=Path("data/demo"),
                        help="products of this folder are left out (the resolution target's)")
    parser.add_argument("--qualities", type=int, nargs="*", default=[90, 75, 50])
    parser.add_argument("--sides", type=int, nargs="*", default=[], help="also shrink to these sides (px)")
    parser.add_argument("--filters", nargs="*", default=list(FILTERS), choices=list(FILTERS))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = probe(args.run, args.small_dir, args.larger_dir, args.exclude_dir, args.qualities, args.sides,
                   args.filters, args.limit)
    base = result["60x80"]
    print(f"{result['run']}: {result['products']} held-out products; at 60x80 BLEU-4 {base['bleu_4']:.1f}, "
          f"last two {base['last_two_match']:.1%}, first word {base['first_word_match']:.1%}")
    print("| larger photo shrunk | BLEU-4 | last two | first word | identical to 60x80 |\n|---|---:|---:|---:|---:|")
    for name, r in result["ways"].items():
        print(f"| {name} | {r['bleu_4']:.1f} | {r['last_two_match']:.1%} | {r['first_word_match']:.1%} | "
              f"{r['identical_to_60x80']:.1%} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
