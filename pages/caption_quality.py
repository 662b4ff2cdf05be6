"""Caption quality: corpus BLEU and match rates of a run beside the nearest-neighbour-caption baseline,
the sentence-BLEU histogram, a filterable table of held-out samples, and the best and worst captions."""

import math

import streamlit as st

from ris_app import loaders
from ris_app.charts import bleu_histogram, category_figure, export
from ris_app.guards import require_run
from ris_app.share import Param, link, publish, restore
from ris_app.sidebar import sidebar
from ris_app.widgets import csv_download, image_card, job_progress, md, say, short
from ris_core.errors import DataError, RisError
from ris_core.evaluation.categories import GROUPINGS
from ris_core.rerank import describe as describe_rerank
from ris_core.runs import Run

PAGE_SIZE = 25
METRICS = [  # (key in caption_metrics.json, or first_word_match from captions.csv below; label; scale to show)
    ("bleu_1", "BLEU-1", 1), ("bleu_2", "BLEU-2", 1), ("bleu_3", "BLEU-3", 1), ("bleu_4", "BLEU-4", 1),
    ("sentence_bleu_mean", "Sentence BLEU (mean)", 1), ("first_word_match", "First word (brand) matches", 100),
    ("last_two_match", "Last two words match", 100), ("last_word_match", "Last word matches", 100),
    ("exact_match", "Exact match", 100), ("cider_d", "CIDEr-D", 1), ("rouge_l", "ROUGE-L", 100),
    ("semantic", "Semantic similarity", 100),
]
CAPTION_COLUMNS = {"greedy": "generated", "reranked": "reranked", "baseline": "nn_caption"}  # in captions.csv
CATEGORY_METRICS = {"bleu_4": "BLEU-4", "last_two_match": "last two match", "p_at_10": "P@10 (R1)"}
SHARED = [Param("quality_decoding", "captions"), Param("quality_subset", "products"), Param("quality_by", "group"),
          Param("quality_sort_by", "sort"), Param("quality_min_size", "min_size", parse=int),
          Param("quality_master", "masters", many=True), Param("quality_article", "types", many=True),
          Param("quality_match", "last_two")]
SUBSET_HELP = ("all: every held-out product. seen: its exact name is also a training product's (recall is enough). "
               "novel: no training product has its name (the caption must be composed).")


def start_evaluation(run: Run, choice) -> None:
    """Evaluate the run as a background job (one per run, at most RIS_MAX_JOBS at once), after checking here
    that it can work: the checkpoint loads, held-out products are in the data folder, the catalog is within
    the operator's limit."""
    from ris_core.evaluation.pipeline import EvalConfig, evaluate_run  # torch: only when evaluating

    try:
        loaders.captioner(run)
        products = loaders.catalog(choice.data_dir).products
        held_out = loaders.held_out_ids(run, products)
        if not held_out:
            raise DataError("none of the run's held-out products are in this data folder: set the data folder "
                            "(sidebar → Folders) to the one the run was trained on")
        limit = choice.access.max_products if choice.access else None
        if limit and len(products) > limit:
            raise DataError(f"the data folder holds {len(products):,} products; this server evaluates at most "
                            f"{limit:,} (its operator sets RIS_MAX_PRODUCTS). Evaluate it with `python -m "
                            "training.evaluate` instead")
        loaders.jobs().start(evaluation_job(run), lambda progress: evaluate_run(
            run, choice.data_dir, EvalConfig(progress_bars=False), progress=progress),
            label=f"An evaluation of {run.name}")
    except RisError as err:
        st.error(f"Evaluation cannot start: {say(err)}")
        return
    st.rerun()


def show_samples(category: str) -> None:
    """Filter the samples table below to one article type (a worst-category button)."""
    st.session_state["quality_article"] = [category]
    st.session_state["quality_master"] = []


def evaluation_job(run: Run) -> str:
    return f"evaluate:{run.path.resolve()}"


def seed(key: str, allowed, default) -> None:
    """Set a widget's value before it is drawn (it then takes no default of its own): the link's value where this
    page offers it, otherwise the default; a list keeps only the values offered."""
    value = st.session_state.get(key, default)
    if isinstance(default, list):
        st.session_state[key] = [v for v in value if v in allowed] if isinstance(value, list) else default
    else:
        st.session_state[key] = value if value in allowed else default


