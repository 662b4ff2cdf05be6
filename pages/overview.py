"""Overview: what the chosen run shows, in the numbers asked for first (perplexity beside the paper's, caption
quality beside a baseline, the paper's query claim tested), with the pages that hold the detail.

No charts here on purpose: it is the landing page, and plotly's JavaScript alone takes seconds to start."""

import streamlit as st

from ris_app import loaders
from ris_app.navigation import PAGES
from ris_app.sidebar import sidebar
from ris_app.widgets import md, say
from ris_core.evaluation.verdict import QUESTIONS
from ris_core.evaluation.verdict import cell as verdict_cell
from ris_core.evaluation.verdict import sentence as verdict_sentence
from ris_core.metrics import RELEVANCE_DESCRIPTIONS, RELEVANCE_LEVELS
from ris_core.runs import RunError


def reported_val_perplexity(runs) -> tuple[str, float] | None:
    """The paper's final validation perplexity, from the reported run among the available ones."""
    for run in runs:
        try:
            if run.reported_only and not run.has_checkpoint:
                history = loaders.history(run).dropna(subset=["val_perplexity"])
                if len(history):
                    return run.name, float(history["val_perplexity"].iloc[-1])
        except (RunError, KeyError):
            continue
    return None


def number(mapping: object, key: str) -> float | None:
    """mapping[key] when it is a number: the JSON files may come from another version or a hand edit."""
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def verdict(pair: dict, level: str) -> str:
    """One sentence on a paired P@10 difference: better, worse, or no significant difference (95% CI)."""
    cell = pair.get(f"{level}_p_at_10") or {}
    ci = cell.get("ci") if isinstance(cell, dict) else None
    if number(cell, "diff") is None or not isinstance(ci, list) or len(ci) != 2 \
            or not all(isinstance(v, int | float) for v in ci):
        return "not measured"
    low, high = ci
    word = "better" if low > 0 else "worse" if high < 0 else "no significant difference"
    return f"**{word}** {cell['diff']:+.3f} [{low:+.3f}, {high:+.3f}]"


def verdict_table(summary: dict) -> None:
    """The verdict: paired differences with 95% intervals for each question, all and novel products."""
    found = (summary.get("verdict") or {}) if isinstance(summary.get("verdict"), dict) else {}
    comparisons = [c for c in found.get("comparisons") or [] if isinstance(c, dict)]
    st.markdown("**The verdict**: paired differences (a − b) on the same held-out products, 95% bootstrap "
                "intervals; *novel* = products whose name no training product has.")
    if not comparisons:
        st.info("This evaluation predates the verdict rows (visual baselines, hybrids, seen/novel): re-run it to "
                "see them.")
        return
    level = st.radio("Relevance", list(RELEVANCE_LEVELS), horizontal=True, key="overview_level",
                     help="\n\n".join(f"**{k}**: {v}" for k, v in RELEVANCE_DESCRIPTIONS.items()))
    labels = {"p_at_1": "P@1", "mrr": "MRR", "ndcg_at_10": "nDCG@10", "p_at_10": "P@10"}
    lines = ["| question | a − b | products | " + " | ".join(labels.values()) + " |", "|---|---|---|"
             + "---|" * len(labels)]
    for c in comparisons:
        cells = []
        for metric in labels:
            value = c.get(f"{level}_{metric}") or {}
            word = verdict_cell(c, level, metric)
            ci = value.get("ci") or [float("nan")] * 2
            cells.append(f"**{word}** {value.get('diff', float('nan')):+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
                         if word else "–")
        lines.append(f"| {md(QUESTIONS.get(c.get('question'), c.get('question')))} | {md(c.get('a'))} − "
                     f"{md(c.get('b'))} | {md(c.get('subset'))} ({c.get('n', 0):,}) | " + " | ".join(cells) + " |")
    st.markdown("\n".join(lines))
    for question in dict.fromkeys(c.get("question") for c in comparisons):
        st.markdown(f"- **{md(QUESTIONS.get(question, question))}**: {md(verdict_sentence(comparisons, question))}.")
    best = found.get("best") or {}
    st.caption(f"Best = {md(found.get('chosen_by', ''))}: caption {md(best.get('caption'))}, visual "
               f"{md(best.get('visual'))}, hybrid {md(best.get('hybrid'))}.")


choice = sidebar()
st.title("Overview")
st.caption("RIS Eval measures reverse image search through image captioning: caption a product photo, turn the "
           "caption into a text query, search, and check whether the results are relevant. Below: the run chosen "
           "in the sidebar at a glance; the pages linked at the bottom hold the detail.")
run = choice.run
if run is None:
    st.info("No run to show: train one (`make reference`) or add a runs folder in the sidebar.")
