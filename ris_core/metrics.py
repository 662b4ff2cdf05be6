"""Caption metrics (BLEU, last-words match) and retrieval metrics (P@k, MRR, nDCG, bootstrap CIs).

Pure functions: lists/arrays in, floats or flat dicts out. Key names carry the cut-off (`p_at_10`,
`ndcg_at_10`); every metric here is higher-is-better except `zero_hit` (a rate of queries with no
results, lower is better).

BLEU conventions: sacrebleu defaults (13a tokenizer, case-sensitive), 0-100 scale. `bleu_n` is the
*cumulative* BLEU-n of `sacrebleu.metrics.BLEU(max_ngram_order=n)`: brevity penalty times the geometric
mean of the 1..n-gram precisions, so `bleu_4` equals `sacrebleu.corpus_bleu(...).score`.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sacrebleu

from ris_core.strategies import words

BLEU_MODULE_DIR = Path(__file__).resolve().parent / "metric_modules" / "ris_bleu"

# ---------------------------------------------------------------- caption metrics


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 (0-100) and the brevity penalty (0-1); one reference per prediction.

    With no predictions every value is NaN (no data is not a score of 0).
    """
    preds, refs = _check_pairs(predictions, references)
    if not preds:
        return {**{f"bleu_{n}": math.nan for n in range(1, 5)}, "brevity_penalty": math.nan}
    out: dict[str, float] = {}
    for n in range(1, 4):
        out[f"bleu_{n}"] = float(sacrebleu.metrics.BLEU(max_ngram_order=n).corpus_score(preds, [refs]).score)
    bleu4 = sacrebleu.corpus_bleu(preds, [refs])
    out["bleu_4"] = float(bleu4.score)
    out["brevity_penalty"] = float(bleu4.bp)
    return out


