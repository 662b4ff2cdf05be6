"""The files of an evaluation (<run>/eval/): their names, in one place, and their reader.

Outputs (committed with a run, read by the dashboard and `training.report`): `captions.csv`,
`caption_metrics.json`, `retrieval.csv`, `retrieval.json`. Caches (recomputed on a fresh clone when absent):
`state.json` (keys of what was computed), `val_embeddings.npy`, `catalog_knn.npz/.json`, `refine_cache.sqlite`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

CAPTIONS = "captions.csv"
CAPTION_METRICS = "caption_metrics.json"
RETRIEVAL = "retrieval.csv"
RETRIEVAL_SUMMARY = "retrieval.json"
OUTPUTS = (CAPTIONS, CAPTION_METRICS, RETRIEVAL, RETRIEVAL_SUMMARY)
SUMMARIES = (CAPTION_METRICS, RETRIEVAL_SUMMARY)
STATE = "state.json"
VAL_EMBEDDINGS = "val_embeddings.npy"
CATALOG_KNN = "catalog_knn"  # .npz (arrays) + .json (names, paths)
REFINE_CACHE = "refine_cache.sqlite"

CAPTION_COLUMNS = {"id", "reference", "generated"}
RETRIEVAL_COLUMNS = {"id", "strategy", "source"}
TEXT_COLUMNS = ("reference", "generated", "reranked", "nn_caption")


@dataclass
class Evaluation:
    """What an evaluation wrote; any part may be missing (None), with the reason in `problems`."""

    captions: pd.DataFrame | None = None
    caption_metrics: dict | None = None
    retrieval: pd.DataFrame | None = None
    retrieval_summary: dict | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def exists(self) -> bool:
        return self.captions is not None and self.caption_metrics is not None


def has_evaluation(eval_dir: Path) -> bool:
    return (Path(eval_dir) / CAPTION_METRICS).is_file()


def read_json_object(path: Path, problems: list[str]) -> dict | None:
    """The JSON object in `path`; None if absent, or unreadable with the reason added to `problems`."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        problems.append(f"{path.name} is unreadable ({type(err).__name__}); re-run the evaluation")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} does not hold a JSON object; re-run the evaluation")
        return None
    return data


def _read_csv(path: Path, required: set[str], problems: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (OSError, ValueError, pd.errors.ParserError) as err:
        problems.append(f"{path.name} is unreadable ({type(err).__name__}); re-run the evaluation")
        return None
    lacking = required - set(frame.columns)
    if lacking:
        problems.append(f"{path.name} lacks the columns {sorted(lacking)}; re-run the evaluation")
        return None
    return frame


def read_summaries(eval_dir: Path) -> tuple[dict | None, dict | None, list[str]]:
    """(caption_metrics.json, retrieval.json, problems): an evaluation without its large tables."""
    problems: list[str] = []
    root = Path(eval_dir)
    metrics = read_json_object(root / CAPTION_METRICS, problems)
    return metrics, read_json_object(root / RETRIEVAL_SUMMARY, problems), problems


def read_evaluation(eval_dir: Path) -> Evaluation:
    """Every output of an evaluation; unreadable parts are None with a problem each, never an exception."""
    root = Path(eval_dir)
    problems: list[str] = []
    captions = _read_csv(root / CAPTIONS, CAPTION_COLUMNS, problems)
    if captions is not None:
        for column in TEXT_COLUMNS:
            if column in captions:
                captions[column] = captions[column].fillna("").astype(str)
    retrieval = _read_csv(root / RETRIEVAL, RETRIEVAL_COLUMNS, problems)
    metrics, summary, summary_problems = read_summaries(root)
    return Evaluation(captions=captions, caption_metrics=metrics, retrieval=retrieval, retrieval_summary=summary,
                      problems=problems + summary_problems)