else:
    try:
        info = run.info()
        reported = run.reported_only
    except RunError as err:
        st.error(say(err))
        info, reported = {}, False
    metrics, summary, problems = loaders.summaries(run) if info and not reported else (None, None, [])
    for problem in problems:
        st.warning(problem)
    model, baseline = (metrics or {}).get("model", {}), (metrics or {}).get("nn_caption_baseline", {})

    st.subheader(run.name)
    spec, data = info.get("model_spec") or {}, info.get("data") or {}
    if spec:
        encoder = md(spec.get("encoder"))
        st.caption(f"{info.get('epochs_done', '?')} epochs · encoder {encoder} at {spec.get('image_size')} "
                   f"px · decoder {spec.get('n_layer')}x{spec.get('n_embd')} · {data.get('train', 0):,} training "
                   f"and {data.get('val', 0):,} held-out products")
    paper = reported_val_perplexity(choice.available)
    cols = st.columns(4)
    best = number(info, "best_val_perplexity")
    if best is not None:
        cols[0].metric("Val perplexity (best epoch)", f"{best:.3f}", delta_color="inverse",
                       delta=f"{best - paper[1]:+.3f} vs {paper[0]}" if paper else None,
                       help="exp(mean cross-entropy per GPT-2 token) on the run's held-out split; lower is better.")
    if all(number(m, k) is not None for m in (model, baseline) for k in ("bleu_4", "last_two_match")):
        cols[1].metric("BLEU-4", f"{model['bleu_4']:.1f}", delta=f"{model['bleu_4'] - baseline['bleu_4']:+.1f} vs NN "
                       "caption", help="Corpus BLEU-4 (sacrebleu) against the product names. NN caption: the name "
                       "of the training product whose image embedding is nearest, a baseline with no captioner.")
        cols[2].metric("Last two words right", f"{model['last_two_match']:.1%}",
                       delta=f"{100 * (model['last_two_match'] - baseline['last_two_match']):+.1f} pts vs baseline",
                       help="The paper's query: share of captions whose last two words match the name's.")
    rows = [r for r in (summary or {}).get("rows") or [] if isinstance(r, dict) and r.get("level") == "R1"
            and r.get("subset", "all") == "all" and number(r, "p_at_10") is not None]
    captions_r1 = [r for r in rows if r.get("source") == "caption"]
    visual_rows = [r for r in rows if r.get("source") == "visual"]
    visual = max(visual_rows, key=lambda r: r["p_at_10"]) if visual_rows else None
    if captions_r1:
        top = max(captions_r1, key=lambda r: r["p_at_10"])
        cols[3].metric("Best query P@10", f"{top['p_at_10']:.3f}",
                       delta=f"{top['p_at_10'] - visual['p_at_10']:+.3f} vs visual" if visual else None,
                       help=f"The best caption strategy, {top['strategy']}, at level R1: "
                       f"{RELEVANCE_DESCRIPTIONS['R1']} Visual: the best visual baseline"
                       + (f", {visual['strategy']}." if visual else "."))
    novel = ((metrics or {}).get("subsets") or {}).get("novel") or {}
    if number(novel.get("model"), "bleu_4") is not None:
        seen = ((metrics or {}).get("subsets") or {}).get("seen") or {}
        st.caption(
            f"**Novel products** ({number(metrics, 'n_novel') or 0:,.0f} held out whose name no training product "
            f"has): greedy BLEU-4 **{novel['model']['bleu_4']:.1f}**, last two words right "
            f"{novel['model'].get('last_two_match', float('nan')):.1%}"
            + (f", reranked BLEU-4 {novel['reranked']['bleu_4']:.1f}" if number(novel.get("reranked"), "bleu_4")
               is not None else "")
            + f". Seen ({number(metrics, 'n_seen') or 0:,.0f}, named like a training product): greedy BLEU-4 "
            f"{(seen.get('model') or {}).get('bleu_4', float('nan')):.1f}. The figures above mix both.")

    if reported:
        st.info(f"**{md(run.name)}** holds numbers reported elsewhere (no held-out captions to score). Its curve is on "
                "the Training curves page.")
    elif info and metrics is None:
        st.info(f"**{md(run.name)}** has no evaluation yet: compute it on the Caption quality page (one button).")
    elif summary:
        pairs = {(p.get("a"), p.get("b")): p for p in summary.get("paired") or [] if isinstance(p, dict)}
        claim, visual_pair = pairs.get(("last_two_words", "full_caption")), pairs.get(("last_two_words",
                                                                                      "image_knn:encoder"))
        queries, catalog = number(summary, "n_queries") or 0, number(summary, "catalog_size") or 0
        st.markdown(f"**The paper's claim, measured** on {queries:,.0f} held-out products against "
                    f"{catalog:,.0f} catalog products: paired P@10 difference of the last-two-"
                    "words query (the paper's) with each alternative, 95% bootstrap interval.")
        lines = ["| relevant when the result has the same | vs the full caption | vs visual search (image kNN) |",
                 "|---|---|---|"]
        for level, attributes in RELEVANCE_LEVELS.items():
            lines.append(f"| {level}: {' + '.join(attributes)} | {verdict(claim or {}, level)} | "
                         f"{verdict(visual_pair or {}, level)} |")
        st.markdown("\n".join(lines))
        verdict_table(summary)

st.subheader("Explore")
for page in PAGES[1:]:
    st.page_link(page.path, label=f"**{page.title}**: {page.about}", icon=page.icon)
