"""Query strategies: turn a generated caption into the text query sent to an image search engine.

The paper sends the last two words of the caption ("Turtle Check Men Navy Blue Shirt" -> "Blue Shirt").
Every strategy here is a plain ``str -> str`` function registered with ``@strategy(name, description)``;
the decorator adds the shared safety net (non-string input, whitespace, the 200-character cap), so a new
strategy is one small function:

    @strategy("first_word", "The caption's first word.")
    def first_word(caption: str) -> str:
        return " ".join(words(caption)[:1])

Captions are split into *words*: whitespace-separated tokens with leading/trailing punctuation and
symbols removed ("Shirt." -> "Shirt", '"Blue' -> "Blue"; inner punctuation stays: "T-shirt", "Men's",
and an abbreviation keeps its final dot: "U.S."). Tokens with no letter, digit or mark are dropped.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable

MAX_QUERY_CHARS = 200  # search engines truncate or reject very long queries; keep them bounded

StrategyFn = Callable[[str], str]
STRATEGIES: dict[str, StrategyFn] = {}
STRATEGY_DESCRIPTIONS: dict[str, str] = {}

# Words that mark the gender segment of a Fashion product name ("Puma Men Black Sports Shoes").
# Compared after casefolding and mapping typographic apostrophes to "'".
GENDER_WORDS: frozenset[str] = frozenset({
    "men", "man", "mens", "men's", "women", "woman", "womens", "women's",
    "boys", "boy", "boy's", "boys'", "girls", "girl", "girl's", "girls'",
    "unisex", "kids", "kid", "kid's", "kids'",
})

# The distinct baseColour values of styles.csv (read once to write this list).
BASE_COLOURS: tuple[str, ...] = (
    "Beige", "Black", "Blue", "Bronze", "Brown", "Burgundy", "Charcoal", "Coffee Brown", "Copper",
    "Cream", "Fluorescent Green", "Gold", "Green", "Grey", "Grey Melange", "Khaki", "Lavender",
    "Lime Green", "Magenta", "Maroon", "Mauve", "Metallic", "Multi", "Mushroom Brown", "Mustard",
    "Navy Blue", "Nude", "Off White", "Olive", "Orange", "Peach", "Pink", "Purple", "Red", "Rose",
    "Rust", "Sea Green", "Silver", "Skin", "Steel", "Tan", "Taupe", "Teal", "Turquoise Blue", "White",
    "Yellow",
)
_COLOUR_PHRASES: frozenset[tuple[str, ...]] = frozenset(tuple(c.casefold().split()) for c in BASE_COLOURS)
_MAX_COLOUR_WORDS = max(len(p) for p in _COLOUR_PHRASES)


# ---------------------------------------------------------------- helpers

def _is_edge_char(ch: str) -> bool:
    """Punctuation, symbols, separators and format/control characters are trimmed from word edges."""
    return unicodedata.category(ch)[0] in "PSZC"


def _has_content(token: str) -> bool:
    # Letters, digits or combining marks (Devanagari vowel signs are marks, so test the category).
    return any(unicodedata.category(ch)[0] in "LNM" for ch in token)


def _clean_token(token: str) -> str:
    start, end = 0, len(token)
    while start < end and _is_edge_char(token[start]):
        start += 1
    while end > start and _is_edge_char(token[end - 1]):
        end -= 1
    core = token[start:end]
    # Keep the final dot of an abbreviation ("U.S." stays "U.S.", but "Shirt." becomes "Shirt").
    if core and "." in core and end < len(token) and token[end] == ".":
        core += "."
    return core


def _to_text(caption: object) -> str:
    if caption is None:
        return ""
    text = caption if isinstance(caption, str) else str(caption)
    # NFKC folds full-width letters and no-break spaces, so " Ｍｅｎ " splits like " Men ".
    return unicodedata.normalize("NFKC", text)


def words(caption: str) -> list[str]:
    """The caption's words in order, edge punctuation removed, original casing kept."""
    out = []
    for token in _to_text(caption).split():
        cleaned = _clean_token(token)
        if cleaned and _has_content(cleaned):
            out.append(cleaned)
    return out


def _fold(word: str) -> str:
    return word.casefold().replace("\u2019", "'").replace("\u2018", "'")


