"""Compare captions: several runs' (or one run's greedy and reranked) captions beside each held-out product's
name, words marked against it, with filters for where they disagree; the view lives in the URL, so a link
reopens it."""

import math

import pandas as pd
import streamlit as st

from ris_app import loaders
from ris_app.share import Param, link, publish, restore
from ris_app.sidebar import sidebar
from ris_app.widgets import csv_download, md, show_image
from ris_core.caption_compare import FILTERS, System, compare_table, decodings_in, only, summary, word_diff

PAGE_SIZE = 20
SUBSETS = {"all": None, "seen": True, "novel": False}
SHARED = [Param("compare_systems", "captions", many=True), Param("compare_filter", "only"),
          Param("compare_subset", "products"), Param("compare_types", "types", many=True),
          Param("compare_product", "product")]


def marked(reference: str, caption: str) -> str:
    """The caption as markdown: wrong words red, the reference words it misses grey and struck through."""
    if not caption.strip():
        return ":gray[(empty caption)]"
    parts = []
    for kind, word in word_diff(reference, caption):
        text = md(word)
        parts.append(text if kind == "same" else f":red[**{text}**]" if kind == "wrong" else f":gray[~~{text}~~]")
    return " ".join(parts)


@st.cache_resource(show_spinner="Scoring the captions…", max_entries=16)  # shared and read-only: views filter it
def _table(keys: tuple, _frames: tuple) -> pd.DataFrame:
    return compare_table({System(run, decoding): frame for (run, decoding, _), frame in zip(keys, _frames)})


@st.cache_data(show_spinner=False, max_entries=64)
def _scores(keys: tuple, keep: str, subset: str, types: tuple, _view: pd.DataFrame) -> pd.DataFrame:
    """`summary` of the view these choices give: corpus BLEU over thousands of captions took most of a busy
    server's time for this page, so it is computed once per choice of captions and filters, not per visit."""
    return summary(_view, [System(run, decoding) for run, decoding, _ in keys])


choice = sidebar(multi=True)
st.title("Compare captions")
st.caption("Each held-out product's name beside the captions of the chosen runs and decodings. Words marked "
           ":red[**red**] are not in the name; :gray[~~struck grey~~] ones are in the name but missing from the "
           "caption. BLEU is sentence BLEU; ✓ marks a caption whose last two words (the paper's query) are right.")
restore("compare_captions", SHARED)

evaluations = {}
for run in choice.runs:
    evaluation = loaders.evaluation(run)
    if evaluation.captions is not None:
        evaluations[run.name] = (run, evaluation.captions)
skipped = [r.name for r in choice.runs if r.name not in evaluations]
if skipped:
    st.caption("No captions to compare (not evaluated yet): " + ", ".join(md(n) for n in skipped))
options = [System(name, d).label for name, (_, frame) in evaluations.items() for d in decodings_in(frame)]
if not options:
    st.info("Choose evaluated runs in the sidebar (Caption quality evaluates a run): two runs, or one run to "
            "compare its greedy and reranked captions.")
    st.stop()

default = [o for o in options if o.endswith("greedy")][:3] if len(evaluations) > 1 else options[:2]
if "compare_systems" not in st.session_state:
    st.session_state["compare_systems"] = default
else:  # runs may have left the sidebar since (or a link named captions this server does not have)
    st.session_state["compare_systems"] = [s for s in st.session_state["compare_systems"] if s in options]
labels = st.multiselect("Captions", options, key="compare_systems", max_selections=4,
                        help="'<run> · greedy' is the model's own caption, '<run> · reranked' the evaluation's "
                             "reranked one. Up to four at once.")
systems = [System.parse(label) for label in labels]
if not systems:
    st.info("Pick at least one set of captions above.")
    st.stop()

runs_used = list(dict.fromkeys(s.run for s in systems))
keys = tuple((s.run, s.decoding, loaders.eval_key(evaluations[s.run][0])) for s in systems)
table = _table(keys, tuple(evaluations[s.run][1] for s in systems))
if len(runs_used) > 1:
    sizes = {name: len(evaluations[name][1]) for name in runs_used}
    st.caption(f"{len(table):,} products were held out by every chosen run ("
               + ", ".join(f"{md(n)}: {k:,}" for n, k in sizes.items()) + "): runs with other splits share fewer.")
if table.empty:
    st.warning("The chosen runs hold out no product in common (different splits): compare runs trained on the "
               "same split, or one run's two decodings.")
    st.stop()

