"""Query strategies: one held-out product's caption turned into each strategy's query, the catalog's answers
side by side with relevance marks (optionally refined, paper §IV-B), then every strategy's P@k / MRR / nDCG over
all held-out products."""

import random

import pandas as pd
import streamlit as st

from ris_app import loaders
from ris_app.charts import METRIC_LABELS, export, precision_curve_figure, strategy_figure
from ris_app.guards import require_run
from ris_app.share import Param, flag, link, publish, restore
from ris_app.sidebar import sidebar
from ris_app.widgets import csv_download, md, refine_controls, refined_grid, result_grid, say, show_image
from ris_core.errors import CheckpointError, DataError, ImageError, RunError
from ris_core.metrics import RELEVANCE_DESCRIPTIONS, RELEVANCE_LEVELS
from ris_core.strategies import STRATEGIES, STRATEGY_DESCRIPTIONS

DEFAULT_STRATEGIES = ["last_two_words", "full_caption"]
METRICS = list(METRIC_LABELS)
HELP_STRATEGIES = "\n\n".join(f"**{name}**: {text}" for name, text in STRATEGY_DESCRIPTIONS.items())

choice = sidebar()
st.title("Query strategies")
st.caption("A caption becomes a text query (the paper sends its last two words); the catalog of the run's "
           "training products answers. A result is relevant when it shares the query product's attributes.")
run = require_run(choice)
SHARED = [Param("strategies_names", "strategies", many=True), Param("strategies_level", "level"),
          Param("strategies_product", "product", parse=int), Param("strategies_subset", "products"),
          Param("strategies_refine", "refine", parse=flag)]
restore("query_strategies", SHARED)
if "strategies_names" not in st.session_state:
    st.session_state["strategies_names"] = DEFAULT_STRATEGIES
st.session_state["strategies_names"] = [n for n in st.session_state["strategies_names"] if n in STRATEGIES][:3]
if st.session_state.get("strategies_level") not in RELEVANCE_LEVELS:
    st.session_state.pop("strategies_level", None)
if st.session_state.get("strategies_subset") not in ("all", "seen", "novel"):
    st.session_state["strategies_subset"] = "all"

evaluation = loaders.evaluation(run)
for problem in evaluation.problems:
    st.warning(problem)
picker_box = st.container()  # filled by one_product(): the product picker sits above the card and controls
card, panel = st.columns([3, 2], gap="medium")
with panel:
    names = st.multiselect("Strategies", list(STRATEGIES), key="strategies_names",
                           max_selections=3, help=HELP_STRATEGIES)
    level = st.radio("Relevant means", list(RELEVANCE_LEVELS), key="strategies_level", horizontal=True,
                     help="\n\n".join(f"**{name}**: {text}" for name, text in RELEVANCE_DESCRIPTIONS.items()))
    st.caption(RELEVANCE_DESCRIPTIONS[level])
    k = st.select_slider("Results per query", [5, 10, 20], value=10, key="strategies_k")
    refine_on, threshold = refine_controls(toggle_key="strategies_refine", threshold_key="strategies_refine_threshold")

# ---------------------------------------------------------------- one product


def pick_random(options: list[int]) -> None:
    st.session_state["strategies_product"] = random.choice(options)


def one_product() -> None:
    try:
        catalog = loaders.catalog(choice.data_dir)
        products = catalog.products
        held_out = loaders.held_out_ids(run, products)
        train_ids = loaders.training_ids(run, products)
    except (DataError, RunError) as err:
        picker_box.error(say(err))
        return
    generated, reranked = {}, {}
    if evaluation.captions is not None:
        generated = dict(zip(evaluation.captions["id"].astype(int), evaluation.captions["generated"], strict=True))
        if "reranked" in evaluation.captions:
            reranked = dict(zip(evaluation.captions["id"].astype(int), evaluation.captions["reranked"], strict=True))
        options = [i for i in generated if i in products.index]
    else:
        options = held_out
    if not options:
        picker_box.warning(f"None of {md(run.name)}'s held-out products are in the data folder. Set the data folder "
                   "(sidebar → Folders) to the folder the run was trained on, or to the demo catalog.")
        return
    if st.session_state.get("strategies_product") not in options:
        st.session_state["strategies_product"] = options[0]
    left, right = picker_box.columns([4, 1], vertical_alignment="bottom")
    names_of = products["productDisplayName"]
    product_id = left.selectbox("Held-out product", options, key="strategies_product",
                                format_func=lambda i: f"{i} · {names_of.get(i, '')}")
    right.button("Random product", key="strategies_random", on_click=pick_random, args=(options,),
                 icon=":material/casino:", width="stretch")
    query = products.loc[product_id]
    image_path = catalog.image_path(product_id)
    if product_id in generated:
        caption = generated[product_id]
    else:

        try:
            with card, st.spinner("Captioning this product..."):
                caption = loaders.caption_product(run, image_path)
        except (CheckpointError, ImageError) as err:
            card.error(f"Cannot caption this product: {say(err)}")
            return

    with card, st.container(horizontal=True, gap="medium", vertical_alignment="center"):
        show_image(str(image_path), width=160)
        with st.container():
            st.markdown(f"**Reference (product name):** {md(query['productDisplayName'])}")
            st.markdown(f"**Generated caption:** {md(caption) or '*(empty caption)*'}")
            if product_id in reranked and reranked[product_id] != caption:
                st.markdown(f"**Reranked caption:** {md(reranked[product_id])} *(the best of the model's "
                            "captions and the nearest training names; its rows are in the table below)*")
            attrs = " · ".join(md(query[a]) for a in ("articleType", "baseColour", "gender"))
            st.caption(f"{attrs} · {len(train_ids):,} "
                       "training products searchable")
    if not names:
        st.info("Choose at least one strategy above.")
        return
    features = query_features(image_path, caption) if refine_on else None
    index = loaders.catalog_index(choice.data_dir, train_ids)
    columns = st.columns(len(names), border=True)
    for column, name in zip(columns, names, strict=True):
        with column:
            text = STRATEGIES[name](caption)
            st.markdown(f"**{name}**")
            st.caption(STRATEGY_DESCRIPTIONS.get(name, ""))
            st.code(text or "(empty query)", language=None, wrap_lines=True)
            response = index.search(text, k=k)
            if features is not None:
                st.markdown("**Before refinement**")
            hits = result_grid(response.results, products, query, level, width=110, query=text)
            if response.results:
                st.caption(f"{hits} of {k} relevant ({level}) · {response.seconds * 1000:.1f} ms")
            if features is not None and response.results:
                with st.spinner("Captioning the results for refinement..."):
                    outcome, ms = loaders.refine_results(run, *features, response.results, threshold)
                refined_grid(outcome, ms, products, query, level, width=110)


