"""Would the dataset's attributes fix a caption's gender and colour? A vote of the visually nearest training products.

    python -m bench.probe_attribute_votes --run results/runs/<run>   # seconds; needs the run's evaluation

For every held-out product, the k nearest training images (the evaluation's `catalog_knn`, the run's own image
embeddings) vote on `gender` and `baseColour`, weighted by cosine similarity. Where the vote's share reaches a
threshold, the greedy caption's gender word (Men/Women/Boys/Girls) and its first colour phrase are replaced by
the vote's. Thresholds are chosen on the even product ids ("tune") and reported on the odd ones ("check"), for
products whose name occurs among training names ("seen") and those whose name does not ("novel").
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ris_core.data import load_catalog
from ris_core.evaluation import files
from ris_core.evaluation.pipeline import resolve_data_dir
from ris_core.metrics import cider_d, corpus_bleu_4
from ris_core.runs import Run
from ris_core.search.image_knn import ImageKnnIndex

GENDER_WORDS = ("Men", "Women", "Boys", "Girls")
THRESHOLDS = (0.6, 0.8, 0.9, 1.01)  # 1.01: never replace


def votes(index: ImageKnnIndex, vectors: np.ndarray, attribute: pd.Series, k: int) -> tuple[list[str], np.ndarray]:
    """The similarity-weighted majority of `attribute` over each vector's k nearest products, and its share."""
    winners, shares = [], []
    for response in index.search_vectors(vectors, k=k):
        tally: dict[str, float] = {}
        for hit in response.results:
            value = str(attribute.get(hit.product_id, ""))
            tally[value] = tally.get(value, 0.0) + max(hit.score, 0.0)
        best = max(tally, key=tally.get)
        winners.append(best)
        shares.append(tally[best] / max(sum(tally.values()), 1e-9))
    return winners, np.array(shares)


def corrected(caption: str, gender: str, gender_share: float, colour: str, colour_share: float,
              colours: list[str], gender_min: float, colour_min: float) -> str:
    words = str(caption).split()
    if gender_share >= gender_min and gender in GENDER_WORDS:
        words = [gender if w in GENDER_WORDS else w for w in words]
    text = " ".join(words)
    if colour_share >= colour_min and colour:
        for phrase in colours:  # longest first: "Navy Blue" before "Blue"
            if found := re.search(rf"\b{re.escape(phrase)}\b", text):
                return text[: found.start()] + colour + text[found.end():]
    return text


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data_dir", type=Path, default=None)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args(argv)
    run = Run(args.run)
    captions = pd.read_csv(run.eval_dir / files.CAPTIONS)
    vectors = np.load(run.eval_dir / files.VAL_EMBEDDINGS, allow_pickle=False)
    index = ImageKnnIndex.load(run.eval_dir / files.CATALOG_KNN)
    products = load_catalog(resolve_data_dir(run, args.data_dir), require_images=False).products
    colours = sorted({c for c in products["baseColour"].dropna().astype(str) if c}, key=len, reverse=True)
    gender, gender_share = votes(index, vectors, products["gender"], args.k)
    colour, colour_share = votes(index, vectors, products["baseColour"], args.k)
    truth = products.loc[captions["id"]]
    print(f"vote accuracy over {len(captions)} held-out products (k={args.k}): gender "
          f"{np.mean(np.array(gender) == truth['gender'].astype(str).to_numpy()):.3f}, colour "
          f"{np.mean(np.array(colour) == truth['baseColour'].astype(str).to_numpy()):.3f}")
    said = [next((w for w in str(c).split() if w in GENDER_WORDS), None) for c in captions["generated"]]
    has = np.array([w is not None for w in said])
    truth_gender = truth["gender"].astype(str).to_numpy()
    print(f"on the {has.sum()} captions that name a gender: the caption's word is right "
          f"{np.mean(np.array(said, dtype=object)[has] == truth_gender[has]):.3f}, the vote "
          f"{np.mean(np.array(gender)[has] == truth_gender[has]):.3f}")
    first = [str(c).split()[:1] == str(r).split()[:1] for c, r in zip(captions["generated"], captions["reference"])]
    for subset, keep in (("seen", captions["seen"]), ("novel", ~captions["seen"])):
        print(f"{subset}: first word (mostly the brand) right in {np.mean(np.array(first)[keep.to_numpy()]):.3f} of "
              f"{int(keep.sum())} captions")
    rows = []
    for gender_min in THRESHOLDS:
        for colour_min in THRESHOLDS:
            texts = [corrected(c, g, gs, col, cs, colours, gender_min, colour_min) for c, g, gs, col, cs in
                     zip(captions["generated"], gender, gender_share, colour, colour_share)]
            for subset in ("seen", "novel"):
                for part in ("tune", "check"):
                    keep = ((captions["seen"] == (subset == "seen")) & ((captions["id"] % 2 == 0) == (part == "tune")))
                    picked = [t for t, k in zip(texts, keep) if k]
                    refs = captions.loc[keep, "reference"].tolist()
                    rows.append({"gender_min": gender_min, "colour_min": colour_min, "subset": subset, "part": part,
                                 "n": len(refs), "bleu_4": round(corpus_bleu_4(picked, refs), 2),
                                 "cider_d": round(cider_d(picked, refs)[0], 3)})
    table = pd.DataFrame(rows)
    wide = table.pivot_table(index=["gender_min", "colour_min"], columns=["subset", "part"],
                             values=["bleu_4", "cider_d"])
    print(wide.to_string())
    for subset in ("novel", "seen"):
        chosen = table[(table.subset == subset) & (table.part == "tune")].sort_values("bleu_4").iloc[-1]
        check = table[(table.subset == subset) & (table.part == "check")
                      & (table.gender_min == chosen.gender_min) & (table.colour_min == chosen.colour_min)].iloc[0]
        never = table[(table.subset == subset) & (table.part == "check") & (table.gender_min > 1)
                      & (table.colour_min > 1)].iloc[0]
        print(f"{subset}: best on tune gender>={chosen.gender_min} colour>={chosen.colour_min}; on check BLEU-4 "
              f"{check.bleu_4} CIDEr-D {check.cider_d} against {never.bleu_4} / {never.cider_d} unchanged "
              f"(n={check.n})")
    return table


if __name__ == "__main__":
    main()
