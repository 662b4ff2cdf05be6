"""Seen and novel products, and the verdict: paired differences on the two questions RIS Eval exists to answer.

"Seen": the held-out product's exact name (case and spacing folded, `ris_core.data.name_key`) is the name of a
training product; "novel": it is not (an empty name counts as novel). Every retrieval row is summarised for all
held-out products and for each subset; the verdict compares, query by query, (a) the paper's last-two-words
query with the full caption and (b) the best caption strategy, the best visual baseline and the best hybrid,
on P@1, MRR, nDCG@10 and P@10 at R1-R3, for all products and for the novel ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from ris_core.data import name_key
from ris_core.retrieval import paired_difference, summarize

SUBSETS = ("all", "seen", "novel")
VERDICT_SUBSETS = ("all", "novel")
VERDICT_METRICS = ("p_at_1", "mrr", "ndcg_at_10", "p_at_10")
LEVELS = ("R1", "R2", "R3")
QUESTIONS = {  # question -> what it asks, in the words the Overview uses
    "last_two_vs_full": "the paper's last-two-words query against the full caption",
    "last_two_vs_full_reranked": "the same two queries from reranked captions",
    "caption_vs_visual": "the best caption strategy against the best visual baseline",
    "hybrid_vs_caption": "the best hybrid against the best caption strategy",
    "hybrid_vs_visual": "the best hybrid against the best visual baseline",
}
CHOSEN_BY = ("R1", "p_at_10", "all")  # "best" = highest P@10 at R1 over all held-out products


def seen_flags(references: Iterable[str], training_names: Iterable[str]) -> np.ndarray:
    """True where a held-out product's name is also a training product's name."""
    known = {name_key(n) for n in training_names}
    return np.array([bool(name_key(r)) and name_key(r) in known for r in references], dtype=bool)


def subset(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows of `frame` (with a boolean `seen` column) in subset `name`."""
    if name == "all" or "seen" not in frame:
        return frame
    return frame[frame["seen"].astype(str).str.lower().isin(["true"] if name == "seen" else ["false"])]


def summarize_subsets(per_query: pd.DataFrame, n_boot: int) -> list[dict]:
    """`retrieval.summarize` for all held-out products, the seen and the novel ones (rows tagged `subset`)."""
    rows = []
    for name in SUBSETS:
        part = subset(per_query, name)
        if len(part):
            rows += [{**row, "subset": name} for row in summarize(part, n_boot=n_boot)]
    return rows


def best(rows: Sequence[dict], sources: set[str]) -> str | None:
    """The strategy of the given sources with the highest P@10 at R1 over all held-out products."""
    level, metric, which = CHOSEN_BY
    candidates = [r for r in rows if r.get("source") in sources and r.get("level") == level
                  and r.get("subset", "all") == which]
    return max(candidates, key=lambda r: r[metric])["strategy"] if candidates else None


def verdict(per_query: pd.DataFrame, rows: Sequence[dict], n_boot: int) -> dict:
    """The paired comparisons behind the Overview's verdict table (retrieval.json's `verdict`)."""
    chosen = {"caption": best(rows, {"caption", "reranked"}), "visual": best(rows, {"visual"}),
              "hybrid": best(rows, {"hybrid"})}
    pairs = {
        "last_two_vs_full": ("last_two_words", "full_caption"),
        "last_two_vs_full_reranked": ("reranked:last_two_words", "reranked:full_caption"),
        "caption_vs_visual": (chosen["caption"], chosen["visual"]),
        "hybrid_vs_caption": (chosen["hybrid"], chosen["caption"]),
        "hybrid_vs_visual": (chosen["hybrid"], chosen["visual"]),
    }
    strategies = set(per_query["strategy"])
    comparisons = []
    for question, (a, b) in pairs.items():
        if a not in strategies or b not in strategies:
            continue
        for name in VERDICT_SUBSETS:
            part = subset(per_query, name)
            if part.empty:
                continue
            comparisons.append({**paired_difference(part, a, b, n_boot=n_boot), "question": question, "subset": name})
    return {"best": chosen, "chosen_by": "highest P@10 at R1 over all held-out products (chosen on the reported "
            "data: a small selection effect in its favour)", "comparisons": comparisons}


def cell(comparison: dict, level: str, metric: str) -> str:
    """'better', 'worse' or 'same' (the 95% interval of a - b includes 0), or '' when missing."""
    value = comparison.get(f"{level}_{metric}") or {}
    ci = value.get("ci") if isinstance(value, dict) else None
    if not isinstance(ci, list) or len(ci) != 2 or not all(isinstance(v, int | float) for v in ci):
        return ""
    return "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "same"


def sentence(comparisons: Sequence[dict], question: str) -> str:
    """One sentence on a question: the answer, or where it depends on the metric, the level or the subset."""
    found = [c for c in comparisons if c.get("question") == question]
    if not found:
        return "not measured in this evaluation"
    a, b = found[0]["a"], found[0]["b"]
    by = {(c["subset"], level, metric): cell(c, level, metric) for c in found for level in LEVELS
          for metric in VERDICT_METRICS}
    answers = {v for v in by.values() if v}
    if len(answers) == 1:
        word = answers.pop()
        return (f"{a} is {'no different from' if word == 'same' else word + ' than'} {b} on every metric, "
                "level and subset measured")
    r1_all = {m: by.get(("all", "R1", m), "") for m in VERDICT_METRICS}
    parts = [f"at R1 on all products {a} is " + _joined(r1_all) + f" than {b}"]
    if any(by.get(("novel", "R1", m)) != r1_all[m] for m in VERDICT_METRICS):
        parts.append("on novel products: " + _joined({m: by.get(("novel", "R1", m), "") for m in VERDICT_METRICS}))
    deeper = sorted({level for (s, level, m), v in by.items() if s == "all" and level != "R1" and v
                     and v != r1_all.get(m)})
    if deeper:
        parts.append(f"the answer changes at {' and '.join(deeper)}")
    return "; ".join(parts) + " (95% paired bootstrap intervals)"


def _joined(cells: dict[str, str]) -> str:
    labels = {"p_at_1": "P@1", "mrr": "MRR", "ndcg_at_10": "nDCG@10", "p_at_10": "P@10"}
    groups: dict[str, list[str]] = {}
    for metric, word in cells.items():
        groups.setdefault(word or "unmeasured", []).append(labels[metric])
    return ", ".join(f"{'no different' if w == 'same' else w} on {'/'.join(ms)}" for w, ms in groups.items())