def query_features(image_path, caption: str):
    """The held-out image's live (caption, embedding) for refinement, or None with a message in the card."""
    try:
        with card, st.spinner("Captioning this product for refinement..."):
            live_caption, embedding = loaders.query_features(run, image_path)
    except (CheckpointError, ImageError) as err:
        card.warning(f"Refinement is unavailable: {say(err)}")
        return None
    if live_caption != caption:
        card.caption(f"Refinement compares with the live caption “{md(live_caption) or '(empty)'}” and its "
                     "image embedding.")
    return live_caption, embedding


one_product()
link(publish(SHARED, {"run": run.name}), "query_strategies")

# ---------------------------------------------------------------- all held-out products

st.divider()
st.subheader("All held-out products")
summary = evaluation.retrieval_summary
if not summary or not summary.get("rows"):
    st.info(f"**{md(run.name)}** has no retrieval evaluation yet: compute it on the Caption quality page "
            "(“Evaluate this run now”) or with `python -m training.evaluate --run <run>`.")
    st.stop()

has_subsets = any(isinstance(r, dict) and "subset" in r for r in summary["rows"])
products_shown = st.segmented_control(
    "Products", ["all", "seen", "novel"], key="strategies_subset", disabled=not has_subsets,
    help="seen: the held-out product's exact name is also a training product's; novel: it is not "
         "(re-run an older evaluation to get the breakdown)") or "all"
rows = pd.DataFrame([r for r in summary["rows"] if isinstance(r, dict) and r.get("level") == level
                     and r.get("subset", "all") == products_shown])
needed = {"strategy", "source", *METRICS, *(f"{m}_ci" for m in METRICS)}
if rows.empty or not needed <= set(rows.columns):
    st.warning("retrieval.json lacks the expected rows or columns for this level; re-run the evaluation.")
    st.stop()
n_queries, size = summary.get("n_queries", "?"), summary.get("catalog_size")
st.caption(f"{n_queries} queries against {size if size is None else f'{size:,}'} catalog products, top "
           f"{summary.get('k', 10)} judged at {level} ({RELEVANCE_DESCRIPTIONS[level].lower().rstrip('.')}). "
           "Bars: means; whiskers: 95% bootstrap intervals. Hatched: oracle (the true product name used as caption, "
           "an upper bound); grey: visual baselines (image kNN on the captioner encoder's features, and a "
           "contrastive image-text model trained on the training names: image-to-image and image-to-name); "
           "red: hybrids (a caption strategy's text results fused with a visual baseline's neighbours).")
st.plotly_chart(strategy_figure(rows, METRICS), key="strategies_chart",
                config=export(run.name, "strategies", level, products_shown))

st.markdown("**Precision at every cut-off**")
curve_options = rows["strategy"].tolist()
best_first = rows.sort_values("p_at_10", ascending=False)["strategy"].tolist()
curve_default = list(dict.fromkeys([s for s in ("last_two_words", "full_caption") if s in curve_options]
                                   + best_first[:3]))
curve_strategies = st.multiselect("Strategies on the curve", curve_options, default=curve_default,
                                  key="strategies_curves", placeholder="Choose strategies")
evaluated = loaders.evaluation(run)
if not curve_strategies:
    st.caption("Choose strategies above to see their P@k curves.")