controls = st.columns([3, 2, 3])
if st.session_state.get("compare_filter") not in FILTERS:
    st.session_state["compare_filter"] = "all"
keep = controls[0].selectbox("Show products where", list(FILTERS), key="compare_filter", format_func=FILTERS.get)
if st.session_state.get("compare_subset") not in SUBSETS:
    st.session_state["compare_subset"] = "all"
subset_name = controls[1].segmented_control(
    "Products", list(SUBSETS), key="compare_subset",
    help=f"seen / novel: is the exact name also a training product's (of {md(systems[0].run)})?") or "all"
types = sorted(table["articleType"].dropna().astype(str).unique()) if "articleType" in table else []
st.session_state["compare_types"] = [t for t in st.session_state.get("compare_types", []) if t in types]
chosen_types = controls[2].multiselect("Article type", types, key="compare_types", placeholder="All")

view = only(table, systems, keep)
if SUBSETS[subset_name] is not None and "seen" in view:
    view = view[view["seen"].astype(str).str.lower().eq(str(SUBSETS[subset_name]).lower())]
if chosen_types:
    view = view[view["articleType"].astype(str).isin(chosen_types)]

scores = _scores(keys, keep, subset_name, tuple(chosen_types), view)
st.dataframe(scores, hide_index=True, key="compare_summary", column_config={
    "BLEU-4": st.column_config.NumberColumn("BLEU-4 (corpus)", format="%.1f"),
    "CIDEr-D": st.column_config.NumberColumn("CIDEr-D (mean)", format="%.2f"),
    "last two right": st.column_config.ProgressColumn("last two right", format="percent", min_value=0, max_value=1),
    "best of row": st.column_config.ProgressColumn(
        "best of the row", format="percent", min_value=0, max_value=1,
        help="share of these products where this caption has the highest sentence BLEU (ties count for each)")})

if view.empty:
    st.info("No product matches these filters; loosen one of them.")
else:
    pages = max(1, math.ceil(len(view) / PAGE_SIZE))
    nav = st.columns([1, 4])
    page = nav[0].number_input("Page", min_value=1, max_value=pages, value=1, step=1, key="compare_page")
    nav[1].caption(f"{len(view):,} of {len(table):,} products · page {page} of {pages}")
    rows = view.iloc[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    header = "| id | name | " + " | ".join(f"{md(s.label)} | BLEU" for s in systems) + " |"
    lines = [header, "|---:|---|" + "---|---:|" * len(systems)]
    for _, row in rows.iterrows():
        cells = [str(int(row["id"])), md(row["reference"])]
        for s in systems:
            tick = " ✓" if row[f"{s.label} last two"] else ""
            cells += [marked(str(row["reference"]), row[s.label]), f"{row[f'{s.label} BLEU']:.0f}{tick}"]
        lines.append("| " + " | ".join(cells) + " |")
    st.markdown("\n".join(lines))

    st.subheader("One product")
    ids = view["id"].astype(int).tolist()
    if str(st.session_state.get("compare_product")) not in {str(i) for i in ids}:
        st.session_state["compare_product"] = str(ids[0])
    by_id = dict(zip(view["id"].astype(int), view["reference"].astype(str)))
    product = st.selectbox("Product", [str(i) for i in ids], key="compare_product",
                           format_func=lambda i: f"{i} · {by_id.get(int(i), '')}")
    row = view.loc[view["id"].astype(int) == int(product)].iloc[0]
    left, right = st.columns([1, 3])
    with left:
        show_image(str(loaders.catalog(choice.data_dir).image_path(int(product))), width=160)
    with right:
        attributes = " · ".join(md(row[a]) for a in ("articleType", "gender", "baseColour") if a in row)
        st.markdown(f"**{md(row['reference'])}**  \n:gray[{attributes}]")
        for s in systems:
            cider = row[f"{s.label} CIDEr-D"]
            st.markdown(f"{md(s.label)}: {marked(str(row['reference']), row[s.label])}  \n"
                        f":gray[sentence BLEU {row[f'{s.label} BLEU']:.1f}"
                        + ("" if pd.isna(cider) else f" · CIDEr-D {cider:.2f}")
                        + (" · last two right" if row[f"{s.label} last two"] else "") + "]")

link(publish(SHARED, {"runs": [r.name for r in choice.runs]}), "compare_captions")
name = "-".join(runs_used) + f"-{keep}"
csv_download("Download these products (CSV)", view, f"{name}-captions-compared.csv", key="compare_download")
