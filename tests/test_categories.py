"""Per-category metrics and article confusions, on a hand-checkable table."""

from __future__ import annotations

import pandas as pd
import pytest

from ris_core.evaluation.categories import article_confusions, article_words, per_category
from ris_core.metrics import corpus_bleu

CAPTIONS = pd.DataFrame({
    "id": [1, 2, 3, 4],
    "reference": ["Nike Men Blue T-shirt", "Puma Men Red T-shirt", "Titan Men Watch", "Bata Women Black Heels"],
    "generated": ["Nike Men Blue T-shirt", "Puma Men Red Top", "Titan Men Watch", "Bata Women Black Flats"],
    "last_two_match": [True, False, True, False],
    "articleType": ["Tshirts", "Tshirts", "Watches", "Heels"], "gender": ["Men", "Men", "Men", "Women"],
})


def test_per_category_scores_each_group_and_joins_the_strategys_p_at_10():
    retrieval = pd.DataFrame({"id": [1, 2, 3, 4, 1], "strategy": ["s", "s", "s", "s", "other"],
                              "R1_p_at_10": [1.0, 0.5, 0.2, 0.0, 0.0]})
    table = per_category(CAPTIONS, "articleType", retrieval=retrieval, strategy="s").set_index("category")
    assert table.loc["Tshirts", "products"] == 2 and table.index[0] == "Tshirts"  # largest first
    assert table.loc["Tshirts", "bleu_4"] == pytest.approx(
        corpus_bleu(CAPTIONS["generated"][:2].tolist(), CAPTIONS["reference"][:2].tolist())["bleu_4"])
    assert table.loc["Tshirts", "last_two_match"] == 0.5 and table.loc["Tshirts", "p_at_10"] == 0.75
    assert per_category(CAPTIONS, "gender").set_index("category").loc["Women", "products"] == 1
    with pytest.raises(KeyError, match="no 'season' column"):
        per_category(CAPTIONS, "season")


def test_confusions_read_the_article_from_the_last_word():
    catalog_names = pd.Series(["A Men Top", "B Women Top", "C Men T-shirt", "D Women Flats", "E Women Heels"])
    catalog_types = pd.Series(["Tops", "Tops", "Tshirts", "Flats", "Heels"])
    words = article_words(catalog_names, catalog_types)
    assert words == {"top": "Tops", "tshirt": "Tshirts", "flats": "Flats", "heels": "Heels"}
    confusions = article_confusions(CAPTIONS, words)
    pairs = {(r.true, r.named): r.products for r in confusions.itertuples()}
    assert pairs == {("Tshirts", "Tops"): 1, ("Heels", "Flats"): 1, ("Watches", "(unknown)"): 1}
    assert confusions.set_index("true").loc["Tshirts", "share of true type"] == 0.5
