"""Where a captioner fails: metrics per product category, and which article it names instead of the true one.

`per_category` groups an evaluation's held-out products by an attribute (articleType, gender, baseColour):
corpus BLEU-4 and last-two match of the captions, and P@10 of one query strategy, with the product count.
`article_confusions` reads the article a caption names from its last word, mapped to the articleType that word
ends most catalog names of (e.g. "T-shirt" -> Tshirts), and counts the pairs where it is not the true one.
"""

from __future__ import annotations

from collections import Counter

import pandas as pd

from ris_core.metrics import _norm_words, corpus_bleu_4

GROUPINGS = ("articleType", "gender", "baseColour")


def per_category(captions: pd.DataFrame, by: str, caption_column: str = "generated",
                 retrieval: pd.DataFrame | None = None, strategy: str | None = None,
                 level: str = "R1") -> pd.DataFrame:
    """Rows (category, products, bleu_4, last_two_match[, p_at_10]), largest categories first."""
    if by not in captions:
        raise KeyError(f"captions.csv has no {by!r} column; re-run the evaluation")
    frame = captions.assign(_last_two=captions["last_two_match"].astype(str).str.lower().eq("true"))
    rows = []
    for category, group in frame.groupby(frame[by].fillna("(none)").astype(str)):
        bleu = corpus_bleu_4(group[caption_column].fillna("").astype(str).tolist(),
                             group["reference"].astype(str).tolist())
        rows.append({"category": category, "products": len(group), "bleu_4": bleu,
                     "last_two_match": float(group["_last_two"].mean())})
    table = pd.DataFrame(rows)
    if retrieval is not None and strategy is not None:
        column = f"{level}_p_at_10"
        queries = retrieval.loc[retrieval["strategy"] == strategy, ["id", column]]
        joined = frame[["id", by]].merge(queries, on="id")
        p10 = joined.groupby(joined[by].fillna("(none)").astype(str))[column].mean()
        table["p_at_10"] = table["category"].map(p10)
    return table.sort_values("products", ascending=False, ignore_index=True)


def article_words(names: pd.Series, article_types: pd.Series) -> dict[str, str]:
    """Last word of a name -> the articleType most names ending in it have (ties: the alphabetically first)."""
    votes: dict[str, Counter] = {}
    for name, article in zip(names.astype(str), article_types.astype(str)):
        words = _norm_words(name)
        if words:
            votes.setdefault(words[-1], Counter())[article] += 1
    return {word: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for word, c in votes.items()}


def article_confusions(captions: pd.DataFrame, words: dict[str, str], caption_column: str = "generated",
                       top: int = 15) -> pd.DataFrame:
    """The most frequent (true articleType, named articleType) pairs that differ, with counts and the share of
    the true type's products; captions whose last word names no known article count as "(unknown)"."""
    named = [words.get((_norm_words(c) or [""])[-1], "(unknown)") for c in captions[caption_column].fillna("")]
    pairs = pd.DataFrame({"true": captions["articleType"].astype(str), "named": named})
    totals = pairs["true"].value_counts()
    wrong = pairs[pairs["true"] != pairs["named"]].value_counts().rename("products").reset_index()
    wrong["share of true type"] = wrong["products"] / wrong["true"].map(totals)
    return wrong.head(top)
