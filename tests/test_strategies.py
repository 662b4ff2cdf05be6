"""Query strategies on real-looking and tricky captions; the registry contract."""

from __future__ import annotations

import pytest

from ris_core import strategies as S
from ris_core.strategies import STRATEGIES, STRATEGY_DESCRIPTIONS, queries_for, strategy

REQUIRED = ["last_two_words", "full_caption", "drop_brand", "colour_article", "gender_article"]


def test_required_strategies_registered_with_descriptions() -> None:
    for name in REQUIRED:
        assert name in STRATEGIES
        assert STRATEGY_DESCRIPTIONS[name].strip()


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Turtle Check Men Navy Blue Shirt", "Blue Shirt"),
        ("  Blue   Shirt.  ", "Blue Shirt"),
        ("Blue Shirt.", "Blue Shirt"),
        ('"Puma Men Black Sports Shoes"', "Sports Shoes"),
        ("\u201cNike Men Blue Shirt\u201d !!", "Blue Shirt"),  # smart quotes, trailing punctuation token
        ("Shirt", "Shirt"),
        ("", ""),
        ("   ", ""),
        ("... !!! ---", ""),
        ("Inkfruit Men's Barcode Lemon Yellow T-shirt", "Yellow T-shirt"),  # inner punctuation kept
        ("黑色 男士 衬衫", "男士 衬衫"),
        ("हिंदी शर्ट", "हिंदी शर्ट"),  # trailing vowel sign is a mark, not punctuation
    ],
)
def test_last_two_words(caption: str, expected: str) -> None:
    assert STRATEGIES["last_two_words"](caption) == expected


def test_full_caption_normalises_whitespace_and_edges() -> None:
    assert STRATEGIES["full_caption"]("  Puma\tMen \n Black   Shoes. ") == "Puma Men Black Shoes"
    assert STRATEGIES["full_caption"]("U.S. Polo Assn. Men Jackets") == "U.S. Polo Assn Men Jackets"
    assert STRATEGIES["full_caption"]("") == ""


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Puma Men Black Sports Shoes", "Men Black Sports Shoes"),
        ("United Colors of Benetton Men Solid Black Gloves", "Men Solid Black Gloves"),  # multi-word brand
        ("U.S. Polo Assn. Men Solid Olive Jackets", "Men Solid Olive Jackets"),
        ("Inkfruit MEN'S Barcode T-shirt", "MEN'S Barcode T-shirt"),  # case-insensitive, possessive
        ("Arrow Woman Solid White Shirt", "Woman Solid White Shirt"),
        ("Men Black Shoes", "Men Black Shoes"),  # gender first: nothing to drop
        ("Lotus Herbals Cocoa Lip Balm", "Herbals Cocoa Lip Balm"),  # no gender: drop first word
        ("Lip Balm", "Lip Balm"),  # no gender and < 3 words: keep
        ("Balm", "Balm"),
        ("", ""),
    ],
)
def test_drop_brand(caption: str, expected: str) -> None:
    assert STRATEGIES["drop_brand"](caption) == expected


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Turtle Check Men Navy Blue Shirt", "Navy Blue Shirt"),  # multi-word colour beats "Blue"
        ("Puma Men Black Sports Shoes", "Black Sports Shoes"),
        ("Nike men navy blue cap.", "navy blue cap"),  # case-insensitive, original casing kept
        ("Proline Men Charcoal Grey Tracksuit", "Charcoal Grey Tracksuit"),  # adjacent colours merge
        ("Scullers For Her Off White Blazer", "Off White Blazer"),
        ("Lotus Herbals Cocoa Lip Balm", "Lip Balm"),  # no colour: last two words
        ("Lakme Nail Polish Red", "Polish Red"),  # colour last, no article after it: last two words
        ("Navy", "Navy"),
        ("", ""),
    ],
)
def test_colour_article(caption: str, expected: str) -> None:
    assert STRATEGIES["colour_article"](caption) == expected


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Puma Men Black Sports Shoes", "Men Shoes"),
        ("Catwalk WOMEN Multi Flats!", "WOMEN Flats"),
        ("Lotus Herbals Cocoa Lip Balm", "Balm"),
        ("Nike Men", "Men"),  # gender is the last word: no "Men Men"
        ("", ""),
    ],
)
def test_gender_article(caption: str, expected: str) -> None:
    assert STRATEGIES["gender_article"](caption) == expected


@pytest.mark.parametrize("name", REQUIRED)
@pytest.mark.parametrize("caption", ["", "x", "!!", " \t\n ", "'\"`", None, 12345, "Ｍｅｎ Ｓｈｉｒｔ", "a\u200bb c"])
def test_every_strategy_survives_odd_input(name: str, caption: object) -> None:
    out = STRATEGIES[name](caption)  # type: ignore[arg-type]
    assert isinstance(out, str)
    assert out == out.strip() and "  " not in out


@pytest.mark.parametrize("name", REQUIRED)
def test_output_capped_at_200_chars(name: str) -> None:
    long_words = " ".join(["Navy Blue Shirt"] * 400)
    one_token = "x" * 5000
    for caption in (long_words, one_token, "Men " + one_token + " " + one_token):
        out = STRATEGIES[name](caption)
        assert 0 < len(out) <= S.MAX_QUERY_CHARS
    # Cut at a word boundary when there is one: no partial "Shi".
    assert STRATEGIES["full_caption"](long_words).split()[-1] in {"Navy", "Blue", "Shirt"}


def test_queries_for_selected_all_and_unknown() -> None:
    caption = "Puma Men Black Sports Shoes"
    assert queries_for(caption, ["last_two_words", "drop_brand"]) == {
        "last_two_words": "Sports Shoes",
        "drop_brand": "Men Black Sports Shoes",
    }
    assert set(queries_for(caption)) == set(STRATEGIES)
    with pytest.raises(KeyError, match="no_such"):
        queries_for(caption, ["no_such"])


def test_adding_a_strategy_is_one_decorated_function() -> None:
    try:
        @strategy("first_word_test", "The caption's first word.")
        def first_word(caption: str) -> str:
            return caption.split()[0] if caption.split() else ""

        assert STRATEGY_DESCRIPTIONS["first_word_test"] == "The caption's first word."
        assert queries_for("  Puma Men Shoes", ["first_word_test"]) == {"first_word_test": "Puma"}
        # The decorator adds the safety net: None input and the length cap come for free.
        assert STRATEGIES["first_word_test"](None) == ""  # type: ignore[arg-type]
        assert len(STRATEGIES["first_word_test"]("y" * 1000)) == S.MAX_QUERY_CHARS
        with pytest.raises(ValueError, match="already registered"):
            strategy("first_word_test", "dup")(first_word)
    finally:
        S.unregister("first_word_test")
    assert "first_word_test" not in STRATEGIES


def test_bad_strategy_name_rejected() -> None:
    with pytest.raises(ValueError):
        strategy("has space", "nope")
