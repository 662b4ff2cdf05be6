"""Captions of several runs (or decodings) side by side per held-out product, with word-level differences.

A "system" is one run's captions under one decoding (greedy or reranked). `compare_table` joins the systems'
`eval/captions.csv` on the product id: the reference name, the product's attributes, and per system its caption,
sentence BLEU, CIDEr-D (from the evaluation: it depends on the whole corpus) and whether its last two words are
right. `word_diff` marks each caption word as matching the reference or not, and the reference words it misses.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from ris_core.metrics import _norm_words, corpus_bleu_4, last_words_match, sentence_bleu

DECODINGS = {"greedy": ("generated", "cider_d"), "reranked": ("reranked", "reranked_cider_d")}
ATTRIBUTES = ("articleType", "gender", "baseColour", "masterCategory", "seen")
FILTERS = {
    "all": "every product",
    "disagree": "the captions differ",
    "one_right": "exactly one caption has the last two words right",
    "none_right": "no caption has the last two words right",
}


@dataclass(frozen=True)
class System:
    run: str
    decoding: str  # a key of DECODINGS

    @property
    def label(self) -> str:
        return f"{self.run} · {self.decoding}"

    @classmethod
    def parse(cls, label: str) -> System:
        run, _, decoding = label.rpartition(" · ")
        if not run or decoding not in DECODINGS:
            raise ValueError(f"not a caption system: {label!r} (expected '<run> · greedy' or '<run> · reranked')")
        return cls(run, decoding)


def decodings_in(captions: pd.DataFrame) -> list[str]:
    """The decodings an evaluation's captions.csv holds (reranked only where it was run)."""
    return [d for d, (column, _) in DECODINGS.items() if column in captions and captions[column].notna().any()]


def compare_table(captions: Mapping[System, pd.DataFrame]) -> pd.DataFrame:
    """One row per product every system captioned: id, reference, attributes, then per system
    `<label>` (caption), `<label> BLEU`, `<label> CIDEr-D`, `<label> last two`."""
    if not captions:
        raise ValueError("no systems to compare")
    first = next(iter(captions.values()))
    table = first[["id", "reference", *[a for a in ATTRIBUTES if a in first]]].copy()
    for system, frame in captions.items():
        column, cider = DECODINGS[system.decoding]
        if column not in frame:
            raise ValueError(f"{system.run} has no {system.decoding} captions")
        part = pd.DataFrame({"id": frame["id"], system.label: frame[column].fillna("").astype(str),
                             f"{system.label} CIDEr-D": frame[cider] if cider in frame else math.nan})
        table = table.merge(part, on="id", how="inner")
    for system in captions:
        caps, refs = table[system.label], table["reference"].astype(str)
        table[f"{system.label} BLEU"] = [sentence_bleu(c, r) for c, r in zip(caps, refs)]
        table[f"{system.label} last two"] = [last_words_match(c, r) for c, r in zip(caps, refs)]
    return table.reset_index(drop=True)


def only(table: pd.DataFrame, systems: list[System], keep: str) -> pd.DataFrame:
    """The rows FILTERS[keep] describes."""
    if keep not in FILTERS:
        raise ValueError(f"unknown filter {keep!r}; choose one of {', '.join(FILTERS)}")
    if keep == "all" or not systems:
        return table
    right = table[[f"{s.label} last two" for s in systems]].sum(axis=1)
    if keep == "disagree":
        words = table[[s.label for s in systems]].map(lambda c: tuple(_norm_words(c)))
        return table[words.nunique(axis=1) > 1]
    return table[right == 1] if keep == "one_right" else table[right == 0]


def summary(table: pd.DataFrame, systems: list[System]) -> pd.DataFrame:
    """Per system on these rows: corpus BLEU-4, mean CIDEr-D, last-two match, and how often it is the best
    caption of the row by sentence BLEU (ties count for each)."""
    refs = table["reference"].astype(str).tolist()
    best = table[[f"{s.label} BLEU" for s in systems]].max(axis=1) if len(table) else pd.Series(dtype=float)
    rows = []
    for s in systems:
        rows.append({"captions": s.label, "products": len(table),
                     "BLEU-4": corpus_bleu_4(table[s.label].tolist(), refs),
                     "CIDEr-D": float(table[f"{s.label} CIDEr-D"].mean()),
                     "last two right": float(table[f"{s.label} last two"].mean()),
                     "best of row": float((table[f"{s.label} BLEU"] >= best).mean()) if len(table) else math.nan})
    return pd.DataFrame(rows)


def word_diff(reference: str, caption: str) -> list[tuple[str, str]]:
    """The caption's words as ("same" | "wrong", word), with the reference words it misses as ("missing", word),
    in reading order. Words compare casefolded and without punctuation, as the match metrics do."""
    ref_words, cap_words = str(reference).split(), str(caption).split()
    key = [" ".join(_norm_words(w)) or w for w in ref_words], [" ".join(_norm_words(w)) or w for w in cap_words]
    out: list[tuple[str, str]] = []
    for op, r0, r1, c0, c1 in difflib.SequenceMatcher(None, *key, autojunk=False).get_opcodes():
        if op == "equal":
            out += [("same", w) for w in cap_words[c0:c1]]
            continue
        out += [("wrong", w) for w in cap_words[c0:c1]]
        out += [("missing", w) for w in ref_words[r0:r1]]
    return out
