"""Print a run's headline tables as Markdown (the README's tables come from here).

    python -m training.report --run results/runs/reference-cpu
    python -m training.report --compare results/runs/reference-cpu results/runs/grouped-cpu   # the splits side by side
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ris_core.evaluation import files
from ris_core.rerank import describe as describe_rerank
from ris_core.runs import RESULTS_DIR, Run

PAPER = RESULTS_DIR / "paper-2024"


def _fmt(value: float, digits: int = 3) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def history_table(run: Run) -> str:
    history = run.history()
    paper = Run(PAPER).history().set_index("epoch") if PAPER.is_dir() else pd.DataFrame()
    best = int(history.loc[history["val_loss"].idxmin(), "epoch"])
    lines = ["| epoch | train loss | train ppl | val loss | val ppl | min | paper val loss | paper val ppl |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for _, row in history.iterrows():
        epoch = int(row["epoch"])
        reported = paper.loc[epoch] if epoch in paper.index else None
        lines.append(
            f"| {epoch}{' (best)' if epoch == best else ''} | {_fmt(row.train_loss)} | {_fmt(row.train_perplexity, 2)} "
            f"| {_fmt(row.val_loss, 4)} | {_fmt(row.val_perplexity)} | {row.seconds / 60:.1f} "
            f"| {_fmt(reported.val_loss) if reported is not None else ''} "
            f"| {_fmt(reported.val_perplexity, 2) if reported is not None else ''} |")
    return "\n".join(lines)


def _summaries(run: Run) -> tuple[dict, dict]:
    """caption_metrics.json and retrieval.json, checked by type and with old row names mapped."""
    metrics, summary, _ = files.read_summaries(run.eval_dir)
    return metrics or {}, summary or {}


def caption_table(run: Run) -> str:
    metrics = _summaries(run)[0]
    model, nn = metrics["model"], metrics["nn_caption_baseline"]
    rows = [("BLEU-1", "bleu_1", 1), ("BLEU-2", "bleu_2", 1), ("BLEU-3", "bleu_3", 1), ("BLEU-4", "bleu_4", 1),
            ("mean sentence BLEU", "sentence_bleu_mean", 1), ("last-two-words match", "last_two_match", 3),
            ("last-word match", "last_word_match", 3), ("exact match", "exact_match", 3)]
    rows += [row for row in (("CIDEr-D", "cider_d", 2), ("ROUGE-L", "rouge_l", 3),
                             ("semantic similarity (MiniLM cosine)", "semantic", 3)) if row[1] in model]
    columns = [("captioner (greedy)", model)]
    if "reranked" in metrics:  # the best of the model's captions and the k nearest training names
        columns.append((f"captioner, reranked (k={metrics['reranked']['k']})", metrics["reranked"]))
    notes = [f"Reranked: {describe_rerank(metrics['reranked'])}."] if "reranked" in metrics else []
    columns.append(("nearest-neighbour caption", nn))
    lines = [f"{metrics['n_scored']:,} held-out products scored ({metrics['n_skipped']} unreadable skipped), "
             f"greedy decoding, {metrics['images_per_second']:.0f} images/s; val perplexity "
             f"{model['perplexity']:.3f} (loss {model['loss']:.4f}).", "",
             "| metric | " + " | ".join(name for name, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {label} | " + " | ".join(_fmt(values.get(key), d) for _, values in columns) + " |"
              for label, key, d in rows]
    return "\n".join(lines + ([""] + notes if notes else []))


def subset_table(run: Run) -> str:
    """Caption metrics for all, seen and novel held-out products, side by side."""
    metrics = _summaries(run)[0]
    subsets = metrics.get("subsets") or {}
    if not subsets:
        return "no seen/novel breakdown (evaluated before it existed)"
    columns = {"all": metrics, "seen": subsets.get("seen") or {}, "novel": subsets.get("novel") or {}}
    counts = {"all": metrics.get("n_scored"), "seen": metrics.get("n_seen"), "novel": metrics.get("n_novel")}
    lines = ["| captions | metric | " + " | ".join(f"{k} ({counts[k]:,})" for k in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for decoding, label in (("model", "greedy"), ("reranked", "reranked"), ("nn_caption_baseline", "NN caption")):
        if decoding not in metrics:
            continue
        for key, name, digits in (("bleu_4", "BLEU-4", 1), ("cider_d", "CIDEr-D", 2), ("rouge_l", "ROUGE-L", 3),
                                  ("semantic", "semantic", 3), ("last_two_match", "last-two match", 3),
                                  ("exact_match", "exact match", 3)):
            cells = [_fmt((values.get(decoding) or {}).get(key), digits) for values in columns.values()]
            if any(cells):
                lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", f"CIDEr-D document frequencies: {metrics.get('cider_document_frequencies', '')}."])


def verdict_table(run: Run, level: str = "R1") -> str:
    """The paired comparisons behind the verdict, at one relevance level, for all and novel products."""
    from ris_core.evaluation.verdict import QUESTIONS, cell, sentence

    found = _summaries(run)[1].get("verdict") or {}
    comparisons = found.get("comparisons") or []
    if not comparisons:
        return "no verdict (evaluated before it existed)"
    labels = {"p_at_1": "P@1", "mrr": "MRR", "ndcg_at_10": "nDCG@10", "p_at_10": "P@10"}
    lines = [f"Level {level}; paired differences a − b on the same queries, 95% bootstrap intervals.", "",
             "| question | a − b | products | " + " | ".join(labels.values()) + " |",
             "|---|---|---|" + "---:|" * len(labels)]
    for c in comparisons:
        cells = []
        for metric in labels:
            value, word = c[f"{level}_{metric}"], cell(c, level, metric)
            cells.append(f"{value['diff']:+.3f} [{value['ci'][0]:+.3f}, {value['ci'][1]:+.3f}] {word}")
        lines.append(f"| {QUESTIONS[c['question']]} | {c['a']} − {c['b']} | {c['subset']} ({c['n']:,}) | "
                     + " | ".join(cells) + " |")
    lines.append("")
    questions = dict.fromkeys(c["question"] for c in comparisons)
    lines += [f"- {QUESTIONS[q]}: {sentence(comparisons, q)}." for q in questions]
    best = found.get("best") or {}
    lines.append(f"\nBest = {found.get('chosen_by')}: caption {best.get('caption')}, visual {best.get('visual')}, "
                 f"hybrid {best.get('hybrid')}.")
    return "\n".join(lines)


def retrieval_table(run: Run, level: str = "R1", subset: str = "all") -> str:
    summary = _summaries(run)[1]
    rows = [r for r in summary["rows"] if r["level"] == level and r.get("subset", "all") == subset]
    lines = [f"{summary['n_queries']:,} queries ({subset} held-out products: {rows[0]['n'] if rows else 0:,}) against "
             f"{summary['catalog_size']:,} training products, level {level}.",
             "", "| strategy | source | P@1 | P@10 [95% CI] | MRR | nDCG@10 | zero-hit |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["source"] != "caption", -r["p_at_10"])):
        low, high = r["p_at_10_ci"]
        lines.append(f"| {r['strategy']} | {r['source']} | {r['p_at_1']:.3f} | {r['p_at_10']:.3f} "
                     f"[{low:.3f}, {high:.3f}] | {r['mrr']:.3f} | {r['ndcg_at_10']:.3f} | {r['zero_hit']:.3f} |")
    for pair in summary["paired"] if subset == "all" else []:  # paired over all queries: the verdict has novel
        if pair["a"].endswith("+refine"):
            continue
        diff = pair[f"{level}_p_at_10"]
        lines.append(f"\nPaired P@10 ({level}) {pair['a']} − {pair['b']}: {diff['diff']:+.3f} "
                     f"[{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}] over {pair['n']:,} queries.")
    return "\n".join(lines)


def refinement_table(run: Run, level: str = "R1") -> str:
    """Paired (refined − unrefined) differences on the same queries, per strategy."""
    summary = _summaries(run)[1]
    pairs = [p for p in summary["paired"] if p["a"].endswith("+refine")]
    if not pairs:
        return "no refinement rows"
    metrics = [("p_at_1", "P@1"), ("mrr", "MRR"), ("ndcg_at_10", "nDCG@10"), ("p_at_10", "P@10")]
    lines = [f"Paired differences, refined − unrefined, level {level}, {pairs[0]['n']:,} seeded queries "
             "(95% bootstrap CI):", "", "| strategy | " + " | ".join(m[1] for m in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for pair in pairs:
        cells = [f"{pair[f'{level}_{key}']['diff']:+.3f} [{pair[f'{level}_{key}']['ci'][0]:+.3f}, "
                 f"{pair[f'{level}_{key}']['ci'][1]:+.3f}]" for key, _ in metrics]
        lines.append(f"| {pair['b']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _row(summary: dict, strategy: str | None, subset: str = "all", level: str = "R1") -> dict:
    return next((r for r in summary.get("rows", []) if r["strategy"] == strategy and r["subset"] == subset
                 and r["level"] == level), {})


def _generalisation(run: Run) -> dict[str, str]:
    """One run's column of `compare_table`."""
    metrics, summary = _summaries(run)
    best = (summary.get("verdict") or {}).get("best") or {}
    novel = (metrics.get("subsets") or {}).get("novel") or {}
    column = {
        "split": "by name" if run.info().get("args", {}).get("split_by") == "name" else "by product",
        "held out (novel)": f"{metrics.get('n_scored', 0):,} ({metrics.get('n_novel', 0):,})",
        "best val perplexity (training)": _fmt(run.history()["val_perplexity"].min()),
    }
    for decoding, name in (("model", "greedy"), ("reranked", "reranked")):
        for key, label, digits in (("bleu_4", "BLEU-4", 1), ("cider_d", "CIDEr-D", 2),
                                   ("last_two_match", "last-two match", 3)):
            everyone = _fmt((metrics.get(decoding) or {}).get(key), digits)
            unseen = _fmt((novel.get(decoding) or {}).get(key), digits)
            column[f"{label}, {name}: all / novel"] = f"{everyone} / {unseen}"
    for kind in ("caption", "visual", "hybrid"):
        column[f"best {kind} row (by P@10 R1)"] = best.get(kind, "")
        for key, label in (("p_at_10", "P@10"), ("mrr", "MRR")):
            column[f"{kind}: {label} R1, all / novel"] = (f"{_fmt(_row(summary, best.get(kind)).get(key))} / "
                                                          f"{_fmt(_row(summary, best.get(kind), 'novel').get(key))}")
    return column


