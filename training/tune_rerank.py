"""Tune the reranking of captions (ris_core/rerank.py) on half of a seeded sample of held-out products.

    python -m training.tune_rerank --run results/runs/reference-cpu --n 1000   # ~10 min on 2 cores

Needs the run's evaluation (eval/captions.csv, val_embeddings.npy, catalog_knn: `python -m training.evaluate`).
Every candidate of the widest pool is scored once (on the image and on its mirror image); each setting of the
grid then picks among its own pool. Settings are ranked by BLEU-4 + last-two-words match (points) on the even
rows of the sample ("tune"); the odd rows ("check") show whether the choice holds on products it never saw.
Writes eval/rerank_tuning.csv.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import ImageOps
from tqdm.auto import tqdm

from ris_core.captioner import Captioner
from ris_core.data import load_catalog
from ris_core.evaluation import files
from ris_core.evaluation.pipeline import resolve_data_dir
from ris_core.files import write_csv_atomic
from ris_core.images import ImageError, open_image
from ris_core.metrics import caption_metrics
from ris_core.rerank import RerankConfig, candidate_pool, score
from ris_core.runs import Run
from ris_core.search.image_knn import ImageKnnIndex

GRID = {"k": [10, 20], "num_beams": [0, 5], "mirror": [False, True], "visual_weight": [0.0, 30.0, 60.0],
        "length_weight": [0.0, 0.5]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("results/runs/reference-cpu"))
    parser.add_argument("--data_dir", type=Path, default=None)
    parser.add_argument("--n", type=int, default=1000, help="held-out products sampled (seed 0)")
    parser.add_argument("--batch_size", type=int, default=16)
    return parser.parse_args(argv)


def score_pools(captioner: Captioner, images, greedy: list[str], neighbours: list[list[tuple[str, float]]],
                num_beams: int) -> list[dict]:
    """Per image: its beam hypotheses and the log-likelihood of every text in the widest pool, on both views."""
    beams = captioner.n_best(images, num_beams)
    texts = [list(candidate_pool([g, *b], n, 0.0)) for g, b, n in zip(greedy, beams, neighbours)]
    plain = captioner.log_likelihoods(images, texts)
    mirrored = captioner.log_likelihoods([ImageOps.mirror(im) for im in images], texts)
    return [{"beams": b, "plain": dict(zip(t, p)), "mirror": dict(zip(t, m))}
            for b, t, p, m in zip(beams, texts, plain, mirrored)]


def pick(item: dict, config: RerankConfig) -> str:
    pool = candidate_pool([item["greedy"], *item["beams"][: config.num_beams]], item["neighbours"][: config.k],
                          config.generated_margin)
    scored = {t: score(item["plain"][t] + (item["mirror"][t] if config.mirror else 0.0), s, t, config)
              for t, (s, _) in pool.items()}
    return max(scored, key=scored.get) if scored else item["greedy"]


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    run = Run(args.run)
    captioner = Captioner.load(run.path)
    captions = pd.read_csv(run.eval_dir / files.CAPTIONS, keep_default_na=False)
    val_emb = np.load(run.eval_dir / files.VAL_EMBEDDINGS, allow_pickle=False)
    knn = ImageKnnIndex.load(run.eval_dir / files.CATALOG_KNN)
    catalog = load_catalog(resolve_data_dir(run, args.data_dir))
    rows = np.sort(np.random.default_rng(0).permutation(len(captions))[: args.n])
    widest = RerankConfig(k=max(GRID["k"]), num_beams=max(GRID["num_beams"]))
    nearest = dict(zip(rows.tolist(), knn.search_vectors(val_emb[rows], k=widest.k)))  # as the evaluation does
    items = []
    for start in tqdm(range(0, len(rows), args.batch_size), desc="scoring candidates", unit="batch"):
        batch = []
        for row in rows[start : start + args.batch_size]:
            try:
                image = open_image(catalog.image_path(int(captions["id"].iloc[row])))
            except ImageError:
                continue
            hits = nearest[int(row)].results
            batch.append((image, {"row": int(row), "greedy": captions["generated"].iloc[row],
                                  "reference": captions["reference"].iloc[row],
                                  "neighbours": [(h.title, h.score) for h in hits]}))
        scored = score_pools(captioner, [b[0] for b in batch], [b[1]["greedy"] for b in batch],
                             [b[1]["neighbours"] for b in batch], widest.num_beams)
        items += [{**meta, **pools} for (_, meta), pools in zip(batch, scored)]
    halves = {"tune": items[0::2], "check": items[1::2], "all": items}
    records = []
    for values in itertools.product(*GRID.values()):
        config = replace(RerankConfig(), **dict(zip(GRID, values)))
        record = asdict(config)
        for half, chosen in halves.items():
            m = caption_metrics([pick(i, config) for i in chosen], [i["reference"] for i in chosen])
            record |= {f"{half}_bleu_4": m["bleu_4"], f"{half}_last_two": 100 * m["last_two_match"]}
        records.append(record)
    greedy = {half: caption_metrics([i["greedy"] for i in chosen], [i["reference"] for i in chosen])
              for half, chosen in halves.items()}
    table = pd.DataFrame(records)
    table["tune_objective"] = table["tune_bleu_4"] + table["tune_last_two"]
    table = table.sort_values("tune_objective", ascending=False).round(2)
    write_csv_atomic(run.eval_dir / "rerank_tuning.csv", table)
    print(f"{len(items)} products ({len(halves['tune'])} tune / {len(halves['check'])} check); greedy BLEU-4 / "
          f"last-two: " + ", ".join(f"{h} {m['bleu_4']:.2f} / {100 * m['last_two_match']:.1f}%"
                                    for h, m in greedy.items()))
    print(table.head(10).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
