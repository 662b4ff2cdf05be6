"""Precompute what the search demo needs for a run over a catalog (ris_core/demo_artifacts.py).

    python -m training.precompute_demo --run results/runs/reference-cpu --data_dir data/demo

Embeds the catalog's searchable (training) images, and captions and reranks each held-out (gallery) photo one at
a time, exactly as the demo does live; then stores the embeddings as int8 and prints the image search's
recall@10 against the float32 index. 2-3 minutes for data/demo on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm.auto import tqdm

from ris_core import demo_artifacts
from ris_core.captioner import load_any_captioner
from ris_core.data import DEFAULT_DATA_DIR, load_catalog
from ris_core.demo_artifacts import GalleryPhoto
from ris_core.files import file_sha256
from ris_core.images import open_image
from ris_core.rerank import RerankConfig, rerank
from ris_core.runs import Run
from ris_core.search.image_knn import ImageKnnIndex

logger = logging.getLogger(__name__)


def origin(best, greedy: str) -> str:
    return "greedy" if best.text == greedy else "beam" if best.generated else "catalog name"


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run folder (results/runs/<name>)")
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA_DIR, help="the catalog the demo searches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    run = Run(args.run)
    catalog = load_catalog(args.data_dir)
    split = run.split()
    ids = split.searchable_ids(catalog.products)
    gallery = [int(i) for i in split.val_ids if int(i) in catalog.products.index]
    captioner = load_any_captioner(run.path)
    kept, vectors, skipped = captioner.embed_paths([(i, catalog.image_path(i)) for i in ids],
                                                   desc="embedding the catalog")
    if skipped:
        raise SystemExit(f"{len(skipped)} catalog images are unreadable (e.g. {skipped[0]}): fix the catalog first")
    knn = ImageKnnIndex(kept, vectors, [str(catalog.image_path(i)) for i in kept],
                        catalog.products.loc[kept, "productDisplayName"].tolist())
    photos, shas = [], []
    for pid in tqdm(gallery, desc="captioning and reranking the gallery", unit="photo"):
        image = open_image(catalog.image_path(pid))
        batch = captioner.run_batch([image])  # one photo at a time, as the demo captions it
        greedy, embedding = batch.captions[0], batch.embeddings[0]
        reranked, how = None, ""
        if captioner.can_rerank:
            hits = knn.search_vector(embedding, k=RerankConfig().k, exclude_id=pid).results
            [ranked] = rerank(captioner, [image], [greedy], [[(h.title, h.score) for h in hits]])
            if ranked:
                reranked, how = ranked[0].text, origin(ranked[0], greedy)
        photos.append(GalleryPhoto(pid, greedy, embedding, reranked, how))
        shas.append(file_sha256(catalog.image_path(pid)))
    codes, scales = demo_artifacts.quantize(knn.vectors)
    compact = ImageKnnIndex(knn.ids, demo_artifacts.dequantize(codes, scales), knn.image_paths, knn.names)
    recall = demo_artifacts.recall_at_k(knn, compact, [p.embedding for p in photos])
    written = demo_artifacts.save(args.data_dir, run.name, weights=demo_artifacts.weights_sha256(run.path),
                                  catalog=demo_artifacts.catalog_key(ids, catalog.products), knn=knn,
                                  photos=photos, photo_sha=shas, recall=recall,
                                  arithmetic=captioner.backbone_arithmetic())
    logger.info("image search recall@10, int8 vs float32, over the %d gallery photos: %.4f", len(photos), recall)
    logger.info("wrote %s (%.1f MB) and %s", written[0], written[0].stat().st_size / 1e6, written[1])
    return written


if __name__ == "__main__":
    main()