choice = sidebar()
restore("caption_quality", SHARED)
seed("quality_decoding", ("greedy", "reranked"), "greedy")
seed("quality_subset", ("all", "seen", "novel"), "all")
seed("quality_by", GROUPINGS, "articleType")
seed("quality_sort_by", CATEGORY_METRICS, "bleu_4")
seed("quality_min_size", range(1, 101), 20)
seed("quality_match", ("all", "match", "no match"), "all")
st.title("Caption quality")
run = require_run(choice)

evaluation = loaders.evaluation(run)
for problem in evaluation.problems:
    st.warning(problem)
job = job_progress(evaluation_job(run), f"Evaluating {run.name}")
if job.state == "failed":
    st.error(f"The last evaluation of {md(run.name)} failed: {say(job.message)}")
if not evaluation.exists:
    st.info(f"**{md(run.name)}** has no caption evaluation yet. It captions the run's held-out products found in "
            f"the data folder ({md(choice.data_label)}), scores them against their names, and measures every query "
            "strategy on the catalog. It runs in the background (minutes for a few hundred products); everyone "
            "opening this page sees its progress.")
    if not run.has_checkpoint:
        st.warning("This run has no checkpoint (model/config.json), so it cannot be evaluated. Pick another run.")
    elif not job.running and st.button("Evaluate this run now", type="primary", key="quality_evaluate",
                                       icon=":material/play_arrow:"):
        start_evaluation(run, choice)
    st.stop()

captions, metrics = evaluation.captions, evaluation.caption_metrics
model, baseline = metrics.get("model", {}), metrics.get("nn_caption_baseline", {})
n_scored = metrics.get("n_scored", len(captions))
st.caption(f"{n_scored:,} held-out products scored ({metrics.get('n_skipped', 0)} unreadable images skipped), "
           f"captioned at {metrics.get('images_per_second', float('nan')):.0f} images/s. Deltas compare with the "
           "nearest-neighbour-caption baseline: the name of the most similar training image.")


def number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


reranked = metrics.get("reranked") or {}
decodings = {"greedy": model, **({"reranked": reranked} if number(reranked.get("bleu_4")) is not None else {})}
subsets = metrics.get("subsets") if isinstance(metrics.get("subsets"), dict) else {}
controls = st.columns([2, 3])
shown, products_shown = "greedy", "all"
if len(decodings) > 1:
    with controls[0]:
        shown = st.segmented_control("Captions", list(decodings), key="quality_decoding",
                                     help="greedy: the model's own caption. reranked: the best of its captions and "
                                          "the names of the nearest training images (see below).") or "greedy"
with controls[1]:
    if subsets:
        counts = {"all": n_scored, "seen": metrics.get("n_seen", "?"), "novel": metrics.get("n_novel", "?")}
        products_shown = st.segmented_control(
            "Products", ["all", "seen", "novel"], key="quality_subset", help=SUBSET_HELP,
            format_func=lambda s: f"{s} ({counts[s]:,})" if isinstance(counts[s], int) else s) or "all"
    else:
        st.caption("This evaluation predates the seen/novel breakdown: re-run it to see it.")
if products_shown != "all":
    part = subsets.get(products_shown) or {}
    decodings = {"greedy": part.get("model") or {}, **({"reranked": part.get("reranked") or {}}
                                                       if "reranked" in decodings else {})}
    baseline = part.get("nn_caption_baseline") or {}
# the first word, mostly the brand, from captions.csv: every evaluation shows it, those before it existed too
first_words = loaders.first_word_rates(run, products_shown, tuple(CAPTION_COLUMNS.values()))
decodings = {name: {**values, "first_word_match": first_words[CAPTION_COLUMNS[name]]}
             for name, values in decodings.items()}
baseline = {**baseline, "first_word_match": first_words[CAPTION_COLUMNS["baseline"]]}
cells = st.columns(4)
for i, (key, label, scale) in enumerate(METRICS):
    ours, theirs = number(decodings[shown].get(key)), number(baseline.get(key))
    unit, digits = ("%", 1) if scale == 100 else ("", 2 if key == "cider_d" else 1)
    cells[i % 4].metric(
        label, "–" if ours is None else f"{ours * scale:.{digits}f}{unit}",
        delta=None if ours is None or theirs is None else f"{(ours - theirs) * scale:+.{digits}f}{unit} vs NN caption",
        border=True, help=f"NN-caption baseline: {'–' if theirs is None else f'{theirs * scale:.{digits}f}{unit}'}"
        + (". CIDEr-D's document frequencies come from all held-out references." if key == "cider_d" else ""),
    )