def corpus_bleu_4(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 alone (`corpus_bleu`'s bleu_4, one pass instead of four: per-category tables call it often)."""
    preds, refs = _check_pairs(predictions, references)
    return float(sacrebleu.corpus_bleu(preds, [refs]).score) if preds else math.nan


def sentence_bleu(prediction: str, reference: str) -> float:
    """Smoothed sentence BLEU-4, 0-100: sacrebleu `sentence_bleu` with its defaults.

    Those defaults are `smooth_method="exp"` (each n-gram order with zero matches gets precision
    1/2^k, k counting such orders) and `use_effective_order=True` (orders longer than the hypothesis
    are ignored), so a 2-word caption that matches a 2-word reference still scores 100.
    """
    return float(sacrebleu.sentence_bleu(_as_text(prediction), [_as_text(reference)]).score)


def _norm_words(text: str) -> list[str]:
    """Casefolded words with all punctuation removed ("T-shirt." -> "tshirt", "Men's" -> "mens")."""
    out = []
    for w in words(_as_text(text)):
        kept = "".join(ch for ch in w.casefold() if unicodedata.category(ch)[0] not in "PS")
        if kept:
            out.append(kept)
    return out


def last_words_match(prediction: str, reference: str, n: int = 2) -> bool:
    """Do the last ``n`` words agree, ignoring case and punctuation?

    n=2 compares the paper's query, n=1 the last word. A caption with fewer than ``n`` words only
    matches a reference that is exactly as short. An empty prediction or reference never matches.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p, r = _norm_words(prediction), _norm_words(reference)
    return bool(p) and bool(r) and p[-n:] == r[-n:]


def first_word_match(prediction: str, reference: str) -> bool:
    """Does the first word agree, ignoring case and punctuation? In product names it is mostly the brand, the
    word that decides most of a caption's CIDEr-D on products never seen (bench/probe_novel_words.py)."""
    p, r = _norm_words(prediction), _norm_words(reference)
    return bool(p) and bool(r) and p[0] == r[0]


def first_word_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The share of captions whose first word is the reference's (NaN for none)."""
    preds, refs = _check_pairs(predictions, references)
    return float(np.mean([first_word_match(p, r) for p, r in zip(preds, refs, strict=True)])) if preds else math.nan


def exact_match(prediction: str, reference: str) -> bool:
    """Same words in the same order, ignoring case, spacing and punctuation; empty never matches."""
    p = _norm_words(prediction)
    return bool(p) and p == _norm_words(reference)


def caption_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4, `sentence_bleu_mean`, and match rates (0-1) `last_two_match`,
    `last_word_match`, `exact_match`; `n` is the number of pairs. NaN values when n == 0."""
    preds, refs = _check_pairs(predictions, references)
    out: dict[str, float] = dict(corpus_bleu(preds, refs))
    n = len(preds)

    def rate(values: list[bool] | list[float]) -> float:
        return float(np.mean(values)) if n else math.nan

    out["sentence_bleu_mean"] = rate([sentence_bleu(p, r) for p, r in zip(preds, refs, strict=True)])
    out["last_two_match"] = rate([last_words_match(p, r, 2) for p, r in zip(preds, refs, strict=True)])
    out["last_word_match"] = rate([last_words_match(p, r, 1) for p, r in zip(preds, refs, strict=True)])
    out["exact_match"] = rate([exact_match(p, r) for p, r in zip(preds, refs, strict=True)])
    out["n"] = n
    return out


def load_bleu_metric() -> Any:
    """The repo's `ris_bleu` evaluate module, loaded by path so it works offline (no Hub access).

    `evaluate` is imported here, not at module top: importing it costs seconds (it pulls in
    transformers), and most callers only need the sacrebleu functions above.
    """
    import evaluate

    return evaluate.load(str(BLEU_MODULE_DIR))


def _as_text(value: object) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists of strings, not a single string")
    preds = [_as_text(p) for p in predictions]
    refs = [_as_text(r) for r in references]
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    return preds, refs


# ---------------------------------------------------------------- retrieval metrics


def _binary(rel: Sequence[float] | np.ndarray, k: int | None = None) -> np.ndarray:
    """Relevances as a 0/1 float array, cut to the top ``k`` (anything > 0 counts as relevant)."""
    arr = np.asarray(rel, dtype=float).ravel()
    arr = np.where(np.nan_to_num(arr) > 0, 1.0, 0.0)
    return arr if k is None else arr[:k]


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def precision_at_k(rel: Sequence[float] | np.ndarray, k: int) -> float:
    """Relevant results in the top ``k`` divided by ``k``: missing ranks count as not relevant."""
    _check_k(k)
    return float(_binary(rel, k).sum() / k)


def reciprocal_rank(rel: Sequence[float] | np.ndarray) -> float:
    """1 / rank of the first relevant result; 0 when none is relevant."""
    hits = np.flatnonzero(_binary(rel))
    return float(1.0 / (hits[0] + 1)) if hits.size else 0.0


def ndcg_at_k(rel: Sequence[float] | np.ndarray, k: int, n_relevant_total: int | None = None) -> float:
    """Binary-gain nDCG@k with a log2(rank + 1) discount.

    The ideal DCG puts ``min(k, n_relevant_total)`` relevant items at the top when the total is known
    (the catalog's relevant count for this query: the honest denominator). Without it, the ideal is
    built from the relevant results found within ``rel`` itself, which only measures the ordering of
    what was returned. A total below the relevant count seen in ``rel`` is raised to that count so the
    score stays within [0, 1]. Returns 0 when there is nothing relevant.
    """
    _check_k(k)
    gains = _binary(rel, k)
    dcg = float((gains / np.log2(np.arange(2, gains.size + 2))).sum())
    found = int(_binary(rel).sum())
    n_ideal = min(k, found if n_relevant_total is None else max(int(n_relevant_total), int(gains.sum())))
    if n_ideal <= 0:
        return 0.0
    idcg = float((1.0 / np.log2(np.arange(2, n_ideal + 2))).sum())
    return dcg / idcg


def ranking_metrics(rel: Sequence[float] | np.ndarray, n_relevant_total: int | None = None) -> dict[str, float]:
    """`p_at_1`, `p_at_5`, `p_at_10`, `mrr`, `ndcg_at_10` and `zero_hit` (1.0 when no result came back)."""
    arr = _binary(rel)
    return {
        "p_at_1": precision_at_k(arr, 1),
        "p_at_5": precision_at_k(arr, 5),
        "p_at_10": precision_at_k(arr, 10),
        "mrr": reciprocal_rank(arr),
        "ndcg_at_10": ndcg_at_k(arr, 10, n_relevant_total),
        "zero_hit": float(arr.size == 0),
    }


# ---------------------------------------------------------------- bootstrap

_MAX_CELLS = 4_000_000  # resample in chunks so the index matrix stays ~32 MB on big query sets


@functools.lru_cache(maxsize=4)
def _resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n): how often each of n values is drawn in each resample, from the same draws as indexing
    `values[rng.integers(0, n, (n_boot, n))]` (same seed, same chunks). Every metric and strategy of a subset
    shares one draw, and a matrix product replaces a gather of n_boot x n values: the evaluation's summaries
    went from 25 s to a few."""
    rng = np.random.default_rng(seed)
    rows = max(1, _MAX_CELLS // n)
    counts = np.empty((n_boot, n))
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))  # one row = one resample of query indices
        flat = (idx + n * np.arange(stop - start)[:, None]).ravel()
        counts[start:stop] = np.bincount(flat, minlength=(stop - start) * n).reshape(stop - start, n)
    counts.flags.writeable = False
    return counts


def _boot_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    return _resample_counts(values.size, n_boot, seed) @ values / values.size


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the sample mean and a percentile bootstrap (1 - alpha) interval.

    NaNs are dropped; no values gives (nan, nan, nan). Same seed, same interval.
    """
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError("need n_boot >= 1 and 0 < alpha < 1")
    arr = np.asarray(values, dtype=float).ravel()
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return (math.nan, math.nan, math.nan)
    means = _boot_means(arr, n_boot, seed)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(arr.mean()), float(low), float(high))


def paired_bootstrap_diff(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean of a - b, low, high) over the same queries, resampling query indices jointly.

    Resampling the per-query differences is the same as resampling indices into both arrays
    together, and keeps the pairing (query difficulty cancels out). Pairs with a NaN are dropped.
    An interval excluding 0 suggests a real difference at level alpha.
    """
    x = np.asarray(a, dtype=float).ravel()
    y = np.asarray(b, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired values need equal lengths, got {x.size} and {y.size}")
    return bootstrap_ci(x - y, n_boot=n_boot, alpha=alpha, seed=seed)


# ---------------------------------------------------------------- relevance on the Fashion dataset

RELEVANCE_LEVELS: dict[str, tuple[str, ...]] = {
    "R1": ("articleType",),
    "R2": ("articleType", "baseColour"),
    "R3": ("articleType", "gender"),
}
RELEVANCE_DESCRIPTIONS: dict[str, str] = {
    "R1": "Same article type (a shirt for a shirt).",
    "R2": "Same article type and base colour (a navy blue shirt for a navy blue shirt).",
    "R3": "Same article type and gender (a men's shirt for a men's shirt).",
}


def _attr_key(value: object) -> str | None:
    """Comparable form of an attribute: stripped and casefolded; None for missing/NaN/empty."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    try:
        if value != value:  # NaN-like scalars (numpy.nan, pandas.NaT)
            return None
    except (TypeError, ValueError):  # pandas.NA refuses bool()
        return None
    text = str(value).strip().casefold()
    return text or None


def is_relevant(query_attrs: Mapping[str, object], result_attrs: Mapping[str, object],
                level: str | Sequence[str]) -> bool:
    """True when every attribute of ``level`` (a RELEVANCE_LEVELS key or a tuple of column names)
    is present on both sides and equal, ignoring case and surrounding spaces. Missing never matches."""
    if isinstance(level, str):
        if level not in RELEVANCE_LEVELS:
            raise KeyError(f"unknown relevance level {level!r}; known: {sorted(RELEVANCE_LEVELS)}")
        attrs = RELEVANCE_LEVELS[level]
    else:
        attrs = tuple(level)
    if not attrs:
        raise ValueError("a relevance level needs at least one attribute")
    for name in attrs:
        q, r = _attr_key(query_attrs.get(name)), _attr_key(result_attrs.get(name))
        if q is None or r is None or q != r:
            return False
    return True


def coco_tokens(text: str) -> str:
    """The pre-tokenised form CIDEr-D and ROUGE-L score: casefolded words without punctuation, space-joined
    (what pycocoevalcap's PTBTokenizer does for these names, without its Java)."""
    return " ".join(_norm_words(text))


def cider_d(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, list[float]]:
    """CIDEr-D (pycocoevalcap's Cider: n = 1..4, sigma 6, clipped, x10) of each caption against its one
    reference, and their mean. Document frequencies come from the references passed in: a figure is only
    comparable to another computed over the same set of references."""
    from pycocoevalcap.cider.cider import Cider

    preds, refs = _check_pairs(predictions, references)
    if not preds:
        return math.nan, []
    gts = {i: [coco_tokens(r)] for i, r in enumerate(refs)}
    res = {i: [coco_tokens(p)] for i, p in enumerate(preds)}
    _, scores = Cider().compute_score(gts, res)
    per = [float(s) for s in scores]
    return float(np.mean(per)), per


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, list[float]]:
    """ROUGE-L F (beta 1.2, pycocoevalcap's Rouge) of each caption against its reference, and their mean; an
    empty caption scores 0 (pycocoevalcap would divide by zero)."""
    from pycocoevalcap.rouge.rouge import Rouge

    preds, refs = _check_pairs(predictions, references)
    scorer, per = Rouge(), []
    for p, r in zip(preds, refs, strict=True):
        p, r = coco_tokens(p), coco_tokens(r)
        per.append(float(scorer.calc_score([p], [r])) if p and r else 0.0)
    return (float(np.mean(per)) if per else math.nan), per
