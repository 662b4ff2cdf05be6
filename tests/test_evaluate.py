"""The whole evaluation on a tiny run: four files, reuse on re-run, clear errors on bad runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ris_core.captioner import Captioner
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
    assert {"last_two_words", "full_caption", "oracle:full_caption", "image_knn:encoder"} <= strategies
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
    # reranked captions: the model's own (greedy or beam) or a training product's name, scored beside greedy
    assert metrics["reranked"]["k"] == 10 and metrics["reranked"]["n"] == len(captions)
    assert metrics["reranked"]["num_beams"] == 5 and metrics["reranked"]["mirror"] is True
    catalog = load_catalog(tiny_catalog)
    train_names = set(catalog.products.loc[split["train_ids"], "productDisplayName"])
    images = [Image.open(catalog.image_path(i)).convert("RGB") for i in captions["id"]]
    beams = Captioner.load(evaluated_run).n_best(images, num_beams=5)
    origins = ["greedy" if r == g else "name" if r in train_names else "beam" if r in b else "unknown"
               for r, g, b in zip(captions["reranked"], captions["generated"], beams)]
    assert "unknown" not in origins  # every reranked caption is one of the pool's candidates
    # the oracle searches with the true name: its top hit is of the same articleType far more often than chance
    assert row["p_at_1"] > 0.3


def test_rerun_reuses_captions_reranking_and_refinement_captions(evaluated_run: Path, tiny_catalog: Path, monkeypatch):
    from ris_core import captioner

    def fail(*args, **kwargs):
        raise AssertionError("captioned again instead of reusing captions.csv")

    monkeypatch.setattr(captioner.Captioner, "caption_paths", fail)
    monkeypatch.setattr(captioner.Captioner, "log_likelihoods", fail)
    monkeypatch.setattr(captioner.Captioner, "n_best", fail)
    evaluate_main(["--run", str(evaluated_run), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50"])
    columns = pd.read_csv(evaluated_run / "eval" / "captions.csv", nrows=1).columns
    assert len(columns) == len(set(columns)) and "reranked" in columns and "masterCategory.1" not in columns
    strategies = set(pd.read_csv(evaluated_run / "eval" / "retrieval.csv", usecols=["strategy"])["strategy"])
    assert "last_two_words+refine" in strategies and "reranked:last_two_words+refine" not in strategies


def test_new_rerank_weights_rerank_again_without_captioning_again(evaluated_run: Path, tiny_catalog: Path,
                                                                   tmp_path: Path, monkeypatch):
    from ris_core import captioner

    def fail(*args, **kwargs):
        raise AssertionError("captioned again instead of reusing captions.csv")

    run = shutil.copytree(evaluated_run, tmp_path / evaluated_run.name)
    monkeypatch.setattr(captioner.Captioner, "caption_paths", fail)
    evaluate_main(["--run", str(run), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50",
                   "--rerank_visual_weight", "1e6", "--rerank_beams", "0"])
    metrics = json.loads((run / "eval" / "caption_metrics.json").read_text())
    assert metrics["reranked"]["visual_weight"] == 1e6 and metrics["reranked"]["num_beams"] == 0
    captions = pd.read_csv(run / "eval" / "captions.csv", keep_default_na=False)
    assert (captions["reranked"] == captions["nn_caption"]).all()  # overwhelming visual evidence: the nearest name


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


def test_rerank_tuning_scores_every_setting_on_both_halves(evaluated_run: Path, tiny_catalog: Path):
    from training.tune_rerank import GRID
    from training.tune_rerank import main as tune_main

    table = tune_main(["--run", str(evaluated_run), "--data_dir", str(tiny_catalog), "--n", "12"])
    assert len(table) == np.prod([len(v) for v in GRID.values()])
    assert table["tune_objective"].is_monotonic_decreasing
    assert table[["tune_bleu_4", "check_bleu_4", "all_bleu_4"]].stack().between(0, 100).all()
    assert (evaluated_run / "eval" / "rerank_tuning.csv").is_file()


def test_tuning_picks_by_the_same_score_as_rerank():
    from ris_core.rerank import RerankConfig
    from training.tune_rerank import pick

    item = {"greedy": "Nike Men Black Shoes", "beams": ["Puma Men Black Shoes"],
            "neighbours": [("Adidas Men Black Shoes", 0.9), ("Adidas Men White Shoes", 0.8)],
            "plain": {"Nike Men Black Shoes": -2.0, "Puma Men Black Shoes": -1.0, "Adidas Men Black Shoes": -5.0,
                      "Adidas Men White Shoes": -3.0},
            "mirror": {"Nike Men Black Shoes": -9.0, "Puma Men Black Shoes": -1.0, "Adidas Men Black Shoes": -5.0,
                       "Adidas Men White Shoes": -3.0}}
    plain = RerankConfig(num_beams=0, mirror=False, visual_weight=0.0, length_weight=0.0)
    assert pick(item, plain) == "Nike Men Black Shoes"
    assert pick(item, RerankConfig(num_beams=5, mirror=False, visual_weight=0.0, length_weight=0.0)) == \
        "Puma Men Black Shoes"
    assert pick(item, RerankConfig(num_beams=0, mirror=True, visual_weight=0.0, length_weight=0.0)) == \
        "Adidas Men White Shoes"
    assert pick(item, RerankConfig(k=1, num_beams=0, mirror=False, visual_weight=1000.0)) == "Adidas Men Black Shoes"


def test_rerun_after_changing_one_strategy_searches_and_scores_only_what_changed(
        evaluated_run: Path, tiny_catalog: Path, tmp_path: Path, monkeypatch):
    from ris_core.evaluation import baselines, pipeline
    from ris_core.search.catalog import CatalogIndex

    run = shutil.copytree(evaluated_run, tmp_path / evaluated_run.name)
    args = ["--run", str(run), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50"]
    evaluate_main(args)  # the cache now holds exactly this configuration's rankings
    before = pd.read_csv(run / "eval" / "retrieval.csv", keep_default_na=False)
    metrics_before = (run / "eval" / "caption_metrics.json").read_text()

    def fail(*args, **kwargs):
        raise AssertionError("computed again although nothing it depends on changed")

    searched: list[list[str]] = []
    search_many = CatalogIndex.search_many
    monkeypatch.setattr(CatalogIndex, "search_many", lambda self, queries, k=10, mode="any": (
        searched.append(list(queries)) or search_many(self, queries, k=k, mode=mode)))
    monkeypatch.setattr(pipeline, "_caption_metrics", fail)
    monkeypatch.setattr(baselines.Space, "top", fail)
    monkeypatch.setitem(pipeline.STRATEGIES, "last_two_words", lambda caption: " ".join(caption.split()[-1:]))
    evaluate_main(args)
    after = pd.read_csv(run / "eval" / "retrieval.csv", keep_default_na=False)
    assert searched and all(len(q.split()) <= 1 for queries in searched for q in queries)  # the changed one only
    assert (run / "eval" / "caption_metrics.json").read_text() == metrics_before
    for strategy in ("full_caption", "oracle:full_caption", "image_knn:encoder", "reranked:full_caption"):
        pd.testing.assert_frame_equal(before[before["strategy"] == strategy].reset_index(drop=True),
                                      after[after["strategy"] == strategy].reset_index(drop=True))
    # the oracle queries with the true names (the tiny model's own captions may be empty): two words, now one
    old, new = (frame.loc[frame["strategy"] == "oracle:last_two_words", "query"] for frame in (before, after))
    assert old.str.split().str.len().max() == 2 and new.str.split().str.len().max() == 1
    assert any(len(q.split()) == 1 for queries in searched for q in queries)


def test_rankings_cache_round_trips_and_keeps_only_what_was_used(tmp_path: Path, caplog):
    from ris_core.evaluation.rankings_cache import RankingsCache

    path = tmp_path / "rankings_cache.npz"
    cache = RankingsCache.open(path)
    cache.put("a", [[3, 1], [], [7]], [[2.5, 1.0], [], [0.5]])
    cache.put("b", [[5]])
    cache.save()
    again = RankingsCache.open(path)
    assert again.get("a") == ([[3, 1], [], [7]], [[2.5, 1.0], [], [0.5]])
    assert again.get("missing") is None
    again.save()  # only "a" was asked for: "b" is dropped
    assert RankingsCache.open(path).get("b") is None and RankingsCache.open(path).get("a") is not None
    path.write_bytes(b"PK\x03\x04 torn")
    assert RankingsCache.open(path).get("a") is None and "ignoring the unreadable" in caplog.text


def test_tree_scoring_probe_reranks_as_one_row_per_candidate(evaluated_run: Path, tiny_catalog: Path):
    from bench.probe_tree_scoring import main as probe

    out = probe(["--run", str(evaluated_run), "--data_dir", str(tiny_catalog), "--products", "6", "--batch_size", "4"])
    assert out["products"] == 6 and out["same_reranked_caption"] == 1.0
    assert 0 <= out["largest_score_difference"] < 1e-3 and out["seconds_rows"] > 0 < out["seconds_tree"]


def test_images_met_twice_are_encoded_once_with_the_same_results(tiny_run: Path, tiny_catalog: Path,
                                                                 tmp_path: Path):
    runs = {}
    for cache_mb in ("4096", "0"):
        runs[cache_mb] = shutil.copytree(tiny_run, tmp_path / cache_mb / tiny_run.name)
        evaluate_main(["--run", str(runs[cache_mb]), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50",
                       "--encoder_cache_mb", cache_mb])
    timings = {mb: json.loads((run / "eval" / "timings.json").read_text()) for mb, run in runs.items()}
    split = json.loads((tiny_run / "split.json").read_text())
    kept = timings["4096"]["encoder_cache"]
    # held-out photos reranked after captioning, catalog photos captioned for refinement after embedding
    assert kept["images_reused"] >= len(split["val_ids"]) and kept["megabytes"] > 0
    assert "encoder_cache" not in timings["0"]
    for name in ("captions.csv", "retrieval.csv"):
        assert (runs["4096"] / "eval" / name).read_bytes() == (runs["0"] / "eval" / name).read_bytes(), name
