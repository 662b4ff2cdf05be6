"""Search demo: a product photo in, its caption, each strategy's query and the results out, with timings;
optionally the results refined by their agreement with the photo (paper §IV-B), before and after.

Laid out as Streamlit's demo-self-driving is: `input_panel` returns the chosen photo, `caption_panel` the
caption to search with, `search_options` the user's choices, `results` draws the answers."""

import hashlib
import random
import time
from dataclasses import dataclass, replace

import pandas as pd
import streamlit as st

from ris_app import loaders
from ris_app.guards import require_run
from ris_app.share import link, publish
from ris_app.sidebar import sidebar
from ris_app.widgets import job_progress, md, refine_controls, refined_grid, result_grid, say
from ris_core.data import Catalog
from ris_core.errors import CheckpointError, DataError, ImageError, RunError
from ris_core.evaluation.baselines import DEPTH
from ris_core.hybrid import rrf
from ris_core.images import square
from ris_core.jobs import Busy
from ris_core.runs import Run
from ris_core.search.image_knn import IndexNotBuilt
from ris_core.search.web import WebFallback
from ris_core.strategies import STRATEGIES, STRATEGY_DESCRIPTIONS

GALLERY_SIZE = 5  # one row of thumbnails beside the photo at 1280 px
BACKENDS = {"catalog": "Local catalog", "duckduckgo": "DuckDuckGo (web)"}
DEMO_LEVEL = "R1"  # gallery products have known attributes: mark results of the same article type


@dataclass
class Photo:
    """The photo being searched for: its bytes, a label, and the catalog product it is (None for uploads)."""

    data: bytes
    label: str
    product_id: int | None = None
    attrs: pd.Series | None = None  # the product's attributes, to judge results by

    @property
    def uploaded(self) -> bool:
        return self.product_id is None


@dataclass
class Caption:
    greedy: str
    text: str  # what the strategies search with: the reranked caption when reranking is on
    embedding: object
    note: str  # timings and where the caption came from


@dataclass
class Options:
    strategies: list[str]
    backend: str
    visual: bool
    k: int
    refine: bool
    threshold: float | None
    hybrid: bool = False


def use_gallery(product_id: int) -> None:
    st.session_state["demo_input"] = ("gallery", product_id)


def use_upload() -> None:
    st.session_state["demo_input"] = ("upload", None)


def shuffle() -> None:
    st.session_state["demo_gallery_seed"] = random.randrange(1_000_000)


def input_panel(catalog: Catalog, held_out: list[int]) -> Photo | None:
    """The upload field and a gallery of held-out products; returns the chosen photo (None: nothing yet)."""
    products = catalog.products
    st.session_state.setdefault("demo_gallery_seed", 0)
    if "demo_input" not in st.session_state:  # a shared link names its product: /search_demo?product=1163
        linked = st.query_params.get("product", "")
        default = (held_out or list(products.index))[0]
        st.session_state["demo_input"] = ("gallery", int(linked) if linked.isdigit() and int(linked) in products.index
                                          else default)
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
                          help=md(products.loc[pid, "productDisplayName"]))
    kind, picked = st.session_state["demo_input"]
    if kind == "upload" and upload is not None:
        return Photo(upload.getvalue(), upload.name)
    if kind == "gallery" and picked in products.index:
        try:
            data = catalog.image_path(picked).read_bytes()
        except OSError as err:
            data = b""  # decode_upload turns this into a clear message
            st.warning(f"The image of product {picked} cannot be read ({err.strerror}).")
        return Photo(data, products.loc[picked, "productDisplayName"], int(picked), products.loc[picked])
    return None


def visual_index(run: Run, data_dir, train_ids: list[int], limit: int | None):
    """The catalog's image-kNN index, or None while a background job embeds it (started here when needed)."""
    try:
        return loaders.knn_index(run, data_dir, train_ids)
    except IndexNotBuilt:
        pass
    key = knn_job(run, data_dir)
    if loaders.jobs().status(key).running:
        return None
    if limit and len(train_ids) > limit:
        raise ValueError(f"the catalog has {len(train_ids):,} products; this server embeds at most {limit:,} on "
                         "demand (its operator sets RIS_MAX_PRODUCTS); evaluate the run to build its index")
    try:
        loaders.jobs().start(key, lambda progress: loaders.build_knn_index(run, data_dir, train_ids, progress),
                             label="Embedding this catalog")
    except Busy:
        pass  # another visitor's job, or every slot busy: the progress bar says which
    return None


