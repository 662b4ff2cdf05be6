"""What several benchmarks share: the run they measure, real demo images, and small catalog copies for --quick."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from ris_core.data import DEFAULT_DATA_DIR
from ris_core.runs import RESULTS_DIR, Run, discover_runs

REPO = Path(__file__).resolve().parent.parent
REFERENCE = RESULTS_DIR / "runs" / "reference-cpu"
FULL_SMALL = REPO.parent / "shared" / "data" / "fashion-product-images-small"  # all 44,441 products, 60x80 px


def probe_parser(doc: str) -> argparse.ArgumentParser:
    """A probe's command line: its docstring's first line, `--run` and `--data_dir` (the whole small dataset)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data_dir", type=Path, default=FULL_SMALL)
    return parser


def reference_run() -> tuple[Run | None, str]:
    """The committed reference run, else any run with a model; (None, why) when there is none."""
    reference = Run(REFERENCE)
    if reference.has_checkpoint:
        return reference, f"reference run {reference.name} ({_epochs(reference)})"
    for run in discover_runs(RESULTS_DIR):
        if run.has_checkpoint and not _reported(run):
            return run, f"fallback run {run.name} ({_epochs(run)}): {REFERENCE} has no model yet"
    return None, f"no run with a model under {RESULTS_DIR}"


def _reported(run: Run) -> bool:
    try:
        return run.reported_only
    except ValueError:
        return True


def _epochs(run: Run) -> str:
    try:
        info = json.loads(run.info_path.read_text())
    except (OSError, ValueError):
        return "run.json unreadable"
    return f"best epoch {info.get('best_epoch')} of {info.get('epochs_done')} done, status {info.get('status')}"


def demo_image_paths(n: int) -> list[Path]:
    """The first n product images of the bundled demo catalog (real photos, up to 240 px)."""
    paths = sorted((DEFAULT_DATA_DIR / "images").glob("*.jpg"), key=lambda p: int(p.stem))
    return paths[:n]


def small_catalog(dest: Path, ids: list[int], source: Path = DEFAULT_DATA_DIR) -> Path:
    """A Kaggle-layout copy of `source` holding only `ids` (styles.csv rows + images)."""
    (dest / "images").mkdir(parents=True, exist_ok=True)
    wanted = {str(i) for i in ids}
    lines = (source / "styles.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [lines[0]] + [line for line in lines[1:] if line.split(",", 1)[0] in wanted]
    (dest / "styles.csv").write_text("".join(kept), encoding="utf-8")
    for line in kept[1:]:
        pid = line.split(",", 1)[0]
        shutil.copyfile(source / "images" / f"{pid}.jpg", dest / "images" / f"{pid}.jpg")
    return dest


def run_sample(run: Run, dest: Path, n_val: int, n_train: int) -> Path:
    """A small data folder: the first held-out and training products of `run` that data/demo holds (--quick)."""
    from ris_core.data import load_catalog

    split = json.loads((run.path / "split.json").read_text())
    present = set(load_catalog(DEFAULT_DATA_DIR, require_images=False).products.index)
    val = [i for i in split["val_ids"] if i in present][:n_val]
    train = [i for i in split["train_ids"] if i in present][:n_train]
    return small_catalog(dest, val + train)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation; NaN for no values."""
    return float(np.percentile(values, q)) if len(values) else float("nan")


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
