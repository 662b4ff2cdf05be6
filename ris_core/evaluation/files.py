"""The files of an evaluation (<run>/eval/): their names, in one place, and their reader.

Outputs (committed with a run, read by the dashboard and `training.report`): `captions.csv`,
`caption_metrics.json`, `retrieval.csv`, `retrieval.json`. Caches (recomputed on a fresh clone when absent):
`state.json` (keys of what was computed), `val_embeddings.npy`, `catalog_knn.npz/.json`, `refine_cache.sqlite`,
`rankings_cache.npz`.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ris_core.schema import problems as type_problems
from ris_core.schema import without_problems

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
NAME_EMBEDDINGS = "name_embeddings.npy"  # the catalog names' MiniLM embeddings
CONTRASTIVE = "contrastive.safetensors"  # the contrastive visual baseline's projections
RANKINGS_CACHE = "rankings_cache.npz"  # strategies' and visual spaces' rankings, by what they were computed from
TIMINGS = "timings.json"  # wall seconds per stage of the evaluation that wrote this set (reused parts are fast)
RENAMED = {"image_knn": "image_knn:encoder"}  # rows of evaluations written before the verdict rows existed

# What the summaries' fields must be (checked on reading: a field of the wrong type is dropped and reported).
_SCORES = {name: float for name in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "brevity_penalty", "exact_match",
                                    "last_two_match", "last_word_match", "loss", "perplexity", "sentence_bleu_mean",
                                    "visual_weight", "length_weight", "generated_margin",
                                    "loss_notebook_definition", "perplexity_notebook_definition")}
DECODING_SPEC = {**_SCORES, "n": int, "k": int, "num_beams": int, "mirror": bool}
CAPTION_METRICS_SPEC = {"run": str, "data_dir": str, "n_scored": int, "n_skipped": int,
                        "n_missing_from_data_dir": int, "num_beams": int, "images_per_second": float,
                        "catalog_size": int, "brand_step_words": int, "model": DECODING_SPEC,
                        "nn_caption_baseline": DECODING_SPEC,
                        "reranked": DECODING_SPEC}
RETRIEVAL_SPEC = {"run": str, "catalog": str, "k": int, "n_boot": int, "n_queries": int, "catalog_size": int,
                  "rows": list, "paired": list}
_METRICS = ("p_at_1", "p_at_5", "p_at_10", "mrr", "ndcg_at_10", "zero_hit")
ROW_SPEC = {"strategy": str, "source": str, "level": str, "n": int,
            **{m: float for m in _METRICS}}
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


def _checked(document: dict | None, spec: dict, name: str, problems: list[str]) -> dict | None:
    """The document without its wrongly typed fields; what was dropped goes into `problems`."""
    if document is None:
        return None
    clean, dropped = without_problems(document, spec)
    if dropped:
        problems.append(f"{name}: ignored {len(dropped)} malformed field(s) ({'; '.join(dropped[:2])}); "
                        "re-run the evaluation")
    return clean


def _good_row(row: object) -> bool:
    if not isinstance(row, dict) or type_problems(row, ROW_SPEC) or not {"strategy", "source", "level"} <= set(row):
        return False
    intervals = [row[k] for k in row if k.endswith("_ci")]
    return all(isinstance(ci, list) and len(ci) == 2 and not type_problems({"a": ci[0], "b": ci[1]},
                                                                        {"a": float, "b": float})
               for ci in intervals)


def read_summaries(eval_dir: Path) -> tuple[dict | None, dict | None, list[str]]:
    """(caption_metrics.json, retrieval.json, problems): an evaluation without its large tables, every field
    checked by type (a malformed one is left out and named in `problems`)."""
    found: list[str] = []
    root = Path(eval_dir)
    metrics = _checked(read_json_object(root / CAPTION_METRICS, found), CAPTION_METRICS_SPEC, CAPTION_METRICS, found)
    summary = _checked(read_json_object(root / RETRIEVAL_SUMMARY, found), RETRIEVAL_SPEC, RETRIEVAL_SUMMARY, found)
    if summary is not None:
        rows = summary.get("rows", [])
        summary["rows"] = [r for r in rows if _good_row(r)]
        summary["paired"] = [p for p in summary.get("paired", []) if isinstance(p, dict)]
        for item in [*summary["rows"], *summary["paired"]]:
            for key in ("strategy", "a", "b"):
                if item.get(key) in RENAMED:
                    item[key] = RENAMED[item[key]]
        if len(summary["rows"]) < len(rows):
            found.append(f"{RETRIEVAL_SUMMARY}: ignored {len(rows) - len(summary['rows'])} malformed row(s); "
                         "re-run the evaluation")
    return metrics, summary, found


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
    if retrieval is not None:
        retrieval["strategy"] = retrieval["strategy"].replace(RENAMED)
    metrics, summary, summary_problems = read_summaries(root)
    return Evaluation(captions=captions, caption_metrics=metrics, retrieval=retrieval, retrieval_summary=summary,
                      problems=problems + summary_problems)


# ---------------------------------------------------------------- writing a new set: a private copy, swapped in

PARTIAL = ".partial"  # eval.partial/: where an evaluation computes its new set (kept after a kill: keyed caches)
OLD = ".old"  # eval.old/: the previous set, for the moment of the swap
COPIED = {REFINE_CACHE}  # written in place (SQLite), so copied; every other file is only ever replaced whole


def open_workspace(eval_dir: Path) -> Path:
    """The folder an evaluation writes into: eval.partial/, seeded with hard links to eval/'s files.

    Hard links are safe because every writer replaces files whole (a new inode); eval/ itself is never
    written until `publish` swaps the finished set in. A workspace left by a killed evaluation is reused."""
    eval_dir = Path(eval_dir)
    recover(eval_dir)
    work = eval_dir.with_name(eval_dir.name + PARTIAL)
    if work.is_dir():
        return work
    fresh = Path(tempfile.mkdtemp(prefix=f".{work.name}.", dir=eval_dir.parent))
    if eval_dir.is_dir():
        for item in eval_dir.iterdir():
            if not item.is_file() or item.is_symlink():
                continue
            if item.name in COPIED:
                shutil.copy2(item, fresh / item.name)
                continue
            try:
                os.link(item, fresh / item.name)
            except OSError:  # a filesystem without hard links
                shutil.copy2(item, fresh / item.name)
    os.chmod(fresh, 0o755)
    os.rename(fresh, work)
    return work


def publish(work: Path, eval_dir: Path) -> None:
    """Make the finished `work` folder the evaluation: readers see the old set or the new one, never a mix.

    On Linux one renameat2(RENAME_EXCHANGE) swaps the two folders; elsewhere two renames leave a moment with
    no eval/ (never a mixed one), which `recover` repairs if a kill falls in between."""
    work, eval_dir = Path(work), Path(eval_dir)
    old = eval_dir.with_name(eval_dir.name + OLD)
    shutil.rmtree(old, ignore_errors=True)
    if not eval_dir.exists():
        os.rename(work, eval_dir)
        return
    if _exchange(work, eval_dir):
        os.rename(work, old)  # the exchanged folder now holds the previous set
    else:
        os.rename(eval_dir, old)
        os.rename(work, eval_dir)
    shutil.rmtree(old, ignore_errors=True)


def recover(eval_dir: Path) -> None:
    """Undo a swap cut short between its two renames: the previous set comes back as eval/."""
    eval_dir = Path(eval_dir)
    old = eval_dir.with_name(eval_dir.name + OLD)
    if not eval_dir.exists() and old.is_dir():
        os.rename(old, eval_dir)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
