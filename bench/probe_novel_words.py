"""Where do captions of products never seen lose CIDEr-D? The first word (mostly the brand), word by word.

    python -m bench.probe_novel_words --run results/runs/<run> [--target 2.594]   # seconds; needs its evaluation

Reads the run's `captions.csv` (greedy and reranked captions, per-caption CIDEr-D) and its split. For the held-out
products whose name is no training name ("novel") and the others ("seen"): how often the caption is a training
name verbatim; how often its first word is right, and whether that word starts any training name at all
("known brand"); CIDEr-D where it is right and where it is not. Then two oracles, each scored like the evaluation
(CIDEr-D with the document frequencies of all held-out references): the caption's first word, or its last word
(mostly the article type), replaced by the reference's. They bound what a perfect brand or article step could add.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from ris_core.brand_step import first_word
from ris_core.data import load_catalog
from ris_core.evaluation import files
from ris_core.evaluation.pipeline import resolve_data_dir
from ris_core.metrics import cider_d, coco_tokens, corpus_bleu_4, first_word_match
from ris_core.runs import Run


def with_word_of(caption: object, reference: object, position: int) -> str:
    """`caption` with its word at `position` (0 or -1) replaced by the reference's word there."""
    words, truth = str(caption).split(), str(reference).split()
    if not words or not truth:
        return str(caption)
    words[position] = truth[position]
    return " ".join(words)


def word_table(captions: pd.DataFrame, column: str, score: str, train_names: list[str],
               target: float | None) -> pd.DataFrame:
    """One row per subset: verbatim share, first-word accuracy, CIDEr-D split by it, and the two oracles."""
    references = captions["reference"].tolist()
    texts = captions[column].astype(str).tolist()
    names = {coco_tokens(n) for n in train_names}
    brands = {first_word(n) for n in train_names}
    right = np.array([first_word_match(t, r) for t, r in zip(texts, references)])
    known = np.array([first_word(r) in brands for r in references])
    verbatim = np.array([coco_tokens(t) in names for t in texts])
    oracle_first = np.array(cider_d([with_word_of(t, r, 0) for t, r in zip(texts, references)], references)[1])
    oracle_last = np.array(cider_d([with_word_of(t, r, -1) for t, r in zip(texts, references)], references)[1])
    scores = captions[score].to_numpy(float)
    rows = []
    for subset, keep in (("novel", ~captions["seen"].to_numpy(bool)), ("seen", captions["seen"].to_numpy(bool))):
        if not keep.any():
            continue
        hit, miss = scores[keep & right], scores[keep & ~right]
        row = {"subset": subset, "products": int(keep.sum()), "verbatim_training_name": verbatim[keep].mean(),
               "first_word_right": right[keep].mean(), "first_word_known_brand": known[keep].mean(),
               "first_word_right_where_known": right[keep & known].mean() if (keep & known).any() else np.nan,
               "bleu_4": corpus_bleu_4([t for t, k in zip(texts, keep) if k],
                                       [r for r, k in zip(references, keep) if k]),
               "cider_d": scores[keep].mean(), "cider_d_first_right": hit.mean() if len(hit) else np.nan,
               "cider_d_first_wrong": miss.mean() if len(miss) else np.nan,
               "oracle_first_word_cider_d": oracle_first[keep].mean(),
               "oracle_last_word_cider_d": oracle_last[keep].mean()}
        if target is not None and len(hit) and len(miss):
            # the first-word accuracy at which the mean would reach `target`, holding both conditional means
            row["first_word_right_needed"] = (target - miss.mean()) / (hit.mean() - miss.mean())
        rows.append(row)
    return pd.DataFrame(rows).set_index("subset")


def main(argv: list[str] | None = None) -> dict[str, pd.DataFrame]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data_dir", type=Path, default=None)
    parser.add_argument("--target", type=float, default=None,
                        help="a novel CIDEr-D to reach: prints the first-word accuracy it would take")
    args = parser.parse_args(argv)
    run = Run(args.run)
    captions = pd.read_csv(run.eval_dir / files.CAPTIONS, keep_default_na=False)
    captions["seen"] = captions["seen"].astype(str).str.lower() == "true"
    products = load_catalog(resolve_data_dir(run, args.data_dir), require_images=False).products
    train_ids = [i for i in run.split().train_ids if i in products.index]
    train_names = products.loc[train_ids, "productDisplayName"].astype(str).tolist()
    tables = {}
    for column, score in (("generated", "cider_d"), ("reranked", "reranked_cider_d")):
        if column in captions and score in captions:
            tables[column] = word_table(captions, column, score, train_names, args.target)
            print(f"\n{run.name}, {'greedy' if column == 'generated' else column} captions "
                  f"({len(train_names)} training names):")
            print(tables[column].T.round(3).to_string())
    return tables


if __name__ == "__main__":
    main()