def knn_job(run: Run, data_dir) -> str:
    return f"embed:{run.path.resolve()}:{loaders.data_key(data_dir)[0]}"


def caption_panel(run: Run, photo: Photo, image, data_dir, train_ids: list[int], held_out: list[int],
                  limit: int | None) -> Caption:
    """Caption the photo (and rerank the caption against the catalog); shows both beside the photo."""
    digest = hashlib.sha256(photo.data).hexdigest()
    rerank_on = st.session_state.get("demo_rerank", True)
    shipped = loaders.shipped_photo(run, data_dir, train_ids, digest)  # by the photo's bytes, uploads included
    if shipped is not None:  # a gallery photo captioned ahead of time: no model needed for the first answer
        greedy, embedding, can_rerank = shipped.greedy, shipped.embedding, shipped.reranked is not None
        text = shipped.reranked if (rerank_on and can_rerank) else greedy
        origin = {"greedy": "the model's own caption", "beam": "one of the model's beam hypotheses",
                  "catalog name": "the name of a visually similar catalog product"}.get(shipped.reranked_origin, "")
        note = (f"captioned ahead of time for the demo · {image.width}×{image.height} px"
                + (f" · reranked ahead of time: {origin}" if rerank_on and can_rerank else ""))
        caption_block(photo, image, held_out, greedy, text if rerank_on and can_rerank else None, note, can_rerank)
        return Caption(greedy=greedy, text=text, embedding=embedding, note=note)
    try:
        model = loaders.captioner(run)
    except CheckpointError as err:
        st.error(f"The captioner of {md(run.name)} cannot be loaded: {say(err)}")
        st.stop()
    key = (str(run.path), loaders.model_stamp(run), digest)
    done = st.session_state.setdefault("demo_captions", {})  # this session's photos: "(earlier, same photo)"
    cached = key in done
    if not cached:
        with st.spinner("Captioning..."):
            done[key] = loaders.photo_caption(run, digest, image, data_dir, train_ids)  # once for all sessions
    greedy, embedding, caption_ms = done[key]
    text, reranked_note, best = greedy, None, None
    block = st.empty()  # the caption is shown as soon as it exists; the reranked one replaces it when ready
    if model.can_rerank and rerank_on:
        with block.container():  # no toggle yet: a widget may appear only once per script run
            caption_block(photo, image, held_out, greedy, None, f"captioned in {caption_ms:.0f} ms · reranking...",
                          can_rerank=False)
        try:
            if visual_index(run, data_dir, train_ids, limit) is None:
                reranked_note = "reranking waits for the catalog's image index (being built, see below)"
            else:
                with st.spinner("Reranking the caption against the catalog..."):
                    best, rerank_ms = loaders.photo_rerank(run, digest, image, greedy, embedding, data_dir,
                                                           train_ids, exclude=photo.product_id)
        except (CheckpointError, ValueError) as err:
            st.warning(f"The caption cannot be reranked ({say(err)}); searching with the model's caption.")
        if best is not None:
            text = best.text
            origin = ("the model's own caption" if best.text == greedy else "one of the model's beam hypotheses"
                      if best.generated else "the name of a visually similar catalog product")
            reranked_note = f"reranked in {rerank_ms:.0f} ms: {origin}"
    note = (f"captioned in {caption_ms:.0f} ms" + (" (earlier, same photo)" if cached else "")
            + f" · {image.width}×{image.height} px" + (f" · {reranked_note}" if reranked_note else ""))
    with block.container():
        caption_block(photo, image, held_out, greedy, text if best is not None else None, note, model.can_rerank)
    return Caption(greedy=greedy, text=text, embedding=embedding, note=note)


def caption_block(photo: Photo, image, held_out: list[int], greedy: str, reranked: str | None, note: str,
                  can_rerank: bool) -> None:
    """The photo beside its label, caption, reranked caption and the reranking toggle."""
    with st.container(horizontal=True, gap="small", vertical_alignment="center"):
        st.image(square(image, 160), width=160)  # padded square: a tall photo does not push the results down
        with st.container():
            st.caption("Your photo" if photo.uploaded else "Held-out product" if photo.product_id in held_out
                       else "Catalog product")
            st.markdown(f"**{md(photo.label)}**")
            st.markdown(f"Caption: **{md(greedy) or '(empty)'}**")
            if reranked is not None:
                st.markdown(f"Reranked: **{md(reranked) or '(empty)'}**")
            st.caption(note)
            if can_rerank:
                st.toggle("Rerank with the catalog", value=True, key="demo_rerank",
                          help="Search with the best of the model's captions (greedy and beam) and the names of "
                               "the 10 most similar catalog images, scored as in the evaluation "
                               "(ris_core/rerank.py). Caption quality shows what it does on held-out products.")


