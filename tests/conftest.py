"""Shared fixtures: a tiny Kaggle-layout catalog cut from the repo's demo data, and a tiny trained run."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "data" / "demo"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def copy_catalog(dest: Path, n: int) -> Path:
    """The first n products of data/demo (styles.csv lines + images), a real Kaggle-layout folder."""
    (dest / "images").mkdir(parents=True)
    lines = (DEMO_DIR / "styles.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    kept = lines[: n + 1]
    (dest / "styles.csv").write_text("".join(kept), encoding="utf-8")
    for line in kept[1:]:
        pid = line.split(",", 1)[0]
        shutil.copyfile(DEMO_DIR / "images" / f"{pid}.jpg", dest / "images" / f"{pid}.jpg")
    return dest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs the tiny trained run (directly or through another fixture) is `slow`:
    `pytest -m "not slow"` (`make test-fast`) runs the rest in well under a minute."""
    for item in items:
        if "tiny_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def background_jobs_finish():
    """A page may start a background job (ris_core.jobs); it finishes inside the test that started it, so no
    thread of one test writes into another test's captured output or files."""
    yield
    for thread in threading.enumerate():
        if thread.name.startswith("job-"):
            thread.join(timeout=600)


@pytest.fixture(scope="session", autouse=True)
def shared_evaluation_files(tmp_path_factory) -> Path:
    """Evaluations in tests (and the servers they start) share files in a folder of their own, not the repo's."""
    folder = tmp_path_factory.mktemp("shared-eval")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RIS_SHARED_EVAL_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session", autouse=True)
def datasets_cache(tmp_path_factory) -> Path:
    """Arrow caches of styles.csv and Kaggle-layout copies go to a folder of the session's, not the repo's .cache."""
    folder = tmp_path_factory.mktemp("datasets-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RIS_DATASETS_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory) -> Path:
    return copy_catalog(tmp_path_factory.mktemp("tiny_catalog"), 160)


def tiny_train_args(data_dir: Path, results_dir: Path, cache_dir: Path, name: str = "tiny",
                    epochs: int = 2) -> list[str]:
    return [
        "--data_dir", str(data_dir), "--results_dir", str(results_dir), "--cache_dir", str(cache_dir),
        "--run_name", name, "--epochs", str(epochs), "--batch_size", "16", "--learning_rate", "2e-3",
        "--warmup_steps", "2", "--n_layer", "1", "--n_embd", "64", "--n_head", "2", "--eval_batch_size", "64",
        "--val_fraction", "0.2", "--jitter_views", "0", "--brand_step_epochs", "0",
    ]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_catalog) -> Path:
    """A 1-layer captioner trained for 2 epochs on 160 demo products (~15 s)."""
    from training.train import main

    root = tmp_path_factory.mktemp("tiny_run")
    return main(tiny_train_args(tiny_catalog, root / "runs", root / "cache"))
