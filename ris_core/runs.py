"""The run folder: the only contract between training, evaluation and the dashboard.

results/runs/<name>/
    run.json         what the run is: preset, resolved arguments, data fingerprint, commit, best epoch
    history.csv      one row per epoch: losses, perplexities, learning rate, seconds, samples/s
    split.json       the seeded train/validation ids
    model/           save_pretrained folder: safetensors, config, generation config, tokenizer, processor
    eval/            captions.csv, caption_metrics.json, retrieval.csv, retrieval.json
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ris_core.data import Split
from ris_core.errors import RunError
from ris_core.files import write_csv_atomic
from ris_core.schema import problems

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "results"
HISTORY_COLUMNS = [
    "epoch", "train_loss", "train_perplexity", "val_loss", "val_perplexity",
    "learning_rate", "seconds", "samples_per_second",
]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    # Outside a repo, or before the first commit, git prints "HEAD" and fails: record nothing rather than that.
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


# What run.json's fields must be when present (the app reads these; the rest is only recorded).
RUN_INFO = {
    "name": str, "kind": str, "status": str, "note": str, "preset": str, "started": str, "finished": str,
    "source": (str, dict), "model": str, "git_commit": (str, None), "epochs_done": int, "best_epoch": (int, None),
    "best_val_loss": (float, None), "best_val_perplexity": (float, None), "parameters": int,
    "trainable_parameters": int, "reported_not_reproduced": bool, "args": dict, "notes": list,
    "data": {"data_dir": (str, None), "train": int, "val": int, "rows": int, "dataset": str},
    "model_spec": {"encoder": str, "decoder": str, "image_size": int, "n_layer": int, "n_embd": int, "n_head": int},
}


@dataclass
class Run:
    """A view over one run folder; reads lazily, never writes unless asked."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)  # callers may pass a str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def has_checkpoint(self) -> bool:
        """A captioner to load: our model/ folder, or an imported paper-notebook checkpoint (notebook/)."""
        return (self.model_dir / "config.json").is_file() or (self.path / "notebook" / "config.json").is_file()

    def info(self) -> dict:
        """run.json as an object whose known fields have their types ({} when absent); RunError otherwise."""
        if not self.info_path.is_file():
            return {}
        try:
            info = json.loads(self.info_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(f"{self.name}/run.json is unreadable ({type(err).__name__}); re-run training or delete "
                           "the run") from err
        wrong = problems(info, RUN_INFO, "run.json")
        if wrong:
            raise RunError(f"{self.name}/run.json is malformed: {'; '.join(wrong[:3])}")
        return info

    def problem(self) -> str | None:
        """Why this run cannot be shown (malformed run.json, history.csv or split.json), or None."""
        try:
            self.info()
            if (self.path / "history.csv").is_file():
                self.history()
            if (self.path / "split.json").is_file():
                self.split()
        except RunError as err:
            return str(err)
        return None

    @property
    def reported_only(self) -> bool:
        """A run whose numbers were reported elsewhere (e.g. the paper), not reproduced here."""
        return bool(self.info().get("reported_not_reproduced"))

    def history(self) -> pd.DataFrame:
        return read_history(self.path / "history.csv")

    def split(self) -> Split:
        path = self.path / "split.json"
        if not path.is_file():
            raise RunError(f"{self.name} has no split.json: it cannot say which products were held out")
        return Split.load(path)


def borrowed_split(run_dir: Path) -> tuple[Split, dict]:
    """Another run's split and its run.json ({} when unreadable): the held-out products an imported model is
    evaluated on. RunError saying what to pass when the split is missing."""
    split_path = Path(run_dir) / "split.json"
    try:
        split = Split.load(split_path)
    except (OSError, ValueError, TypeError) as err:
        raise RunError(f"{split_path} is missing or unreadable ({type(err).__name__}): pass --split_from with a "
                       "run folder holding split.json (e.g. results/runs/reference-cpu)") from err
    try:
        info = json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        info = {}
    return split, info if isinstance(info, dict) else {}


def read_history(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path} not found: this run has not finished an epoch yet")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is not a readable CSV ({err})") from err
    if "epoch" not in frame.columns:
        raise RunError(f"{path} has no 'epoch' column")
    return frame


def upsert_history_row(path: Path, row: dict) -> pd.DataFrame:
    """Add or replace the row of `row['epoch']`: a resumed epoch never duplicates a row."""
    path = Path(path)
    frame = read_history(path) if path.is_file() else pd.DataFrame(columns=HISTORY_COLUMNS)
    frame = frame[frame["epoch"] != row["epoch"]]
    frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True).sort_values("epoch")
    write_csv_atomic(path, frame)
    return frame


SKIPPED_FOLDERS = {"eval", "eval.partial", "eval.old", "checkpoints", "model", "notebook", "node_modules",
                   "__pycache__", "proc", "sys", "dev"}


def discover_runs(*roots: Path, max_depth: int = 4, max_folders: int = 2_000) -> list[Run]:
    """Every folder under the roots holding a run.json or history.csv, sorted by name.

    The walk is bounded (`max_depth` levels, `max_folders` folders, hidden and bulky folders skipped), so a
    root like `/` costs milliseconds, not seconds."""
    found: dict[Path, Run] = {}
    visited = 0
    for root in roots or (RESULTS_DIR,):
        root = Path(root)
        if not root.is_dir():
            continue
        for folder, dirs, names in os.walk(root):
            visited += 1
            depth = len(Path(folder).relative_to(root).parts)
            if "run.json" in names or "history.csv" in names:
                found[Path(folder).resolve()] = Run(Path(folder))
            dirs[:] = [] if depth >= max_depth or visited >= max_folders else sorted(
                d for d in dirs if not d.startswith(".") and d not in SKIPPED_FOLDERS)
    return sorted(found.values(), key=lambda r: r.name)


def differing_arguments(arguments: dict[str, dict]) -> pd.DataFrame:
    """Runs (rows) by the training arguments whose values differ between them (columns); an argument a run
    did not record shows as empty. Values are compared as text, so 0.1 and "0.1" count as the same."""
    names = sorted(set().union(*arguments.values())) if arguments else []
    table = pd.DataFrame({run: {n: args.get(n) for n in names} for run, args in arguments.items()}).T
    keep = [n for n in names if table[n].map(lambda v: "" if v is None else str(v)).nunique() > 1]
    return table[keep].map(lambda v: "" if v is None else str(v))