def compare_table(runs: list[Run]) -> str:
    """The generalisation figures of several runs side by side (e.g. a random and a grouped split)."""
    columns = [_generalisation(run) for run in runs]
    lines = ["| | " + " | ".join(run.name for run in runs) + " |", "|---|" + "---:|" * len(runs)]
    lines += [f"| {label} | " + " | ".join(c.get(label, "") for c in columns) + " |" for label in columns[0]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--run", type=Path)
    target.add_argument("--compare", type=Path, nargs="+", help="runs to put side by side")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare_table([Run(path) for path in args.compare]))
        return
    run = Run(args.run)
    print("### Training history\n\n" + history_table(run))
    if (run.eval_dir / files.CAPTION_METRICS).is_file():
        print("\n### Caption quality\n\n" + caption_table(run))
        print("\n### Caption quality: seen and novel products\n\n" + subset_table(run))
    if (run.eval_dir / files.RETRIEVAL_SUMMARY).is_file():
        for level in ("R1", "R2", "R3"):
            print(f"\n### Verdict ({level})\n\n" + verdict_table(run, level))
        for level in ("R1", "R2", "R3"):
            print(f"\n### Retrieval ({level})\n\n" + retrieval_table(run, level))
        print("\n### Retrieval (R1, novel products)\n\n" + retrieval_table(run, "R1", "novel"))
        for level in ("R1", "R2", "R3"):
            print(f"\n### Refinement ({level})\n\n" + refinement_table(run, level))


if __name__ == "__main__":
    main()
