"""Does the captioner's answer depend on the photo's size? Held-out products captioned from two copies.

    python -m bench.probe_resolution --run results/runs/reference-cpu            # the 400 held-out demo products
    python -m bench.probe_resolution --run R --larger_dir ../shared/data/fashion-product-images

Each held-out product of the run that `--larger_dir` also holds is captioned (greedy) from the dataset's own
60x80 image and from the larger photo (the demo's are 168x224 and similar), with the same model and code path
as the search demo; prints BLEU-4, last-two, last-word and first-word match at both sizes, the share of identical
captions, and the gap (larger minus 60x80) with a 95% paired bootstrap interval over products: whether a gap of a
point or two belongs to the model or to which 400 products were drawn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sacrebleu.metrics import BLEU
from tqdm.auto import tqdm

from ris_core.brand_step import first_word
from ris_core.data import Split, load_catalog
from ris_core.encoder_decoder import Captioner
from ris_core.images import open_image
from ris_core.metrics import corpus_bleu, last_words_match


def scores(captions: list[str], references: list[str]) -> dict[str, float]:
    n = len(references)
    return {"bleu_4": corpus_bleu(captions, references)["bleu_4"],
            "last_two_match": sum(map(last_words_match, captions, references)) / n,
            "last_word_match": sum(last_words_match(c, r, 1) for c, r in zip(captions, references)) / n,
            # mostly the brand: what a brand step names, from maps of one size
            "first_word_match": sum(first_word(c) == first_word(r) for c, r in zip(captions, references)) / n}


def size_gap(small: list[str], larger: list[str], references: list[str], n_boot: int = 1000,
             seed: int = 0) -> dict[str, dict[str, float]]:
    """Larger minus 60x80 on the same products: BLEU-4 and last-two match (in points), each the whole set's gap
    and a 95% percentile interval over `n_boot` resamples of the products, both sizes drawn together."""
    n = len(references)
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    bleu = BLEU()
    # per-caption n-gram counts, summed over each resample: how sacrebleu's own paired bootstrap test scores a corpus
    stats = {size: np.asarray(bleu._extract_corpus_statistics(captions, [references]), dtype=np.int64)
             for size, captions in (("small", small), ("larger", larger))}

    def corpus(size: str, rows: np.ndarray) -> float:
        return bleu._compute_score_from_stats(stats[size][rows].sum(axis=0).tolist()).score

    every = np.arange(n)
    bleu_gaps = np.array([corpus("larger", rows) - corpus("small", rows) for rows in draws])
    matched = {size: np.array([last_words_match(c, r) for c, r in zip(captions, references)], dtype=float)
               for size, captions in (("small", small), ("larger", larger))}
    two_gaps = 100 * (matched["larger"] - matched["small"])[draws].mean(axis=1)
    return {"bleu_4": {"gap": corpus("larger", every) - corpus("small", every),
                       "low": float(np.quantile(bleu_gaps, 0.025)), "high": float(np.quantile(bleu_gaps, 0.975))},
            "last_two_match": {"gap": 100 * float((matched["larger"] - matched["small"]).mean()),
                               "low": float(np.quantile(two_gaps, 0.025)), "high": float(np.quantile(two_gaps, 0.975))}}


def probe(run: Path, small_dir: Path, larger_dir: Path, batch_size: int = 64) -> dict:
    captioner = Captioner.load(run)
    catalog = load_catalog(small_dir)
    held_out = Split.load(run / "split.json").val_ids
    ids = [i for i in held_out if (larger_dir / "images" / f"{i}.jpg").is_file()]
    if not ids:
        raise SystemExit(f"error: none of the {len(held_out)} held-out products of {run} is in {larger_dir}")
    references = catalog.products.loc[ids, "productDisplayName"].tolist()
    out: dict = {"run": str(run), "products": len(ids), "larger_dir": str(larger_dir)}
    captions = {}
    for size, folder in (("small", catalog.image_dir), ("larger", larger_dir / "images")):
        images = [open_image(folder / f"{i}.jpg") for i in tqdm(ids, desc=f"reading {size} photos", mininterval=2)]
        captions[size] = captioner.caption(images, batch_size=batch_size)
        median = sorted(im.size for im in images)[len(ids) // 2]
        out[size] = scores(captions[size], references) | {"median_size": median}
    out["identical"] = sum(a == b for a, b in zip(captions["small"], captions["larger"])) / len(ids)
    out["gap"] = size_gap(captions["small"], captions["larger"], references)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--small_dir", type=Path, default=Path("../shared/data/fashion-product-images-small"),
                        help="the 60x80 dataset the run was trained on")
    parser.add_argument("--larger_dir", type=Path, default=Path("data/demo"), help="larger photos (Kaggle layout)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    result = probe(args.run, args.small_dir, args.larger_dir)
    print(f"{result['run']}: {result['products']} held-out products in {result['larger_dir']}")
    print("| photo | median size | BLEU-4 | last two | last word | first word |\n|---|---|---:|---:|---:|---:|")
    for size in ("small", "larger"):
        r = result[size]
        print(f"| {size} | {r['median_size'][0]}x{r['median_size'][1]} | {r['bleu_4']:.1f} | "
              f"{r['last_two_match']:.1%} | {r['last_word_match']:.1%} | {r['first_word_match']:.1%} |")
    print(f"identical captions at both sizes: {result['identical']:.1%}")
    gap = result["gap"]
    print("larger minus 60x80 (95% paired bootstrap interval over the products): " + ", ".join(
        f"{label} {g['gap']:+.1f} [{g['low']:+.1f}, {g['high']:+.1f}]"
        for label, g in (("BLEU-4", gap["bleu_4"]), ("last two", gap["last_two_match"]))) + " points")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
