"""Search demo: a product photo in, its caption, each strategy's query and the results out, with timings;
optionally the results refined by their agreement with the photo (paper §IV-B), before and after."""

import hashlib
import random
import sqlite3
import time

import streamlit as st

from ris_app import loaders
from ris_app.sidebar import sidebar
from ris_app.widgets import md, refine_controls, refined_grid, result_grid
from ris_core.data import DataError
from ris_core.images import ImageError, square
from ris_core.modeling import CheckpointError
from ris_core.runs import RunError
from ris_core.search import search_safely
from ris_core.strategies import STRATEGIES, STRATEGY_DESCRIPTIONS

GALLERY_SIZE = 5  # one row of thumbnails beside the photo at 1280 px
BACKENDS = {"catalog": "Local catalog", "duckduckgo": "DuckDuckGo (web)"}
WEB_RETRY_SECONDS = 60  # after DuckDuckGo failed, reruns within this time go straight to the catalog
DEMO_LEVEL = "R1"  # gallery products have known attributes: mark results of the same article type

choice = sidebar()
st.title("Search demo")
st.caption("Reverse image search through captioning: the model describes the photo, a strategy turns the "
           "description into a text query, and a search engine answers it.")
run = choice.run
try:
    reported = run is not None and run.reported_only
except RunError as err:
    st.error(str(err))
    st.stop()
usable = run is not None and run.has_checkpoint  # an imported paper notebook: reported history, real weights
if not usable:
    st.info("No run found: train one (`make reference`) or add a runs folder in the sidebar." if run is None
            else f"**{run.name}** holds reported numbers only (no checkpoint). Pick a trained run in the sidebar "
            "to caption photos." if reported else "Pick a trained run (one with a checkpoint) in the sidebar to "
            "caption photos.")
    st.stop()
try:
    catalog = loaders.catalog(choice.data_dir)
except DataError as err:
    st.error(f"The data folder cannot be searched: {err}")
    st.stop()
products = catalog.products
try:
    held_out = loaders.held_out_ids(run, products)
    train_ids = loaders.training_ids(run, products)
except RunError as err:  # no split: search everything, pick from everything
    st.warning(f"{err}. Searching the whole data folder; gallery products may have been seen in training.")
    held_out, train_ids = [], [int(i) for i in products.index]


def use_gallery(product_id: int) -> None:
    st.session_state["demo_input"] = ("gallery", product_id)


def use_upload() -> None:
    st.session_state["demo_input"] = ("upload", None)


def shuffle() -> None:
    st.session_state["demo_gallery_seed"] = random.randrange(1_000_000)


if "demo_gallery_seed" not in st.session_state:
    st.session_state["demo_gallery_seed"] = 0
if "demo_input" not in st.session_state:
    st.session_state["demo_input"] = ("gallery", (held_out or list(products.index))[0])

# ---------------------------------------------------------------- input

left, right = st.columns([5, 4], gap="medium")
with left:
    upload = st.file_uploader("Upload a product photo", type=["jpg", "jpeg", "png", "webp"], key="demo_upload",
                              on_change=use_upload)
    with st.container(horizontal=True, vertical_alignment="center", gap="small"):
        st.markdown("**…or pick a held-out product** (never seen in training)" if held_out
                    else "**…or pick a catalog product**", width="content")
        st.button("Others", key="demo_shuffle", on_click=shuffle, icon=":material/shuffle:", type="tertiary",
                  help="Show other products")
    pool = held_out or [int(i) for i in products.index]
    gallery = random.Random(st.session_state["demo_gallery_seed"]).sample(pool, min(GALLERY_SIZE, len(pool)))
    with st.container(horizontal=True, gap="xsmall", vertical_alignment="bottom"):
        for pid in gallery:
            with st.container(width=72, gap="xxsmall"):
                data = loaders.thumb(str(catalog.image_path(pid)), 120)
                if data:
                    st.image(data, width=72)
                st.button("Use", key=f"demo_pick_{pid}", on_click=use_gallery, args=(pid,), width="stretch",
                          help=products.loc[pid, "productDisplayName"])