if number(model.get("perplexity")) is not None and number(model.get("loss")) is not None:
    notebook = number(model.get("perplexity_notebook_definition"))
    st.caption(f"Held-out loss {model['loss']:.3f}, perplexity {model['perplexity']:.2f} per token, the first "
               "predicted from the start token" + (f"; {notebook:.2f} on the paper notebook's definition (the first "
               "token given, never predicted: its Table I's)" if notebook is not None else "") + ".")
if isinstance(metrics.get("brand_step_words"), int):
    st.caption(f"**Greedy after a brand step**: each greedy caption begins with the first word (mostly the brand) "
               f"that the run's brand step, over {metrics['brand_step_words']:,} words, and the decoder agree on; the "
               "decoder writes the rest (`training.train_brand_step`).")
if "reranked" in decodings and number(model.get("bleu_4")) is not None:
    st.caption(
        f"**Reranked** ({describe_rerank(reranked)}): BLEU-4 {reranked['bleu_4']:.1f} "
        f"({reranked['bleu_4'] - model['bleu_4']:+.1f} vs greedy), last two words match "
        f"{reranked['last_two_match']:.1%} ({(reranked['last_two_match'] - model['last_two_match']) * 100:+.1f} pts)."
    )

image_dir = choice.data_dir / "images"
left, right = st.columns(2, gap="medium")
with left:
    st.markdown("**Sentence BLEU of each held-out product**")
    if "sentence_bleu" in captions:
        st.plotly_chart(bleu_histogram(captions["sentence_bleu"]), key="quality_hist",
                        config=export(run.name, "sentence-bleu", shown))
    else:
        st.info("captions.csv has no sentence_bleu column; re-run the evaluation.")
with right:
    st.markdown("**By master category**")
    if {"masterCategory", "sentence_bleu", "last_two_match"} <= set(captions.columns):
        groups = captions.assign(last_two=captions["last_two_match"].astype(str).str.lower().eq("true"))
        by_master = groups.groupby("masterCategory").agg(
            products=("id", "size"), sentence_bleu=("sentence_bleu", "mean"), last_two_match=("last_two", "mean"),
        ).sort_values("products", ascending=False).reset_index()
        st.dataframe(by_master, hide_index=True, key="quality_by_master", column_config={
            "masterCategory": st.column_config.TextColumn("category"),
            "sentence_bleu": st.column_config.NumberColumn("BLEU (mean)", format="%.1f"),
            "last_two_match": st.column_config.ProgressColumn("last 2 match", format="percent", width="small"),
        })

ranked = captions.sort_values("sentence_bleu", ascending=False) if "sentence_bleu" in captions else captions
for title, rows in (("Best captions", ranked.head(4)), ("Worst captions", ranked.tail(4).iloc[::-1])):
    st.markdown(f"**{title}** (by sentence BLEU)")
    with st.container(horizontal=True, gap="small"):
        for _, row in rows.iterrows():
            image_card(str(image_dir / f"{int(row['id'])}.jpg"), [
                f"**BLEU {row.get('sentence_bleu', float('nan')):.0f}** · {short(row['reference'], 30)}",
                f"→ {short(row['generated'], 36) or '(empty caption)'}",
            ], width=128)

st.subheader("By category")
st.caption("Corpus BLEU-4 and last-two match of the shown captions per category, and P@10 (R1) of the best caption "
           "strategy's queries; bars sorted worst first. Small categories are noisy: set the minimum size.")
group_controls = st.columns([2, 2, 2])
by = group_controls[0].segmented_control("Group by", list(GROUPINGS), key="quality_by") \
    or "articleType"
sort_by = group_controls[1].segmented_control("Sort by", list(CATEGORY_METRICS), key="quality_sort_by",
                                              format_func=CATEGORY_METRICS.get) or "bleu_4"
min_size = group_controls[2].slider("At least this many products", 1, 100, key="quality_min_size")
column = "reranked" if shown == "reranked" else "generated"
try:
    categories = loaders.categories(run, by, column)
except KeyError as err:
    categories = None
    st.info(f"{md(err)}")