def search_options() -> Options:
    row = st.columns([5, 4, 3, 2], vertical_alignment="bottom")
    strategies = row[0].multiselect("Strategies", list(STRATEGIES), default=["last_two_words", "full_caption"],
                                    key="demo_strategies", max_selections=3,
                                    help="\n\n".join(f"**{n}**: {t}" for n, t in STRATEGY_DESCRIPTIONS.items()))
    backend = row[1].radio("Search with", list(BACKENDS), format_func=BACKENDS.get, key="demo_backend",
                           horizontal=True)
    visual = row[2].toggle("Visual baseline", value=True, key="demo_visual",
                           help="Nearest catalog images by the encoder's features: classic reverse image search.")
    k = row[3].select_slider("Results", [4, 6, 8, 12], value=6, key="demo_k")
    extra = st.columns([1, 2])
    with extra[0]:
        refine_on, threshold = refine_controls(toggle_key="demo_refine", threshold_key="demo_refine_threshold")
    hybrid = extra[1].toggle("Hybrid: caption + image", value=True, key="demo_hybrid",
                             help="The first strategy's catalog results fused with the photo's nearest catalog "
                                  "images by reciprocal-rank fusion (the top 100 of each; ris_core/hybrid.py), as "
                                  "the evaluation's rrf: rows are.")
    return Options(strategies, backend, visual, k, refine_on, threshold, hybrid)


def text_responses(options: Options, caption: Caption, data_dir, train_ids: list[int]) -> dict:
    """Each strategy's response: from DuckDuckGo when chosen and reachable, else from the local catalog."""
    index = loaders.catalog_index(data_dir, train_ids)
    queries = {name: STRATEGIES[name](caption.text) for name in options.strategies}
    if options.backend != "duckduckgo":
        return {name: index.search(query, k=options.k) for name, query in queries.items()}
    fallback = WebFallback(down=st.session_state.get("demo_web_down"))  # per session: its own retry window
    responses, offline = fallback.search(queries, options.k, index, loaders.duckduckgo)
    st.session_state["demo_web_down"] = fallback.down
    if offline:
        st.warning(f"DuckDuckGo is not available ({say(offline)}); showing local catalog results instead.")
    return responses


def results(run: Run, photo: Photo, caption: Caption, options: Options, products: pd.DataFrame, data_dir,
            train_ids: list[int], limit: int | None) -> None:
    """One bordered column per strategy (and the visual baseline), each optionally refined below."""
    responses = text_responses(options, caption, data_dir, train_ids)
    hybrid = options.hybrid and bool(options.strategies)
    n_columns = len(options.strategies) + (1 if options.visual else 0) + (1 if hybrid else 0) or 1
    thumb_px = 120 if n_columns <= 2 else 100  # two thumbnails per row even with three columns at 1280 px

    def judged(attrs) -> dict:
        return {"query_attrs": attrs, "level": DEMO_LEVEL if attrs is not None else None}

    def show_refined(found: list, attrs) -> None:
        if not options.refine or not found:
            return
        with st.spinner("Captioning the results for refinement..."):
            outcome, ms = loaders.refine_results(run, caption.text, caption.embedding, found, options.threshold)
        refined_grid(outcome, ms, products, width=thumb_px, **judged(attrs))

    columns = st.columns(n_columns, border=True)
    for column, name in zip(columns, options.strategies, strict=False):
        response = responses[name]
        with column:
            source = "cached web results" if response.from_cache else BACKENDS.get(response.backend, response.backend)
            st.markdown(f"**{name}** · {source}")
            st.code(response.query or "(empty query)", language=None, wrap_lines=True)
            attrs = photo.attrs if response.backend == "catalog" else None
            if options.refine:
                st.markdown("**Before refinement**")
            result_grid(response.results, products, width=thumb_px, query=response.query, **judged(attrs))
            st.caption(f"search: {response.seconds * 1000:.1f} ms" + (" · cached" if response.from_cache else ""))
            show_refined(response.results, attrs)
    if hybrid:
        with columns[len(options.strategies)]:
            hybrid_column(run, photo, caption, options, products, data_dir, train_ids, limit, thumb_px)
    if options.visual:
        with columns[-1]:
            st.markdown("**image kNN** · visual baseline")
            try:
                knn = visual_index(run, data_dir, train_ids, limit)
                if knn is None:
                    job_progress(knn_job(run, data_dir), "Embedding the catalog images (once per catalog)")
                    st.caption("The text results above do not wait for it.")
                    return
                response = knn.search_vector(caption.embedding, k=options.k, exclude_id=photo.product_id)
            except (CheckpointError, ValueError) as err:
                st.error(f"The visual baseline is unavailable: {say(err)}")
            else:
                st.code("(the image itself)", language=None, wrap_lines=True)
                if options.refine:
                    st.markdown("**Before refinement**")
                result_grid(response.results, products, width=thumb_px, **judged(photo.attrs))
                st.caption(f"search: {response.seconds * 1000:.1f} ms over {len(knn):,} images")
                show_refined(response.results, photo.attrs)
    if not options.strategies and not options.visual:
        with columns[0]:
            st.info("Choose a strategy or turn on the visual baseline to see results.")
    if photo.attrs is not None:
        st.caption("✓ marks results of the same article type as the picked product.")