kind, picked = st.session_state["demo_input"]
image_bytes, label, query_attrs = None, "", None
if kind == "upload" and upload is not None:
    image_bytes, label = upload.getvalue(), upload.name
elif kind == "gallery" and picked in products.index:
    label, query_attrs = products.loc[picked, "productDisplayName"], products.loc[picked]
    try:
        image_bytes = catalog.image_path(picked).read_bytes()
    except OSError as err:
        image_bytes = b""  # decode_upload turns this into a clear message below
        st.warning(f"The image of product {picked} cannot be read ({err.strerror}).")

with right:
    if image_bytes is None:
        st.info("Upload a photo (JPEG, PNG or WebP) or pick a product on the left.")
        st.stop()
    try:
        image = loaders.decode_upload(image_bytes)
    except ImageError as err:
        st.error(f"This file cannot be used: {err}. Try another photo.")
        st.stop()
    try:
        model = loaders.captioner(run)
    except CheckpointError as err:
        st.error(f"The captioner of {run.name} cannot be loaded: {err}")
        st.stop()
    digest = hashlib.sha256(image_bytes).hexdigest()
    key = (str(run.path), loaders.model_stamp(run), digest)
    done = st.session_state.setdefault("demo_captions", {})  # this session's photos: "(earlier, same photo)"
    cached = key in done
    if not cached:
        with st.spinner("Captioning..."):
            done[key] = loaders.photo_caption(run, digest, image)  # computed once for all sessions
    greedy, embedding, caption_ms = done[key]
    caption, reranked_note = greedy, None
    can_rerank = getattr(model, "can_rerank", False)  # an imported notebook's captioner cannot score candidates
    if can_rerank and st.session_state.get("demo_rerank", True):
        try:
            with st.spinner("Reranking the caption against the catalog..."):
                best, rerank_ms = loaders.photo_rerank(run, digest, image, greedy, embedding, choice.data_dir,
                                                       train_ids, exclude=picked if kind == "gallery" else None)
        except (CheckpointError, ValueError) as err:
            st.warning(f"The caption cannot be reranked ({err}); searching with the model's caption.")
            best = None
        if best is not None:
            caption = best.text
            origin = ("the model's own caption" if best.text == greedy else "one of the model's beam hypotheses"
                      if best.generated else "the name of a visually similar catalog product")
            reranked_note = f"reranked in {rerank_ms:.0f} ms: {origin}"
    with st.container(horizontal=True, gap="small", vertical_alignment="center"):
        st.image(square(image, 160), width=160)  # padded square: a tall photo does not push the results down
        with st.container():
            st.caption("Your photo" if kind == "upload" else "Held-out product" if picked in held_out
                       else "Catalog product")
            st.markdown(f"**{md(label)}**")
            st.markdown(f"Caption: **{md(greedy) or '(empty)'}**")
            if reranked_note:
                st.markdown(f"Reranked: **{md(caption) or '(empty)'}**")
            st.caption(f"captioned in {caption_ms:.0f} ms" + (" (earlier, same photo)" if cached else "")
                       + f" · {image.width}×{image.height} px" + (f" · {reranked_note}" if reranked_note else ""))
            if can_rerank:
                st.toggle("Rerank with the catalog", value=True, key="demo_rerank",
                          help="Search with the best of the model's captions (greedy and beam) and the names of "
                               "the 10 most similar catalog images, scored as in the evaluation "
                               "(ris_core/rerank.py). Caption quality shows what it does on held-out products.")

# ---------------------------------------------------------------- search

st.divider()
options = st.columns([5, 4, 3, 2], vertical_alignment="bottom")
names = options[0].multiselect("Strategies", list(STRATEGIES), default=["last_two_words", "full_caption"],
                               key="demo_strategies", max_selections=3,
                               help="\n\n".join(f"**{n}**: {text}" for n, text in STRATEGY_DESCRIPTIONS.items()))
