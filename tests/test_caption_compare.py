"""Captions of several systems per product: the join, the word marks, the filters and the per-system scores."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ris_core.caption_compare import System, compare_table, decodings_in, only, summary, word_diff


def captions(generated: list[str], reranked: list[str] | None = None, ids=(1, 2, 3)) -> pd.DataFrame:
    n = len(ids)
    frame = pd.DataFrame({"id": list(ids), "generated": generated, "cider_d": [1.0, 2.0, 3.0][:n],
                          "reference": ["Puma Men Grey T-shirt", "Nike Women Blue Shoes", "Titan Men Black Watch"][:n],
                          "articleType": ["Tshirts", "Shoes", "Watches"][:n], "seen": [True, False, True][:n]})
    if reranked is not None:
        frame["reranked"] = reranked
    return frame


def test_word_diff_marks_wrong_and_missing_words_in_reading_order():
    assert word_diff("Puma Men Grey Leaping Cat T-shirt", "Reebok Men grey Polo T-Shirt.") == [
        ("wrong", "Reebok"), ("missing", "Puma"), ("same", "Men"), ("same", "grey"), ("wrong", "Polo"),
        ("missing", "Leaping"), ("missing", "Cat"), ("same", "T-Shirt.")]
    assert word_diff("A B", "A B") == [("same", "A"), ("same", "B")]
    assert word_diff("A B", "") == [("missing", "A"), ("missing", "B")]


def test_table_joins_on_the_products_every_system_captioned_and_scores_each():
    a = captions(["Puma Men Grey T-shirt", "Nike Men Blue Shoes", "Fastrack Watch"], ["x", "Women Blue Shoes", ""])
    b = captions(["Puma Grey T-shirt", "Adidas Women Blue Shoes"], ids=(1, 2))
    greedy_a, reranked_a, greedy_b = System("a", "greedy"), System("a", "reranked"), System("b", "greedy")
    table = compare_table({greedy_a: a, reranked_a: a, greedy_b: b})
    assert table["id"].tolist() == [1, 2]  # product 3: not captioned by b
    assert table[greedy_a.label].tolist() == ["Puma Men Grey T-shirt", "Nike Men Blue Shoes"]
    assert table[f"{greedy_a.label} BLEU"].iloc[0] == pytest.approx(100.0)
    assert table[f"{greedy_a.label} last two"].tolist() == [True, True]
    assert table[f"{reranked_a.label} last two"].tolist() == [False, True]
    assert table[f"{greedy_a.label} CIDEr-D"].tolist() == [1.0, 2.0]
    assert math.isnan(table[f"{reranked_a.label} CIDEr-D"].iloc[0])  # no reranked_cider_d column: unknown, not 0
    assert decodings_in(a) == ["greedy", "reranked"] and decodings_in(b) == ["greedy"]
    with pytest.raises(ValueError, match="no reranked captions"):
        compare_table({System("b", "reranked"): b})


def test_filters_split_the_products_and_the_summary_counts_them():
    frame = captions(["Puma Men Grey T-shirt", "Nike Women Blue Shoes", "Titan Black Watch"],
                     ["Puma Men Grey T-shirt", "Nike Women Red Sandals", "Titan Men Black Dial"])
    systems = [System("r", "greedy"), System("r", "reranked")]
    table = compare_table({s: frame for s in systems})
    assert only(table, systems, "disagree")["id"].tolist() == [2, 3]
    assert only(table, systems, "one_right")["id"].tolist() == [2, 3]  # greedy right, reranked wrong
    assert only(table, systems, "none_right").empty
    assert len(only(table, systems, "all")) == 3
    with pytest.raises(ValueError, match="unknown filter"):
        only(table, systems, "some")
    scores = summary(table, systems).set_index("captions")
    assert scores.loc["r · greedy", "last two right"] == pytest.approx(1.0)
    assert scores.loc["r · reranked", "last two right"] == pytest.approx(1 / 3)
    # product 1: a tie (both count); 2: greedy; 3: reranked's "Titan Men Black" shares more n-grams than greedy's
    assert scores.loc["r · greedy", "best of row"] == pytest.approx(2 / 3)
    assert scores.loc["r · reranked", "best of row"] == pytest.approx(2 / 3)
    assert scores.loc["r · greedy", "BLEU-4"] > scores.loc["r · reranked", "BLEU-4"]


def test_system_labels_round_trip_and_bad_ones_are_refused():
    system = System("ablation · odd name", "reranked")
    assert System.parse(system.label) == system
    for bad in ("reference-cpu", "run · beam", " · greedy"):
        with pytest.raises(ValueError, match="not a caption system"):
            System.parse(bad)


def test_smoothing_is_tensorboards_debiased_moving_average():
    from ris_app.charts import smooth

    values = pd.Series([4.0, 2.0, float("nan"), 1.0])
    assert smooth(values, 0.0).tolist()[:2] == [4.0, 2.0]
    out = smooth(values, 0.5)
    assert out[0] == 4.0  # debiased: the first point is itself, not pulled towards 0
    assert out[1] == pytest.approx((0.5 * 0.5 * 4 + 0.5 * 2) / (1 - 0.25))
    assert math.isnan(out[2]) and out[3] < out[1]
    with pytest.raises(ValueError):
        smooth(values, 1.0)


def test_differing_arguments_keeps_only_what_differs():
    from ris_core.runs import differing_arguments

    table = differing_arguments({"a": {"lr": 0.1, "epochs": 10, "flip_p": 0.5},
                                 "b": {"lr": "0.1", "epochs": 12}, "c": {"lr": 0.1, "epochs": 10, "flip_p": 0.5}})
    assert list(table.columns) == ["epochs", "flip_p"]  # lr: the same value everywhere (as text)
    assert table.loc["b", "flip_p"] == "" and table.loc["b", "epochs"] == "12"
    assert differing_arguments({"a": {"x": 1}, "b": {"x": 1}}).shape[1] == 0
