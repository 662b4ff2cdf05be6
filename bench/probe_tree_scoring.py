"""Do prefix-tree likelihoods (ris_core/prefix_tree.py) rerank as one padded row per candidate did, and how much
faster? Both paths on the same held-out photos of an evaluated run, with the evaluation's own greedy captions and
visual neighbours, side by side in one process.

    python -m bench.probe_tree_scoring --run <evaluated run> --data_dir ../shared/data/fashion-product-images-small

Prints, for the first `--products` held-out photos: the share whose reranked caption is the same on both paths,
the largest difference of a candidate's score, and each path's seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ris_core.captioner import Captioner
from ris_core.data import load_catalog
from ris_core.evaluation import files
from ris_core.images import open_image
from ris_core.rerank import RerankConfig, rerank
from ris_core.search.image_knn import ImageKnnIndex


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder with a complete eval/")
    parser.add_argument("--data_dir", type=Path, required=True)
    parser.add_argument("--products", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=16, help="as the evaluation reranks")
    args = parser.parse_args(argv)
    eval_dir = args.run / "eval"
    captions = pd.read_csv(eval_dir / files.CAPTIONS, keep_default_na=False).head(args.products)
    vectors = np.load(eval_dir / files.VAL_EMBEDDINGS, allow_pickle=False)[: len(captions)]
    knn = ImageKnnIndex.load(eval_dir / files.CATALOG_KNN)
    catalog = load_catalog(args.data_dir)
    captioner, config = Captioner.load(args.run), RerankConfig()
    images = [open_image(catalog.image_path(int(i))) for i in captions["id"]]
    found = knn.search_vectors(vectors, k=config.k)  # as the evaluation does
    neighbours = [[(hit.title, hit.score) for hit in response.results] for response in found]
    out: dict = {"run": str(args.run), "products": len(images)}
    ranked = {}
    for tree in (False, True):  # one padded row per candidate first: the path the evaluation used before
        captioner.tree_scoring = tree
        start, ranked[tree] = time.perf_counter(), []
        for s in range(0, len(images), args.batch_size):
            chunk = slice(s, s + args.batch_size)
            ranked[tree] += rerank(captioner, images[chunk], captions["generated"].tolist()[chunk],
                                   neighbours[chunk], config)
        out["seconds_tree" if tree else "seconds_rows"] = round(time.perf_counter() - start, 1)
    same = [a[0].text == b[0].text for a, b in zip(ranked[False], ranked[True]) if a and b]
    out["same_reranked_caption"] = round(float(np.mean(same)), 4)
    out["largest_score_difference"] = max(
        abs(x.score - y.score) for a, b in zip(ranked[False], ranked[True])
        for x, y in zip(sorted(a, key=lambda c: c.text), sorted(b, key=lambda c: c.text), strict=True))
    out["speedup"] = round(out["seconds_rows"] / out["seconds_tree"], 2)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