elif evaluated.retrieval is None or "hits" not in evaluated.retrieval:
    st.info("retrieval.csv has no per-query results (hits); re-run the evaluation to see P@k curves.")
else:
    try:
        curves = loaders.precision_curves(run, choice.data_dir, level, products_shown, tuple(curve_strategies))
    except (DataError, RunError) as err:  # the curves judge relevance against the catalog's labels
        st.error(say(err))
        st.stop()
    left, right = st.columns([3, 2])
    left.plotly_chart(precision_curve_figure(curves), key="strategies_pk_chart",
                      config=export(run.name, "precision-at-k", level, products_shown))
    beside = rows[rows["strategy"].isin(curve_strategies)][["strategy", "mrr", "mrr_ci", "ndcg_at_10",
                                                             "ndcg_at_10_ci"]]
    right.dataframe(pd.DataFrame({
        "strategy": beside["strategy"], "MRR": beside["mrr"],
        "MRR 95% CI": [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in beside["mrr_ci"]],
        "nDCG@10": beside["ndcg_at_10"],
        "nDCG 95% CI": [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in beside["ndcg_at_10_ci"]]}),
        hide_index=True, key="strategies_rank_table",
        column_config={c: st.column_config.NumberColumn(format="%.3f") for c in ("MRR", "nDCG@10")})
    right.caption(f"Bands: 95% bootstrap intervals over the same queries, at {level}. The curve at k = 1, 5, 10 is "
                  "the table's P@1, P@5, P@10, recomputed from each query's stored top 10.")
    csv_download("Download the curves (CSV)", curves, f"{run.name}-precision-at-k-{level}-{products_shown}.csv",
                 key="strategies_pk_download", container=right)

table = rows[["strategy", "source", "n", *METRICS, "zero_hit"]].rename(columns=METRIC_LABELS)
st.dataframe(table, hide_index=True, key="strategies_table",
             column_config={c: st.column_config.NumberColumn(format="%.3f")
                            for c in [*METRIC_LABELS.values(), "zero_hit"]})


def refine_sentence(pair: dict) -> str:
    """Whether refinement changed P@10 at R1 for one `<strategy>+refine` paired entry, in words."""
    base, n = pair.get("b") or str(pair["a"]).removesuffix("+refine"), pair.get("n", "?")
    cell = pair.get("R1_p_at_10") or {}
    diff, (low, high) = cell.get("diff"), (cell.get("ci") or [None, None])
    if diff is None or low is None or high is None:
        return f"{base}: P@10 (R1) difference not available"
    if low == high == 0 and diff == 0:
        verdict = "unchanged on every query" + (  # without a threshold refinement only re-orders the top k
            " (re-ordering the same top 10 cannot change P@10; P@1, MRR and nDCG can)"
            if isinstance(summary.get("k", 10), int) and summary.get("k", 10) <= 10 else "")
    else:
        verdict = ("refinement raised it" if low > 0 else "refinement lowered it" if high < 0
                   else "no clear change (the interval includes 0)")
    return (f"{base}: P@10 (R1) refined − unrefined = {diff:+.3f}, 95% CI [{low:+.3f}, {high:+.3f}] on {n} "
            f"queries — {verdict}")


refined_pairs = [p for p in summary.get("paired", []) if isinstance(p, dict)
                 and str(p.get("a", "")).endswith("+refine")]
if refined_pairs or (rows["source"] == "refine").any():
    st.markdown("**Result refinement (paper §IV-B) against the same strategy unrefined**")
    st.caption("Green rows (`+refine`): each strategy's results re-ranked by their agreement with the query image, "
               "on a seeded subset of the held-out products (column n).")
    if refined_pairs:
        st.markdown("\n".join(f"- {refine_sentence(p)}" for p in refined_pairs))
    else:
        st.info("retrieval.json has +refine rows but no paired comparison with the unrefined strategies; "
                "re-run the evaluation.")

pair = next((p for p in summary.get("paired", []) if isinstance(p, dict)
             and p.get("a") == "last_two_words" and p.get("b") == "full_caption"), None)
st.markdown("**The paper's query against the whole caption**")
if pair is None:
    st.info("retrieval.json has no paired comparison of last_two_words and full_caption.")
else:
    def sentence(metric: str) -> str:
        cell = pair.get(f"{level}_{metric}") or {}
        diff, (low, high) = cell.get("diff"), (cell.get("ci") or [None, None])
        if diff is None or low is None or high is None:
            return f"{METRIC_LABELS[metric]}: not available"
        verdict = ("last_two_words is better" if low > 0 else "full_caption is better" if high < 0
                   else "no clear difference (the interval includes 0)")
        return (f"{METRIC_LABELS[metric]}: last_two_words − full_caption = {diff:+.3f}, "
                f"95% CI [{low:+.3f}, {high:+.3f}] — {verdict}")

    st.markdown(f"On the same {pair.get('n', '?')} held-out products, at {level}:\n\n"
                + "\n".join(f"- {sentence(m)}" for m in ("p_at_10", "mrr", "ndcg_at_10")))
