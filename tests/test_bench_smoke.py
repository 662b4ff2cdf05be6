"""`python -m bench.run --quick` end to end: every benchmark runs on tiny sizes and the JSON has its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

EXPECTED = {
    "captioning": {"model", "batch_1_images_per_second", "batch_4_images_per_second", "batch_1_gflops_per_caption",
                   "batch_1_x_floor", "batch_4_x_floor", "matmul_fp32_gflops", "matmul_bf16_gflops",
                   "reranked_batch_1_images_per_second", "reranked_batch_1_x_greedy", "rerank_stage_ms_per_image",
                   "rows_reranked_batch_2_images_per_second", "drafted_batch_1", "batch_1_weight_stream",
                   "brand_step_batch_1_images_per_second", "brand_step_batch_4_images_per_second"},
    "training": {"samples_per_second", "projected_epoch_minutes_39990", "shortlist_tokens", "batch_size"},
    "search": {"index_seconds", "query_p50_ms", "query_p99_ms", "naive_p50_ms", "naive_over_fts_p50", "products"},
    "dashboard": {"model", *(f"{kind}_{page}_seconds" for kind in ("cold", "warm", "switch_to")
                             for page in ("overview", "training_curves", "caption_quality", "query_strategies",
                                          "search_demo"))},
}


def test_quick_bench_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)  # the figures, not the time, are tested
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["date"]
    machine = report["machine"]
    assert {"cpu_model", "cores_logical", "torch_threads", "matmul_fp32_gflops", "matmul_bf16_gflops"} <= set(machine)
    assert machine["matmul_fp32_gflops"] > 0 and machine["matmul_bf16_gflops"] > 0 and "fast_bf16" in machine
    benchmarks = report["benchmarks"]
    assert set(benchmarks) == {"captioning", "training", "search", "evaluation", "dashboard", "browser"}
    errors = {name: figures["error"] for name, figures in benchmarks.items() if "error" in figures}
    assert not errors, errors
    for name, keys in EXPECTED.items():
        if "skipped" not in benchmarks[name]:
            assert keys <= set(benchmarks[name]), (name, keys - set(benchmarks[name]))
    drafted = benchmarks["captioning"]["drafted_batch_1"]
    if "skipped" not in drafted:  # the same captions never take more steps with guesses than without
        assert drafted["photos"] == 4 and drafted["draft_names"] > 0
        assert drafted["identical_captions"] < 1 or drafted["drafted_steps_per_caption"] <= drafted[
            "plain_steps_per_caption"]
    evaluation = benchmarks["evaluation"]
    assert "skipped" in evaluation or {"wall_seconds", "held_out_scored", "catalog_products", "rerun_unchanged_seconds",
                                       "rerun_one_strategy_changed_seconds", "another_run_seconds"} <= set(evaluation)
    if "skipped" not in evaluation:  # the second run's catalog came from the first's shared files
        assert evaluation["encoder_cache"]["images_reused"] > 0
        assert {"catalog_knn.npz", "catalog_knn.json"} <= set(evaluation["another_run_reused"])
        texts = evaluation["semantic_texts"]  # every distinct caption embedded once, names' vectors reused
        assert 0 < texts["once_texts"] < texts["per_column_texts"]
    assert benchmarks["search"]["naive_over_fts_p50"] > 1  # the index beats the Python loop even on 3k products
    browser = benchmarks["browser"]
    if "skipped" not in browser:  # CI installs Chromium; the first page's content showed in every visit
        for page in ("overview", "training_curves"):
            assert browser[f"{page}_first_visit"]["content_seconds"] > 0
            assert browser[f"{page}_repeat_visit"]["content_seconds"] > 0
            assert browser[f"{page}_first_visit"]["js_files"] > 10  # Resource Timing was read from the page
        assert browser["training_curves_first_visit"]["chart_seconds"] > 0
        cold = browser["search_demo_cold"]  # both uploads were answered on screen (else a TimeoutError)
        assert cold["upload_after_gallery"]["all_results_seconds"] > 0 < cold["upload_10s_later"]["caption_seconds"]
    assert "benchmark  figure" in done.stdout  # the printed table


def test_reranked_rate_encodes_each_image_once_a_pass_and_keeps_the_callers_cache(tiny_run: Path,
                                                                                  tiny_catalog: Path):
    from bench import captioning
    from ris_core.encoder_decoder import Captioner
    from ris_core.encoding_cache import EncodingCache
    from ris_core.images import open_image

    captioner = Captioner.load(tiny_run)
    images = [open_image(p) for p in sorted((tiny_catalog / "images").glob("*.jpg"))[:4]]
    computed: list[int] = []  # images through the encoder (preprocessing runs only for those not cached)
    preprocess = captioner.preprocess
    captioner.preprocess = lambda todo: (computed.append(len(todo)), preprocess(todo))[1]
    mine = EncodingCache(1 << 20)
    captioner.encodings = mine
    assert captioning.reranked_per_second(captioner, images, 2, repeats=1) > 0
    # the greedy pass encodes each image; the reranking's two views find the direct one cached (the mirror is new)
    assert sum(computed) == 2 * (len(images) + len(images))  # 2 passes (warm-up + 1) x (direct + mirror)
    assert captioner.encodings is mine and mine.hits == mine.misses == 0  # each pass had its own empty cache


def test_resolution_probe_compares_the_same_held_out_products_at_two_sizes(tiny_run: Path, tiny_catalog: Path,
                                                                          tmp_path: Path):
    from bench.probe_resolution import probe

    same = probe(tiny_run, tiny_catalog, tiny_catalog)  # the same photos twice: identical by construction
    assert same["products"] == 32 and same["identical"] == 1.0 and same["small"] == same["larger"]
    assert 0 <= same["small"]["last_two_match"] <= 1
    (tmp_path / "elsewhere" / "images").mkdir(parents=True)
    with pytest.raises(SystemExit, match="none of the 32 held-out products"):
        probe(tiny_run, tiny_catalog, tmp_path / "elsewhere")


def test_resolution_gap_is_the_corpus_bleu_difference_with_an_interval_from_resampled_products():
    from bench.probe_resolution import size_gap
    from ris_core.metrics import corpus_bleu_4

    references = ["Nike Men Blue T-shirt", "Puma Women Black Shoes", "Adidas Men White Socks",
                  "Fila Women Red Bag"] * 25
    small = ["Nike Men Blue Shirt", "Puma Women Black Heels", "Adidas Men Grey Socks", "Fila Men Red Bag"] * 25
    better = references[:50] + small[50:]  # half the products captioned exactly at the larger size
    gap = size_gap(small, better, references)
    assert gap["bleu_4"]["gap"] == pytest.approx(corpus_bleu_4(better, references) - corpus_bleu_4(small, references))
    assert 0 < gap["bleu_4"]["low"] < gap["bleu_4"]["gap"] < gap["bleu_4"]["high"]
    assert gap["last_two_match"]["gap"] == pytest.approx(38.0)  # 38 of 100 last-two pairs fixed, in points
    assert 0 < gap["last_two_match"]["low"] < 38.0 < gap["last_two_match"]["high"]
    same = size_gap(small, small, references)
    assert all(value == 0 for g in same.values() for value in g.values())
    mixed = references[:2] + ["Roadster Kids Green Cap"] * 2 + small[4:]  # two captions fixed, two broken
    assert all(g["low"] < 0 < g["high"] for g in size_gap(small, mixed, references).values())  # no gap to claim


def test_size_probes_read_a_captions_first_word_as_the_brand_step_does():
    from bench.probe_resolution import scores
    from ris_core.metrics import corpus_bleu_4

    captions, references = ["U.S. Polo Men Blue Shirt", "Nike Women Bag"], ["US Polo Assn Men Top", "Puma Women Bag"]
    assert scores(captions, references) == {"bleu_4": pytest.approx(corpus_bleu_4(captions, references)),
                                            "last_two_match": 0.5, "last_word_match": 0.5,
                                            "first_word_match": 0.5}  # "U.S." is "US"; "Nike" is not "Puma"


def test_shrink_probe_leaves_out_the_demo_products_and_shrinks_each_way(tiny_run: Path, tiny_catalog: Path,
                                                                         tmp_path: Path):
    from PIL import Image

    from bench.probe_shrink import probe, shrunk

    photo = shrunk(Image.Resampling.BICUBIC, 75)(Image.new("RGB", (180, 240), (200, 30, 30)))
    assert photo.size == (60, 80) and photo.mode == "RGB"  # shrunk to the 80-px side, then a JPEG round trip
    result = probe(tiny_run, tiny_catalog, tiny_catalog, tmp_path / "no-demo", [50], [64], ["bicubic"])
    assert result["products"] == 32 and set(result["ways"]) == {
        "as the captioner shrinks it", "bicubic", "bicubic + JPEG q50", "bicubic to 64 px"}
    assert result["ways"]["as the captioner shrinks it"]["identical_to_60x80"] == 1.0  # the same photos: same size
    with pytest.raises(SystemExit, match="no held-out product"):  # every held-out product is a demo product
        probe(tiny_run, tiny_catalog, tiny_catalog, tiny_catalog, [], [], ["bicubic"])


def test_attribute_votes_weigh_neighbours_and_correct_only_gender_and_colour_words():
    import numpy as np
    import pandas as pd

    from bench.probe_attribute_votes import corrected, votes
    from ris_core.search.image_knn import ImageKnnIndex

    index = ImageKnnIndex([1, 2, 3], np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), ["a", "b", "c"], ["x"] * 3)
    gender = pd.Series({1: "Women", 2: "Men", 3: "Men"})
    winners, shares = votes(index, np.array([[1.0, 0.0]]), gender, k=2)  # products 1 and 2, nearly as close
    assert winners == ["Women"] and 0.5 < shares[0] < 0.51
    colours = ["Navy Blue", "Blue", "Red"]
    assert corrected("Nike Men Navy Blue Shirt", "Women", 0.9, "Red", 0.9, colours, 0.8, 0.8) == \
        "Nike Women Red Shirt"
    assert corrected("Nike Men Blue Shirt", "Women", 0.7, "Red", 0.7, colours, 0.8, 0.8) == "Nike Men Blue Shirt"
    assert corrected("Menthol Bluetooth Kit", "Women", 1.0, "Red", 1.0, colours, 0.0, 0.0) == \
        "Menthol Bluetooth Kit"  # whole words only


def test_length_grouping_probe_times_both_orders_of_the_same_captions():
    from bench.probe_length_grouping import measure

    lengths = [2 + (7 * i) % 25 for i in range(320)]
    out = measure([[11] * n for n in lengths], n_layer=1, batch_size=16, steps=2)
    assert out["captions"] == 320 and out["timed_steps"] == 2
    assert out["length_grouped_mean_batch_width"] < out["random_mean_batch_width"] <= max(lengths)
    assert out["random_samples_per_second"] > 0 and out["length_grouped_samples_per_second"] > 0
    assert out["speedup"] == round(out["length_grouped_samples_per_second"] / out["random_samples_per_second"], 2)


def test_brand_step_layout_probe_times_both_layouts_on_the_same_training():
    from bench.probe_brand_step_layout import measure

    out = measure(rounds=1, batches=3)
    assert out["timed_batches"] == 2 and out["contiguous_s_per_batch"] > 0 and out["channels_last_s_per_batch"] > 0
    ratio = out["contiguous_s_per_batch"] / out["channels_last_s_per_batch"]
    assert out["channels_last_speedup"] == pytest.approx(ratio, rel=1e-2)
    assert out["last_loss_gap"] < 1e-3  # the same three updates, rounded differently


def test_consensus_probe_scores_cider_like_pycocoevalcap_and_picks_by_weighted_agreement():
    import numpy as np

    from bench.probe_consensus import TrainingCider, mbr_picks
    from ris_core.metrics import cider_d

    names = ["Nike Men Blue Running Shoes", "Puma Men Black Sports Shoes", "Adidas Women Pink Top",
             "Nike Women Black Top", "Fila Men White Shoes"]
    hypotheses = ["Nike Men Black Running Shoes", "Puma Women Pink Top", "Nike Top", "Fila", "Adidas Men Shoes"]
    library = cider_d(hypotheses, names)[1]  # each against its own name, frequencies from the five names
    ours = TrainingCider(names)
    for hypothesis, name, expected in zip(hypotheses, names, library, strict=True):
        assert ours.matrix([hypothesis, name])[0, 1] == pytest.approx(expected, rel=1e-9)
    assert ours.matrix(["Nike Top", "Nike Top"])[0, 0] > ours.matrix(["Nike Top", "Puma Top"])[0, 1]

    pool = [{"text": t, "score": s} for t, s in (("Puma Men Red Shoes", 5.0), ("Nike Men Blue Shoes", 0.0),
                                                  ("Nike Men Blue Sports Shoes", 0.0))]
    sim = np.array([[1.0, 0.1, 0.1], [0.1, 1.0, 0.8], [0.1, 0.8, 1.0]])
    assert mbr_picks([pool], [sim], 0.1) == [0]  # a cold weighting: the best score alone
    assert mbr_picks([pool], [sim], float("inf")) == [1]  # all alike: the one most like the others (first of a tie)
    assert mbr_picks([[]], [np.zeros((0, 0))], 1.0) == [-1]  # no candidates: the caller keeps its own caption


def test_consensus_probe_says_which_evaluation_files_it_needs(tmp_path: Path):
    from bench.probe_consensus import main

    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "captions.csv").write_text("id,reference,generated\n")  # as the repository ships it
    with pytest.raises(SystemExit, match="no val_embeddings.npy, catalog_knn.npz: .* evaluate a copy"):
        main(["--run", str(tmp_path / "run")])


def test_novel_words_probe_splits_cider_by_first_word_and_scores_the_oracles_like_the_evaluation():
    import pandas as pd

    from bench.probe_novel_words import with_word_of, word_table
    from ris_core.metrics import cider_d

    references = ["Nike Men Blue Shoes", "Puma Women Red Top", "Fila Men White Shoes", "Nike Women Black Top"]
    generated = ["Nike Men Blue Sneakers", "Adidas Women Red Top", "Fila Men White Shoes", "Puma Women Black Shirt"]
    captions = pd.DataFrame({"reference": references, "generated": generated, "seen": [False, False, False, True],
                             "cider_d": cider_d(generated, references)[1]})
    assert with_word_of("Adidas Women Red Top", "Puma Women Red Top", 0) == "Puma Women Red Top"
    assert with_word_of("Nike Men Blue Sneakers", "Nike Men Blue Shoes", -1) == "Nike Men Blue Shoes"
    table = word_table(captions, "generated", "cider_d", ["Fila Men White Shoes", "Nike Men Grey Shoes"], target=3.0)
    novel, seen = table.loc["novel"], table.loc["seen"]
    assert novel["products"] == 3 and seen["products"] == 1
    assert novel["verbatim_training_name"] == pytest.approx(1 / 3)  # "Fila Men White Shoes" only
    assert novel["first_word_right"] == pytest.approx(2 / 3) and seen["first_word_right"] == 0
    assert novel["first_word_known_brand"] == pytest.approx(2 / 3)  # Puma starts no training name
    scores = captions["cider_d"]
    assert novel["cider_d_first_wrong"] == pytest.approx(scores[1])
    assert novel["cider_d_first_right"] == pytest.approx((scores[0] + scores[2]) / 2)
    oracle = cider_d(["Nike Men Blue Sneakers", "Puma Women Red Top", "Fila Men White Shoes",
                      "Nike Women Black Shirt"], references)[1]
    assert novel["oracle_first_word_cider_d"] == pytest.approx(sum(oracle[:3]) / 3)
    assert novel["oracle_first_word_cider_d"] > novel["cider_d"]  # the wrong brand of product 2 put right
    assert novel["first_word_right_needed"] == pytest.approx(
        (3.0 - scores[1]) / ((scores[0] + scores[2]) / 2 - scores[1]))


def test_weight_stream_counts_every_per_step_weight_once_and_its_floor_follows_from_the_rate():
    from PIL import Image

    from bench.captioning import weight_stream
    from ris_core.captioner import Captioner
    from ris_core.encoding_cache import EncodingCache
    from ris_core.modeling import ModelSpec, build_captioner

    spec = ModelSpec(n_layer=2, n_embd=64, n_head=2)
    model = build_captioner(spec).eval()
    captioner = Captioner(model=model, spec=spec, name="tiny")
    kept = captioner.encodings = EncodingCache(1 << 20)
    photos = [Image.new("RGB", (60, 80), (40 * i, 90, 200)) for i in range(3)]
    out = weight_stream(captioner, tokens_per_caption=10.0, repeats=50, photos=photos)
    assert captioner.encodings is kept  # the encoder was timed without it, then it was put back
    assert out["encoder_ms"] > 0
    assert out["with_encoder_images_per_second"] < out["decoder_floor_images_per_second"]
    d, vocab = 64, model.decoder.lm_head.weight.shape[0]
    # per block: self-attention 3d*d + d*d, cross-attention query and output 2 d*d, MLP 2 * 4d*d; then the output layer
    expected = (2 * (4 + 2 + 8) * d * d + vocab * d) * 4
    assert out["decoder_mb_per_step"] == round(expected / 1e6, 1)
    assert out["gb_per_second"] > 0
    assert out["decoder_floor_images_per_second"] == pytest.approx(
        out["gb_per_second"] * 1e9 / (expected * 10.0), rel=0.06)  # from the rounded rate


def test_brand_head_probe_learns_a_brand_the_maps_carry_and_reports_the_epoch_picked_on_its_own_set():
    import torch

    from bench.probe_brand_head import HEADS, train_head

    torch.manual_seed(0)

    def maps(labels: torch.Tensor) -> tuple:  # the brand shows in its own block of channels of both maps
        mid, final = torch.randn(len(labels), 96, 8, 8) * 0.5, torch.randn(len(labels), 1280, 4, 4) * 0.5
        for brand in range(3):
            mid[labels == brand, 30 * brand : 30 * (brand + 1)] += 1.0
            final[labels == brand, 100 * brand : 100 * (brand + 1)] += 1.0
        return mid.half(), final.half(), labels

    data = {part: maps(torch.randint(0, 3, (n,))) for part, n in (("fit", 1024), ("pick", 96), ("test", 96))}
    for name in HEADS:
        result = train_head(name, 3, data, epochs=4)
        assert result["head"] == name and len(result["pick_curve"]) == 4
        assert result["pick_accuracy"] == max(result["pick_curve"])
        assert result["pick_curve"][result["best_epoch"] - 1] == result["pick_accuracy"]
        assert result["test_accuracy"] > 0.8, result  # chance is a third
        assert torch.allclose(result["test_probabilities"].sum(1), torch.ones(96), atol=1e-4)


def test_brand_head_probe_flips_fit_maps_and_writes_each_products_likeliest_words_in_order(tmp_path):
    import pandas as pd
    import torch

    from bench.probe_brand_head import slug, train_head, write_predictions

    torch.manual_seed(0)
    fit = 2048
    labels = torch.randint(0, 2, (fit + 128,))
    noise, mid = torch.randn(fit + 128, 1280, 4, 4), torch.randn(fit + 128, 96, 8, 8)
    final = noise.clone()
    final[:, :50] += labels[:, None, None, None] * 2.0  # the brand in the photo's maps
    data = {"fit": (mid[:fit], final[:fit], labels[:fit]),
            "pick": (mid[fit : fit + 64], final[fit : fit + 64], labels[fit : fit + 64]),
            "test": (mid[fit + 64 :], final[fit + 64 :], labels[fit + 64 :])}
    # "mirrored" maps that show the other brand: drawn half of the time, they leave the head nothing to learn
    other = noise[:fit].clone()
    other[:, :50] += (1 - labels[:fit])[:, None, None, None] * 2.0
    plain = train_head("linear on the 4x4 final map", 2, data, epochs=3)
    mixed = train_head("linear on the 4x4 final map", 2, data, epochs=3, mirrored=(mid[:fit], other))
    assert plain["test_accuracy"] > 0.85 and mixed["test_accuracy"] < 0.7, (plain, mixed)
    assert slug("the stride-32 stage tuned, linear") == "the-stride-32-stage-tuned-linear"
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    write_predictions(tmp_path / "p" / "head.csv", [7, 9], ["adidas", "nike", "puma"], probs, top=2)
    written = pd.read_csv(tmp_path / "p" / "head.csv")
    assert written.to_dict("list") == {"id": [7, 9], "word_1": ["nike", "adidas"], "p_1": [0.6, 0.5],
                                       "word_2": ["puma", "puma"], "p_2": [0.3, 0.3]}
