"""Small reusable views: an image card, a grid of search results with relevance marks, a short text, a CSV
download, and the result-refinement controls and its before/after view."""

from __future__ import annotations

import time
from collections.abc import Mapping

import pandas as pd
import streamlit as st

from ris_app.loaders import thumb
from ris_core.metrics import is_relevant

CARD_WIDTH = 136  # px: four cards fit a 600-px column, two strategy columns fit a 1280x800 window
REFINE_LABEL = "Refine results (paper §IV-B)"
REFINE_HELP = ("Caption every result image with the same model and re-rank the results by their agreement with "
               "the query photo: 0.4 × same last word + 0.3 × shared words (Jaccard) + 0.3 × cosine of the image "
               "embeddings, in [0, 1]. Web thumbnails are fetched (5 s timeout, 2 MB cap); failures are counted.")


MARKDOWN_SPECIALS = "\\`*_{}[]<>()#+-.!|$~:"


def short(text: object, limit: int = 48) -> str:
    """Text cut to `limit` characters and escaped for st.markdown/st.caption (a "$" in a name is no formula)."""
    text = " ".join(str(text or "").split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return "".join("\\" + ch if ch in MARKDOWN_SPECIALS else ch for ch in text)


def md(text: object) -> str:
    """Any text (a product name, a generated caption) escaped for markdown, whole."""
    return short(text, limit=100_000)


def say(error: object) -> str:
    """An error for a visitor: server paths replaced (on a shared server, `ris_app.access`), markdown escaped."""
    from ris_app.access import Access

    return md(Access.from_env().public(error))


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


def csv_download(label: str, frame: pd.DataFrame, file_name: str, key: str, container=st) -> None:
    """A download button for `frame` as CSV, written when clicked: on every page view it cost a busy server
    more than the rest of the page (thousands of rows)."""
    container.download_button(label, lambda: frame.to_csv(index=False).encode(), file_name=file_name,
                              mime="text/csv", key=key, icon=":material/download:")


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
            lines = [f"{result.rank}\\. {short(result.title, 34)}"]  # "\." : not a markdown ordered list
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


def refine_controls(toggle_key: str, threshold_key: str) -> tuple[bool, float | None]:
    """The refinement toggle (off by default) and, when on, its threshold slider: (on, threshold or None)."""
    on = st.toggle(REFINE_LABEL, key=toggle_key, help=REFINE_HELP)  # off unless a shared link turns it on
    if not on:
        return False, None
    cut = st.slider("Drop results with agreement below", 0.0, 1.0, 0.0, 0.05, key=threshold_key,
                    help="0 keeps every result: refinement then only re-orders them.")
    return True, (cut or None)


def refined_grid(outcome, ms: float, products: pd.DataFrame | None = None, query_attrs: Mapping | None = None,
                 level: str | None = None, width: int = 120) -> int | None:
    """The results after refinement: new rank (backend rank before), agreement score and the result image's own
    generated caption; marked ✓/✗ like `result_grid`. Returns the number of relevant results when judged."""
    st.markdown("**After refinement**")
    judged = query_attrs is not None and level is not None and products is not None
    relevant = 0
    if not outcome.ranked:
        st.info("Refinement kept no result.")
    with st.container(horizontal=True, gap="xsmall"):
        for new_rank, item in enumerate(outcome.ranked, start=1):
            result = item.result
            lines = [f"{new_rank}\\. {short(result.title, 34)}",  # "\." : not a markdown ordered list
                     f"agreement **{item.agreement:.2f}** · was #{result.rank}",
                     f"*{short(item.caption, 40) or '(empty caption)'}*"]
            if judged and result.product_id is not None and result.product_id in products.index:
                hit = is_relevant(query_attrs, products.loc[result.product_id], level)
                relevant += hit
                lines.insert(0, ":green[**✓ relevant**]" if hit else ":red[✗ not relevant]")
            with st.container(width=width, gap=None):
                show_image(result.thumbnail or result.image, width)
                st.caption("  \n".join(lines))
    note = f"dropped {outcome.dropped}, failed {outcome.failed} · refined in {ms:.0f} ms"
    if judged and outcome.ranked:
        note = f"{relevant} of {len(outcome.ranked)} relevant ({level}) · " + note
    st.caption(note)
    if outcome.failures:
        result, why = outcome.failures[0]
        st.caption(f"Not refined: #{result.rank} {short(result.title, 30)} ({short(why, 120)})"
                   + (f" and {len(outcome.failures) - 1} more" if len(outcome.failures) > 1 else ""))
    return relevant if judged else None


def job_progress(key: str, label: str):
    """The background job `key`'s status; while it runs, a progress bar that refreshes itself and reruns the
    page once the job has finished (so every visitor of the page sees the same job, none starts another)."""
    from ris_app import loaders

    status = loaders.jobs().status(key)
    if status.running:
        _follow(key, label)
    return status


@st.fragment(run_every=1.5)
def _follow(key: str, label: str) -> None:
    from ris_app import loaders

    status = loaders.jobs().status(key)
    if not status.running:
        st.rerun()
    step = f"{status.stage}: {status.done:,} of {status.total:,}" if status.total else "starting"
    st.progress(status.fraction, text=f"{label} · {md(step)} · {time.time() - status.started:.0f} s")
