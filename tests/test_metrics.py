"""Caption and retrieval metrics against hand-computed values and sacrebleu itself."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest
import sacrebleu

from ris_core import metrics as M

PREDS = ["Puma Men Black Sports Shoes", "Nike Women Blue Shirt", "Turtle Men Navy Blue Shirt", "x"]
REFS = ["Puma Men Black Casual Shoes", "Nike Men Blue Shirt", "Turtle Check Men Navy Blue Shirt", "Fossil Watch"]


# ---------------------------------------------------------------- caption metrics

def test_corpus_bleu_equals_sacrebleu() -> None:
    out = M.corpus_bleu(PREDS, REFS)
    ref4 = sacrebleu.corpus_bleu(PREDS, [REFS])
    assert out["bleu_4"] == pytest.approx(ref4.score)
    assert out["brevity_penalty"] == pytest.approx(ref4.bp)
    for n in (1, 2, 3):
        expected = sacrebleu.metrics.BLEU(max_ngram_order=n).corpus_score(PREDS, [REFS]).score
        assert out[f"bleu_{n}"] == pytest.approx(expected)
    # Cumulative BLEU-n only loses precision terms as n grows on this imperfect corpus.
    assert out["bleu_1"] > out["bleu_2"] > out["bleu_3"] > out["bleu_4"] > 0


def test_corpus_bleu_hand_computed_bleu_1() -> None:
    # 3 of 4 unigrams match, same length (BP = 1): BLEU-1 = 75.
    out = M.corpus_bleu(["Men Black Sports Shoes"], ["Men Black Casual Shoes"])
    assert out["bleu_1"] == pytest.approx(75.0)
    assert out["brevity_penalty"] == pytest.approx(1.0)


def test_corpus_bleu_validates_inputs() -> None:
    with pytest.raises(ValueError):
        M.corpus_bleu(["a", "b"], ["a"])
    with pytest.raises(TypeError):
        M.corpus_bleu("a b", "a b")  # type: ignore[arg-type]
    assert all(math.isnan(v) for v in M.corpus_bleu([], []).values())


def test_sentence_bleu_is_smoothed_and_matches_sacrebleu() -> None:
    assert M.sentence_bleu("Blue Shirt", "Blue Shirt") == pytest.approx(100.0)
    partial = M.sentence_bleu("Puma Men Black Sports Shoes", "Puma Men Black Casual Shoes")
    assert 0 < partial < 100  # no 4-gram match, but smoothing keeps it above zero
    assert partial == pytest.approx(
        sacrebleu.sentence_bleu("Puma Men Black Sports Shoes", ["Puma Men Black Casual Shoes"]).score)
    assert M.sentence_bleu("", "Blue Shirt") == 0.0


@pytest.mark.parametrize(
    ("pred", "ref", "n", "expected"),
    [
        ("Puma Men Navy BLUE shirt.", "Turtle Check Men Navy Blue Shirt", 2, True),  # case + punctuation
        ('"Blue Shirt!"', "blue shirt", 2, True),
        ("Black T-shirt", "Black Tshirt", 2, True),  # inner punctuation ignored too
        ("Men's Shirt", "Mens shirt", 2, True),
        ("Navy Blue Shirt", "Navy White Shirt", 2, False),
        ("Navy Blue Shirt", "Navy White Shirt", 1, True),
        ("Shirt", "Blue Shirt", 2, False),  # fewer than n words only matches an equally short ref
        ("Shirt", "Shirt", 2, True),
        ("", "", 2, False),  # an empty caption never matches
        ("!!", "Blue Shirt", 1, False),
    ],
)
def test_last_words_match(pred: str, ref: str, n: int, expected: bool) -> None:
    assert M.last_words_match(pred, ref, n) is expected



def test_first_word_match_is_the_brand_slot_ignoring_case_and_punctuation() -> None:
    assert M.first_word_match("puma Men Black Shoes", "PUMA Women Red Top")
    assert M.first_word_match("U.S. Polo Assn Men Shirt", "US Polo Assn Men Blue Shirt")
    assert not M.first_word_match("Nike Men Black Shoes", "Puma Men Black Shoes")
    assert not M.first_word_match("", "")  # an empty caption never matches
    assert not M.first_word_match("!!", "Puma Shoes")
    assert M.first_word_rate(["Nike Shoes", "Puma Top", "Fila Cap", ""], ["Nike Socks", "Adidas Top", "fila", ""]) \
        == pytest.approx(0.5)
    assert math.isnan(M.first_word_rate([], []))

def test_exact_match_and_bad_n() -> None:
    assert M.exact_match("  puma MEN black shoes. ", "Puma Men Black Shoes")
    assert not M.exact_match("Puma Men Black", "Puma Men Black Shoes")
    assert not M.exact_match("", "")
    with pytest.raises(ValueError):
        M.last_words_match("a", "a", 0)


def test_caption_metrics_rates() -> None:
    out = M.caption_metrics(PREDS, REFS)
    assert out["n"] == 4
    assert out["last_two_match"] == pytest.approx(0.5)  # "Blue Shirt" twice; "Sports Shoes" != "Casual Shoes"
    assert out["last_word_match"] == pytest.approx(0.75)  # all but "x"
    assert out["exact_match"] == 0.0
    expected_mean = np.mean([sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(PREDS, REFS, strict=True)])
    assert out["sentence_bleu_mean"] == pytest.approx(expected_mean)
    assert out["bleu_4"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    # the one-pass BLEU-4 of the per-category tables is the same number
    assert M.corpus_bleu_4(PREDS, REFS) == out["bleu_4"] and math.isnan(M.corpus_bleu_4([], []))


@pytest.mark.slow  # importing `evaluate` pulls in transformers/torch: ~7 s; the rest of this file is < 1 s
def test_evaluate_module_loaded_by_path_matches_sacrebleu(monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline flags: loading by path must not need the Hub (evaluate.load("bleu") would).
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.setenv(var, "1")
    assert os.path.isfile(M.BLEU_MODULE_DIR / "ris_bleu.py")
    metric = M.load_bleu_metric()
    out = metric.compute(predictions=PREDS, references=REFS)
    assert out["bleu_4"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    assert out["bleu_1"] == pytest.approx(M.corpus_bleu(PREDS, REFS)["bleu_1"])
    # Nested references (one each) give the same score as flat ones.
    nested = metric.compute(predictions=PREDS, references=[[r] for r in REFS])
    assert nested["bleu_4"] == pytest.approx(out["bleu_4"])


# ---------------------------------------------------------------- retrieval metrics

def test_precision_at_k_uses_k_as_denominator() -> None:
    assert M.precision_at_k([1, 0, 1], 10) == pytest.approx(0.2)  # fewer than k results
    assert M.precision_at_k([1, 0, 1], 2) == pytest.approx(0.5)  # cut to top k
    assert M.precision_at_k([], 5) == 0.0
    assert M.precision_at_k(np.array([True, True]), 1) == 1.0
    with pytest.raises(ValueError):
        M.precision_at_k([1], 0)


def test_reciprocal_rank() -> None:
    assert M.reciprocal_rank([0, 0, 1, 1]) == pytest.approx(1 / 3)
    assert M.reciprocal_rank([1]) == 1.0
    assert M.reciprocal_rank([0, 0]) == 0.0
    assert M.reciprocal_rank([]) == 0.0


def test_ndcg_hand_computed() -> None:
    # rel = [0, 1, 0, 1]: DCG = 1/log2(3) + 1/log2(5) = 0.63093 + 0.43068 = 1.06161
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    # Ideal from the 2 relevant items found: 1 + 1/log2(3) = 1.63093 -> nDCG = 0.65092
    assert M.ndcg_at_k([0, 1, 0, 1], 10) == pytest.approx(dcg / (1 + 1 / math.log2(3)))
    assert M.ndcg_at_k([0, 1, 0, 1], 10) == pytest.approx(0.650921, abs=1e-6)
    # Known total of 3 relevant items in the catalog: the ideal has 3 at the top.
    ideal3 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert M.ndcg_at_k([0, 1, 0, 1], 10, n_relevant_total=3) == pytest.approx(dcg / ideal3)
    # The ideal is capped at k ones even when the catalog holds more.
    assert M.ndcg_at_k([1, 1], 2, n_relevant_total=50) == pytest.approx(1.0)
    # A perfect ranking scores 1; nothing relevant scores 0.
    assert M.ndcg_at_k([1, 1, 0], 10) == pytest.approx(1.0)
    assert M.ndcg_at_k([0, 0], 10) == 0.0
    assert M.ndcg_at_k([], 10, n_relevant_total=4) == 0.0
    # An understated total never pushes the score above 1.
    assert M.ndcg_at_k([1, 1, 1], 10, n_relevant_total=1) == pytest.approx(1.0)
    # Only the top k count.
    assert M.ndcg_at_k([0, 0, 1], 2) == 0.0


def test_ranking_metrics_keys_and_zero_hit() -> None:
    out = M.ranking_metrics([0, 1, 0, 1])
    assert set(out) == {"p_at_1", "p_at_5", "p_at_10", "mrr", "ndcg_at_10", "zero_hit"}
    assert out["p_at_1"] == 0.0 and out["p_at_5"] == pytest.approx(0.4) and out["p_at_10"] == pytest.approx(0.2)
    assert out["mrr"] == pytest.approx(0.5)
    assert out["zero_hit"] == 0.0
    empty = M.ranking_metrics([])
    assert empty["zero_hit"] == 1.0 and empty["mrr"] == 0.0 and empty["ndcg_at_10"] == 0.0
    # Results but none relevant is not a zero-hit query.
    assert M.ranking_metrics([0, 0])["zero_hit"] == 0.0


def test_bootstrap_ci_contains_mean_and_narrows() -> None:
    rng = np.random.default_rng(1)
    small = rng.binomial(1, 0.3, size=50).astype(float)
    big = rng.binomial(1, 0.3, size=5000).astype(float)
    m_s, lo_s, hi_s = M.bootstrap_ci(small)
    m_b, lo_b, hi_b = M.bootstrap_ci(big)
    assert m_s == pytest.approx(small.mean()) and lo_s <= m_s <= hi_s
    assert lo_b <= m_b <= hi_b
    assert (hi_b - lo_b) < (hi_s - lo_s) / 3  # ~sqrt(100) = 10x narrower in theory
    assert M.bootstrap_ci(small, seed=7) == M.bootstrap_ci(small, seed=7)  # seeded: reproducible
    assert M.bootstrap_ci(np.full(20, 0.4)) == pytest.approx((0.4, 0.4, 0.4))
    assert all(math.isnan(v) for v in M.bootstrap_ci(np.array([])))
    assert M.bootstrap_ci([1.0, np.nan, 0.0])[0] == pytest.approx(0.5)  # NaNs dropped


def test_paired_bootstrap_diff() -> None:
    rng = np.random.default_rng(2)
    a = rng.random(200)
    assert M.paired_bootstrap_diff(a, a.copy()) == (0.0, 0.0, 0.0)
    # A constant per-query gain of 0.1 is found exactly by pairing, despite large query variance.
    mean, lo, hi = M.paired_bootstrap_diff(a + 0.1, a)
    assert mean == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    b = a + rng.normal(0.05, 0.01, size=200)
    mean, lo, hi = M.paired_bootstrap_diff(b, a)
    assert 0 < lo <= mean <= hi
    with pytest.raises(ValueError):
        M.paired_bootstrap_diff(a, a[:10])


# ---------------------------------------------------------------- relevance levels

def test_relevance_levels() -> None:
    q = {"articleType": "Shirts", "baseColour": "Navy Blue", "gender": "Men"}
    same_type = {"articleType": "Shirts", "baseColour": "White", "gender": "Men"}
    assert set(M.RELEVANCE_LEVELS) == set(M.RELEVANCE_DESCRIPTIONS) == {"R1", "R2", "R3"}
    assert M.is_relevant(q, same_type, "R1")
    assert not M.is_relevant(q, same_type, "R2")
    assert M.is_relevant(q, same_type, "R3")
    assert M.is_relevant(q, {"articleType": " shirts ", "baseColour": "navy blue"}, "R2")
    assert M.is_relevant(q, same_type, ("gender",))


@pytest.mark.parametrize("missing", [None, float("nan"), np.nan, "", "  "])
def test_missing_attributes_never_match(missing: object) -> None:
    q = {"articleType": missing, "baseColour": "Black"}
    assert not M.is_relevant(q, {"articleType": missing, "baseColour": "Black"}, "R2")
    assert not M.is_relevant({"articleType": "Shirts"}, {}, "R1")


def test_pandas_na_never_matches() -> None:
    pd = pytest.importorskip("pandas")
    assert not M.is_relevant({"articleType": pd.NA}, {"articleType": pd.NA}, "R1")
    with pytest.raises(KeyError):
        M.is_relevant({}, {}, "R9")


# ---------------------------------------------------------------- judging many rankings at once


def test_judging_all_queries_at_once_equals_ranking_metrics_on_each_list() -> None:
    """`judge_rankings` (vectorised) against `ranking_metrics` per query, with NaN attributes, short, empty and
    repeated hit lists, and hits whose attributes are missing."""
    from ris_core.metrics import RELEVANCE_LEVELS, ranking_metrics
    from ris_core.retrieval import judge_rankings

    rng = np.random.default_rng(0)
    n = 300
    frame = pd.DataFrame({
        "articleType": rng.choice(["Shirts", "Jeans", "Watches", None], n, p=[0.4, 0.3, 0.25, 0.05]),
        "baseColour": rng.choice(["Red", "Blue", None], n, p=[0.5, 0.45, 0.05]),
        "gender": rng.choice(["Men", "Women"], n),
    }, index=pd.Index(np.arange(1000, 1000 + n), name="id"))
    catalog = frame.iloc[:200]
    query_ids = frame.index[200:].tolist()
    hits = [rng.choice(catalog.index, size=rng.integers(0, 13), replace=False).tolist() for _ in query_ids]
    hits[0], hits[1] = [], [int(catalog.index[0])]
    judged = judge_rankings(hits, query_ids, frame, catalog)
    for qid, ranked in zip(query_ids, hits, strict=True):
        for level, columns in RELEVANCE_LEVELS.items():
            key = tuple(frame.loc[qid, list(columns)])
            if any(pd.isna(v) for v in key):
                relevance, total = [0] * len(ranked), 0
            else:
                found = catalog.loc[ranked, list(columns)].to_numpy()
                relevance = [int(all(a == b for a, b in zip(row, key))) for row in found]
                total = int((catalog[list(columns)] == pd.Series(key, index=list(columns))).all(axis=1).sum())
            for name, value in ranking_metrics(relevance, n_relevant_total=total).items():
                assert judged.loc[qid, f"{level}_{name}"] == pytest.approx(value, abs=1e-12), (qid, level, name)


@pytest.mark.parametrize("n", [7, 4443, 9000])  # 9000: more than one chunk of resamples
def test_bootstrap_counts_draw_the_resamples_of_index_gathering(n: int) -> None:
    """The resample-count matrix gives the interval gathering `values[idx]` gave, from the same draws."""
    values = np.random.default_rng(3).random(n)
    rng, rows = np.random.default_rng(0), max(1, M._MAX_CELLS // n)
    gathered = np.concatenate([values[rng.integers(0, n, size=(min(1000, s + rows) - s, n))].mean(axis=1)
                               for s in range(0, 1000, rows)])
    low, high = np.quantile(gathered, [0.025, 0.975])
    assert M.bootstrap_ci(values) == pytest.approx((values.mean(), low, high), abs=1e-12)
    assert M.bootstrap_ci(values, seed=1) != M.bootstrap_ci(values)  # another seed, other resamples
