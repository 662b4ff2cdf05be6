"""Small reusable views: an image card, a grid of search results with relevance marks, a short text."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
import streamlit as st

from ris_app.loaders import thumb
from ris_core.metrics import is_relevant

CARD_WIDTH = 136  # px: four cards fit a 600-px column, two strategy columns fit a 1280x800 window


def short(text: object, limit: int = 48) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def show_image(source: str, width: int = CARD_WIDTH) -> None:
    """A local image file as a small thumbnail, a URL as is, or a grey placeholder when unusable."""
    if source.startswith(("http://", "https://")):
        st.image(source, width=width)
        return
    data = thumb(source)
    if data is None:
        st.caption("(image unavailable)")
    else:
        st.image(data, width=width)


def image_card(source: str, lines: list[str], width: int = CARD_WIDTH) -> None:
    with st.container(border=True, width=width + 24):
        show_image(source, width)
        st.caption("  \n".join(lines))


def result_grid(results: list, products: pd.DataFrame | None = None, query_attrs: Mapping | None = None,
                level: str | None = None, width: int = 120, query: str = "?") -> int | None:
    """Search results as a wrapping grid of thumbnails; with `query_attrs` and `level` each one is marked
    ✓ relevant / ✗ not. Returns the number of relevant results when judged, else None."""
    if not results:
        st.info("No results for this query." if query.strip() else "The caption gave this strategy no words to search.")
        return None
    judged = query_attrs is not None and level is not None and products is not None
    relevant = 0
    with st.container(horizontal=True, gap="xsmall"):
        for result in results:
            lines = [f"{result.rank}. {short(result.title, 34)}"]
            if judged and result.product_id is not None and result.product_id in products.index:
                hit = is_relevant(query_attrs, products.loc[result.product_id], level)
                relevant += hit
                lines.insert(0, ":green[**✓ relevant**]" if hit else ":red[✗ not relevant]")
            elif result.source_url and "//" in result.source_url:
                lines.append(short(result.source_url.split("/")[2], 28))
            with st.container(width=width, gap=None):
                show_image(result.thumbnail or result.image, width)
                st.caption("  \n".join(lines))
    return relevant if judged else None