def gender_index(ws: list[str]) -> int | None:
    """Index of the first gender word in ``ws``, or None."""
    for i, w in enumerate(ws):
        if _fold(w) in GENDER_WORDS:
            return i
    return None


def cap_query(text: str, limit: int = MAX_QUERY_CHARS) -> str:
    """Whitespace-normalise and cut to ``limit`` chars, at a word boundary when there is one."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > 0 else cut).rstrip()


# ---------------------------------------------------------------- registry

def strategy(name: str, description: str) -> Callable[[StrategyFn], StrategyFn]:
    """Register ``fn`` under ``name``; the registered function never raises on odd input and caps its output."""
    if not name or not name.isidentifier():
        raise ValueError(f"strategy name must be a non-empty identifier, got {name!r}")

    def register(fn: StrategyFn) -> StrategyFn:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")

        def run(caption: str) -> str:
            return cap_query(fn(_to_text(caption)) or "")

        run.__name__ = getattr(fn, "__name__", name)
        run.__doc__ = fn.__doc__ or description
        run.__wrapped__ = fn  # type: ignore[attr-defined]
        STRATEGIES[name] = run
        STRATEGY_DESCRIPTIONS[name] = description
        return run

    return register


def unregister(name: str) -> None:
    """Remove a strategy (tests and experiments register throwaway ones)."""
    STRATEGIES.pop(name, None)
    STRATEGY_DESCRIPTIONS.pop(name, None)


def queries_for(caption: str, names: Iterable[str] | None = None) -> dict[str, str]:
    """``{strategy name: query}`` for the named strategies (all registered ones when ``names`` is None)."""
    chosen = list(STRATEGIES) if names is None else list(names)
    unknown = [n for n in chosen if n not in STRATEGIES]
    if unknown:
        raise KeyError(f"unknown strategies {unknown}; known: {sorted(STRATEGIES)}")
    return {n: STRATEGIES[n](caption) for n in chosen}


# ---------------------------------------------------------------- strategies

@strategy("last_two_words", "The paper's query: the caption's last two words.")
def last_two_words(caption: str) -> str:
    return " ".join(words(caption)[-2:])


@strategy("full_caption", "The whole caption, whitespace-normalised.")
def full_caption(caption: str) -> str:
    return " ".join(words(caption))


@strategy("drop_brand", "The caption without the brand: words before the first gender word are dropped.")
def drop_brand(caption: str) -> str:
    ws = words(caption)
    gi = gender_index(ws)
    if gi is not None:
        return " ".join(ws[gi:])
    # No gender word: the brand is usually the first word, but keep two-word captions whole.
    return " ".join(ws[1:] if len(ws) >= 3 else ws)


def colour_span(ws: list[str]) -> tuple[int, int] | None:
    """``(start, end)`` of the longest run of baseColour phrases in ``ws`` (rightmost on ties), or None.

    Adjacent colour phrases merge into one run ("Red Black Watches" -> "Red Black"), so "Navy Blue"
    beats "Blue" and two-tone names keep both colours.
    """
    folded = [_fold(w) for w in ws]
    best: tuple[int, int] | None = None
    i = 0
    while i < len(ws):
        j = i
        while True:  # extend the run greedily, longest phrase first
            step = next((n for n in range(_MAX_COLOUR_WORDS, 0, -1)
                         if j + n <= len(ws) and tuple(folded[j:j + n]) in _COLOUR_PHRASES), 0)
            if not step:
                break
            j += step
        if j > i:
            if best is None or j - i >= best[1] - best[0]:
                best = (i, j)
            i = j
        else:
            i += 1
    return best


@strategy("colour_article", "'<colour> <article>': the longest baseColour phrase and the words after it.")
def colour_article(caption: str) -> str:
    ws = words(caption)
    span = colour_span(ws)
    if span is None or span[1] == len(ws):
        # No colour, or nothing after it to name the article: the template cannot be filled.
        return last_two_words(caption)
    return " ".join(ws[span[0]:])


@strategy("gender_article", "'<gender> <last word>' when the caption names a gender, else the last word.")
def gender_article(caption: str) -> str:
    ws = words(caption)
    if not ws:
        return ""
    gi = gender_index(ws)
    if gi is None or gi == len(ws) - 1:
        return ws[-1]  # also avoids "Men Men" when the gender word is the last word
    return f"{ws[gi]} {ws[-1]}"
