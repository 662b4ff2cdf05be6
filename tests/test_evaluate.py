"""The whole evaluation on a tiny run: four files, reuse on re-run, clear errors on bad runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from ris_core.data import load_catalog
from ris_core.runs import RunError
from training.evaluate import main as evaluate_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated_run(tiny_run: Path, tiny_catalog: Path, tmp_path_factory) -> Path:
    run = shutil.copytree(tiny_run, tmp_path_factory.mktemp("evaluated") / tiny_run.name)
    evaluate_main(["--run", str(run), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "200"])
    return run


def test_evaluation_writes_all_four_files(evaluated_run: Path, tiny_catalog: Path):
    eval_dir = evaluated_run / "eval"
    captions = pd.read_csv(eval_dir / "captions.csv", keep_default_na=False)
    split = json.loads((evaluated_run / "split.json").read_text())
    assert sorted(captions["id"]) == sorted(split["val_ids"])
    assert {"reference", "generated", "nn_caption", "sentence_bleu", "last_two_match", "articleType"} <= set(captions)
    metrics = json.loads((eval_dir / "caption_metrics.json").read_text())
    assert metrics["n_scored"] == len(captions) and metrics["model"]["perplexity"] > 1
    assert 0 <= metrics["nn_caption_baseline"]["bleu_4"] <= 100
    retrieval = pd.read_csv(eval_dir / "retrieval.csv", keep_default_na=False)
    strategies = set(retrieval["strategy"])
    assert {"last_two_words", "full_caption", "oracle:full_caption", "image_knn"} <= strategies
    summary = json.loads((eval_dir / "retrieval.json").read_text())
    row = next(r for r in summary["rows"] if r["strategy"] == "oracle:full_caption" and r["level"] == "R1")
    low, high = row["p_at_10_ci"]
    assert low <= row["p_at_10"] <= high
    assert summary["paired"][0]["a"] == "last_two_words" and summary["paired"][0]["b"] == "full_caption"
    refined = retrieval[retrieval["strategy"] == "last_two_words+refine"]
    assert len(refined) == len(captions) and set(refined["source"]) == {"refine"}  # fewer than 500: all refined
    assert any(p["a"] == "last_two_words+refine" and p["b"] == "last_two_words" for p in summary["paired"])
    assert set(retrieval.loc[retrieval["strategy"] == "reranked:last_two_words", "source"]) == {"reranked"}
    assert any(p["a"] == "reranked:last_two_words" and p["b"] == "last_two_words" for p in summary["paired"])
    # reranked captions: the greedy caption or a training product's name, scored beside greedy
    assert metrics["reranked"]["k"] == 10 and metrics["reranked"]["n"] == len(captions)
    train_names = set(load_catalog(tiny_catalog).products.loc[split["train_ids"], "productDisplayName"])
    assert all(r == g or r in train_names for r, g in zip(captions["reranked"], captions["generated"]))
    # the oracle searches with the true name: its top hit is of the same articleType far more often than chance
    assert row["p_at_1"] > 0.3


def test_rerun_reuses_captions_reranking_and_refinement_captions(evaluated_run: Path, tiny_catalog: Path, monkeypatch):
    from ris_core import captioner

    def fail(*args, **kwargs):
        raise AssertionError("captioned again instead of reusing captions.csv")

    monkeypatch.setattr(captioner.Captioner, "caption_paths", fail)
    monkeypatch.setattr(captioner.Captioner, "rerank", fail)
    evaluate_main(["--run", str(evaluated_run), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50"])
    columns = pd.read_csv(evaluated_run / "eval" / "captions.csv", nrows=1).columns
    assert len(columns) == len(set(columns)) and "reranked" in columns and "masterCategory.1" not in columns
    strategies = set(pd.read_csv(evaluated_run / "eval" / "retrieval.csv", usecols=["strategy"])["strategy"])
    assert "last_two_words+refine" in strategies and "reranked:last_two_words+refine" not in strategies


def test_run_without_checkpoint_is_one_clear_error(tmp_path: Path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    with pytest.raises(RunError, match="no checkpoint"):
        evaluate_main(["--run", str(tmp_path / "run"), "--quiet"])


def test_split_outside_the_data_folder_is_one_clear_error(tiny_run: Path, tmp_path: Path):
    from tests.test_data import write_catalog

    other = write_catalog(tmp_path / "other", "1,Men,Apparel,Topwear,Shirts,Blue,Fall,2011,Casual,Blue Shirt\n", [1])
    from ris_core.data import DataError

    with pytest.raises(DataError, match="held-out products are in"):
        evaluate_main(["--run", str(tiny_run), "--data_dir", str(other), "--quiet"])