backend = options[1].radio("Search with", list(BACKENDS), format_func=BACKENDS.get, key="demo_backend",
                           horizontal=True)
visual = options[2].toggle("Visual baseline", value=True, key="demo_visual",
                           help="Nearest catalog images by the encoder's features: classic reverse image search.")
k = options[3].select_slider("Results", [4, 6, 8, 12], value=6, key="demo_k")
with st.columns([1, 2])[0]:
    refine_on, threshold = refine_controls(toggle_key="demo_refine", threshold_key="demo_refine_threshold")

index = loaders.catalog_index(choice.data_dir, train_ids)
responses, offline = {}, None
down = st.session_state.get("demo_web_down")  # (when, why): don't wait on an unreachable web for every rerun
if backend == "duckduckgo" and down and time.monotonic() - down[0] < WEB_RETRY_SECONDS:
    offline = down[1]
for name in names:
    query = STRATEGIES[name](caption)
    if backend == "duckduckgo" and offline is None:
        try:
            web = loaders.duckduckgo()
        except (OSError, sqlite3.Error) as err:  # its result cache could not be opened
            web = None
            offline = f"its result cache cannot be opened: {err}"
        response = search_safely(web, query, k) if web is not None else None
        if response is not None and response.ok:
            responses[name] = response
            continue
        offline = offline or response.error
    responses[name] = index.search(query, k=k)
if offline:
    if backend == "duckduckgo" and not (down and down[1] == offline):
        st.session_state["demo_web_down"] = (time.monotonic(), offline)
    st.warning(f"DuckDuckGo is not available ({offline}); showing local catalog results instead.")



def show_refined(results: list, attrs) -> None:
    """Below a column's results: the same results re-ranked by agreement with the photo (paper §IV-B)."""
    if not refine_on or not results:
        return
    with st.spinner("Captioning the results for refinement..."):
        outcome, ms = loaders.refine_results(run, caption, embedding, results, threshold)
    refined_grid(outcome, ms, products, attrs, DEMO_LEVEL if attrs is not None else None, thumb_px)


n_columns = len(names) + (1 if visual else 0) or 1
thumb_px = 120 if n_columns <= 2 else 100  # two thumbnails per row even with three columns at 1280 px
columns = st.columns(n_columns, border=True)
for column, name in zip(columns, names, strict=False):
    response = responses[name]
    with column:
        source = "cached web results" if response.from_cache else BACKENDS.get(response.backend, response.backend)
        st.markdown(f"**{name}** · {source}")
        st.code(response.query or "(empty query)", language=None, wrap_lines=True)
        attrs = query_attrs if response.backend == "catalog" else None
        if refine_on:
            st.markdown("**Before refinement**")
        result_grid(response.results, products, attrs, DEMO_LEVEL if attrs is not None else None, thumb_px,
                    query=response.query)
        st.caption(f"search: {response.seconds * 1000:.1f} ms" + (" · cached" if response.from_cache else ""))
        show_refined(response.results, attrs)
if visual:
    with columns[-1]:
        st.markdown("**image kNN** · visual baseline")
        try:
            knn = loaders.knn_index(run, choice.data_dir, train_ids)
            exclude = picked if kind == "gallery" else None
            response = knn.search_vector(embedding, k=k, exclude_id=exclude)
        except (CheckpointError, ValueError) as err:
            st.error(f"The visual baseline is unavailable: {err}")
        else:
            st.code("(the image itself)", language=None, wrap_lines=True)
            if refine_on:
                st.markdown("**Before refinement**")
            result_grid(response.results, products, query_attrs, DEMO_LEVEL if query_attrs is not None else None,
                        thumb_px)
            st.caption(f"search: {response.seconds * 1000:.1f} ms over {len(knn):,} images")
            show_refined(response.results, query_attrs)
if not names and not visual:
    with columns[0]:
        st.info("Choose a strategy or turn on the visual baseline to see results.")
if query_attrs is not None:
    st.caption("✓ marks results of the same article type as the picked product.")