if categories is not None:
    big = categories[categories["products"] >= min_size]
    if sort_by not in big:
        st.caption("No P@10 per category: this evaluation has no per-query retrieval rows.")
        sort_by = "bleu_4"
    big = big.sort_values(sort_by, ascending=True)
    left, right = st.columns([3, 2])
    left.plotly_chart(category_figure(big, sort_by, CATEGORY_METRICS[sort_by], by), key="quality_category_chart",
                      config=export(run.name, "by", by, sort_by, column))
    with right:
        worst = big.head(3)["category"].tolist()
        if by == "articleType" and worst:
            st.markdown("**The worst, one click from their examples**")
            for category in worst:
                st.button(f"Show {category} samples", key=f"quality_worst_{category}", on_click=show_samples,
                          args=(category,), icon=":material/arrow_downward:")
        csv_download("Download per-category table (CSV)", categories, f"{run.name}-by-{by}-{column}.csv",
                     key="quality_category_download")
    if by == "articleType":
        confusions = loaders.article_confusions(run, choice.data_dir, column)
        if confusions is not None and not confusions.empty:
            st.markdown("**Which article the caption names instead** (its last word, read as the article type "
                        "most catalog names ending in that word have)")
            st.dataframe(confusions, hide_index=True, key="quality_confusions", column_config={
                "true": st.column_config.TextColumn("true articleType"),
                "named": st.column_config.TextColumn("the caption names"),
                "share of true type": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1)})

st.subheader("Samples")
filters = st.columns([2, 3, 2])
masters = sorted(captions["masterCategory"].dropna().unique()) if "masterCategory" in captions else []
seed("quality_master", masters, [])
chosen_masters = filters[0].multiselect("Master category", masters, key="quality_master", placeholder="All")
subset = captions[captions["masterCategory"].isin(chosen_masters)] if chosen_masters else captions
articles = sorted(subset["articleType"].dropna().unique()) if "articleType" in subset else []
seed("quality_article", articles, [])
chosen_articles = filters[1].multiselect("Article type", articles, key="quality_article", placeholder="All")
if chosen_articles:
    subset = subset[subset["articleType"].isin(chosen_articles)]
match = filters[2].radio("Last two words", ["all", "match", "no match"], key="quality_match", horizontal=True,
                         help="Does the caption end with the same two words as the product name (the paper's query)?")
if match != "all" and "last_two_match" in subset:
    wanted = match == "match"
    subset = subset[subset["last_two_match"].astype(str).str.lower().eq(str(wanted).lower())]

if products_shown != "all" and "seen" in subset:
    subset = subset[subset["seen"].astype(str).str.lower().eq(str(products_shown == "seen").lower())]
pages = max(1, math.ceil(len(subset) / PAGE_SIZE))
nav = st.columns([1, 4])
page = nav[0].number_input("Page", min_value=1, max_value=pages, value=1, step=1, key="quality_page")
nav[1].caption(f"{len(subset):,} of {len(captions):,} products match the filters · page {page} of {pages}")
view = subset.iloc[(page - 1) * PAGE_SIZE : page * PAGE_SIZE].copy()
view.insert(0, "image", [loaders.thumb_uri(image_dir / f"{int(i)}.jpg") for i in view["id"]])
columns = [c for c in ["image", "id", "reference", "generated", "reranked", "nn_caption", "sentence_bleu",
                       "cider_d", "semantic", "last_two_match", "seen",
                       "articleType", "baseColour", "gender"] if c in view]
st.dataframe(
    view[columns], hide_index=True, key="quality_table", row_height=64, height=38 + 64 * min(len(view), 8),
    column_config={
        "image": st.column_config.ImageColumn("image", width="small"),
        "id": st.column_config.NumberColumn("id", format="%d"),
        "reference": st.column_config.TextColumn("reference (product name)", width="medium"),
        "generated": st.column_config.TextColumn("generated caption", width="medium"),
        "reranked": st.column_config.TextColumn("reranked caption", width="medium"),
        "nn_caption": st.column_config.TextColumn("NN caption", width="medium"),
        "sentence_bleu": st.column_config.ProgressColumn("BLEU", min_value=0, max_value=100, format="%.0f"),
        "last_two_match": st.column_config.CheckboxColumn("last 2 match"),
        "seen": st.column_config.CheckboxColumn("seen name", help=SUBSET_HELP),
        "cider_d": st.column_config.NumberColumn("CIDEr-D", format="%.2f"),
        "semantic": st.column_config.NumberColumn("semantic", format="%.2f"),
    },
)
if len(subset) == 0:
    st.info("No product matches these filters; clear one to see more.")
csv_download("Download captions CSV", captions, f"{run.name}-captions.csv", key="quality_download")
link(publish(SHARED, {"run": run.name}), "caption_quality")