def hybrid_column(run: Run, photo: Photo, caption: Caption, options: Options, products: pd.DataFrame, data_dir,
                  train_ids: list[int], limit: int | None, thumb_px: int) -> None:
    """The first strategy's catalog results and the photo's visual neighbours, fused by reciprocal rank."""
    name = options.strategies[0]
    st.markdown(f"**hybrid** · {name} + image")
    try:
        knn = visual_index(run, data_dir, train_ids, limit)
    except (CheckpointError, ValueError) as err:
        st.error(f"The hybrid needs the visual index: {say(err)}")
        return
    if knn is None:
        st.caption("Waits for the catalog's image index (see the visual baseline).")
        return
    started = time.perf_counter()
    query = STRATEGIES[name](caption.text)
    text = loaders.catalog_index(data_dir, train_ids).search(query, k=DEPTH).results
    visual = knn.search_vector(caption.embedding, k=DEPTH, exclude_id=photo.product_id).results
    by_id = {r.product_id: r for r in [*visual, *text]}
    fused = rrf([[r.product_id for r in text], [r.product_id for r in visual]], k=options.k)
    shown = [replace(by_id[pid], rank=rank) for rank, pid in enumerate(fused, start=1)]
    st.code(f"{query or '(empty query)'} + (the image)", language=None, wrap_lines=True)
    result_grid(shown, products, width=thumb_px, query=query or "image",
                query_attrs=photo.attrs, level=DEMO_LEVEL if photo.attrs is not None else None)
    st.caption(f"fused in {(time.perf_counter() - started) * 1000:.1f} ms (top {DEPTH} of each side)")


def main() -> None:
    choice = sidebar()
    st.title("Search demo")
    st.caption("Reverse image search through captioning: the model describes the photo, a strategy turns the "
               "description into a text query, and a search engine answers it.")
    run = require_run(choice, needs_checkpoint=True)
    try:
        catalog = loaders.catalog(choice.data_dir)
    except DataError as err:
        st.error(f"The data folder cannot be searched: {say(err)}")
        st.stop()
    products = catalog.products
    try:
        held_out = loaders.held_out_ids(run, products)
        train_ids = loaders.training_ids(run, products)
    except RunError as err:  # no split: search everything, pick from everything
        st.warning(f"{say(err)}. Searching the whole data folder; gallery products may have been seen in training.")
        held_out, train_ids = [], [int(i) for i in products.index]

    left, right = st.columns([5, 4], gap="medium")
    with left:
        photo = input_panel(catalog, held_out)
    with right:
        if photo is None:
            st.info("Upload a photo (JPEG, PNG or WebP) or pick a product on the left.")
            st.stop()
        try:
            image = loaders.decode_upload(photo.data)
        except ImageError as err:
            st.error(f"This file cannot be used: {say(err)}. Try another photo.")
            st.stop()
        limit = choice.access.max_products if choice.access else None
        caption = caption_panel(run, photo, image, choice.data_dir, train_ids, held_out, limit)
    st.divider()
    options = search_options()
    results(run, photo, caption, options, products, choice.data_dir, train_ids, limit)
    kind, picked = st.session_state["demo_input"]
    if kind == "gallery":  # an upload cannot be shared by a link
        link(publish([], {"run": run.name, "product": picked}), "search_demo")
    loaders.warm_captioner(run)  # after the first paint: an upload then needs no model load


main()
