"""Training end to end on tiny real data: loss falls, checkpoints round-trip, kills resume, errors are clear."""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps

from ris_core.encoder_decoder import Captioner, _padded
from ris_core.modeling import (
    CheckpointError,
    ModelSpec,
    build_captioner,
    load_model_dir,
    save_captioner,
    sequence_log_likelihoods,
    token_cross_entropy,
)
from ris_core.rerank import RerankConfig, candidate_pool, rerank
from ris_core.runs import RunError
from tests.conftest import REPO, tiny_train_args
from training.train import TrainableCaptioner, main, open_run_dir

pytestmark = pytest.mark.slow


def run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "training.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_tiny_run_learns_and_describes_itself(tiny_run: Path):
    history = pd.read_csv(tiny_run / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0] < 11.0  # ln(50257) = 10.8 at random
    assert (history["val_perplexity"] - history["val_loss"].map(math.exp)).abs().max() < 1e-6
    info = json.loads((tiny_run / "run.json").read_text())
    assert info["status"] == "complete" and info["best_epoch"] == int(history.loc[history.val_loss.idxmin(), "epoch"])
    assert info["data"]["rows"] == 160 and len(info["data"]["ids_sha256"]) == 64
    split = json.loads((tiny_run / "split.json").read_text())
    assert len(split["val_ids"]) == 32 and not set(split["val_ids"]) & set(split["train_ids"])
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "preprocessor_config.json"):
        assert (tiny_run / "model" / name).is_file(), name


def test_started_is_when_the_command_began_so_map_extraction_counts(tiny_catalog: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    import training.train as train

    real, extraction_began = train.cached_backbone_maps, []

    def slow_extraction(*args, **kwargs):
        extraction_began.append(time.strftime("%Y-%m-%dT%H:%M:%S"))
        time.sleep(1.1)  # a real run's extraction takes minutes; a timestamp after it would be a later second
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "cached_backbone_maps", slow_extraction)
    run = main(tiny_train_args(tiny_catalog, tmp_path / "runs", tmp_path / "cache", epochs=1))
    info = json.loads((run / "run.json").read_text())
    assert info["started"] <= extraction_began[0] < info["finished"]


def test_the_captioners_datasets_leave_memory_before_the_brand_step_loads_its_own_maps(
        tiny_catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import training.train as train

    made, alive_at_step = [], []

    class Recorded(train.CaptionDataset):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    def fit_brand_step(*args):  # stands in for the step: only asks what the process still holds
        gc.collect()
        alive_at_step.extend(ref for ref in made if ref() is not None)

    monkeypatch.setattr(train, "CaptionDataset", Recorded)
    monkeypatch.setattr(train, "fit_brand_step", fit_brand_step)
    main([*tiny_train_args(tiny_catalog, tmp_path / "runs", tmp_path / "cache", epochs=1), "--brand_step_epochs", "1"])
    assert len(made) == 2 and not alive_at_step  # on the whole data: 13.5 -> 4.8 GiB held while the step trains


def test_shortlist_loss_equals_the_exported_models_full_softmax(tiny_run: Path):
    """The 7x cheaper training loss is exact: the saved plain model gives the same number."""
    model, spec = load_model_dir(tiny_run / "model")
    base = build_captioner(spec)
    trainable = TrainableCaptioner(config=base.config, encoder=base.encoder, decoder=base.decoder)
    trainable.load_state_dict(model.state_dict(), strict=False)
    trainable.set_output_shortlist({11, 22, 33, 50256})
    with torch.no_grad():
        trainable.other_embedding.normal_()
    trainable.eval()
    trainable.sync_other_rows()
    labels = torch.tensor([[11, 22, 4000, 50256], [33, 99, 50256, -100]])
    pixels = torch.randn(2, 3, spec.image_size, spec.image_size)
    with torch.no_grad():
        fast = trainable(labels=labels, pixel_values=pixels).loss
        plain = VisionEncoderDecoder_loss(trainable, pixels, labels)
    assert fast.item() == pytest.approx(plain, rel=1e-5)


def VisionEncoderDecoder_loss(model, pixels, labels) -> float:  # noqa: N802 - the plain transformers path
    from transformers import VisionEncoderDecoderModel

    plain = VisionEncoderDecoderModel(config=model.config, encoder=model.encoder, decoder=model.decoder)
    return plain(pixel_values=pixels, labels=labels).loss.item()


def test_candidate_scores_are_the_models_log_likelihood_whatever_else_is_in_the_batch(tiny_run: Path,
                                                                                        tiny_catalog: Path):
    captioner = Captioner.load(tiny_run)
    image = Image.open(next((tiny_catalog / "images").glob("*.jpg")))
    candidates = ["Nike Men Black Shoes", "Puma Women Blue Printed Round Neck T-shirt", ""]
    together = captioner.log_likelihoods([image, image], [candidates, candidates[::-1]])
    alone = [captioner.log_likelihoods([image], [[text]])[0][0] for text in candidates]
    assert together[0] == pytest.approx(alone, abs=1e-4) and together[1] == pytest.approx(alone[::-1], abs=1e-4)
    assert all(score < 0 for score in alone)
    # the same numbers as the loss: summed log-likelihood = -(mean token cross-entropy x tokens)
    hidden = captioner.encode([image]).hidden
    loss, tokens = token_cross_entropy(captioner.model, hidden, _padded(captioner.token_ids([candidates[1]])))
    assert alone[1] == pytest.approx(-loss.item() * tokens, rel=1e-4)


def test_one_encoder_pass_and_shared_cross_attention_give_the_same_scores(tiny_run: Path, tiny_catalog: Path):
    captioner = Captioner.load(tiny_run)
    images = [Image.open(p).convert("RGB") for p in sorted((tiny_catalog / "images").glob("*.jpg"))[:3]]
    encoded = captioner.encode(images)
    assert captioner.encode(encoded) is encoded  # an encoded batch is not encoded again
    texts = [["Nike Men Black Shoes", "Red Shirt"], ["Blue Jeans"], ["Puma Women Blue Printed Round Neck T-shirt"]]
    for a, b in zip(captioner.log_likelihoods(encoded, texts), captioner.log_likelihoods(images, texts), strict=True):
        assert list(a) == pytest.approx(list(b), abs=1e-5)
    assert captioner.n_best(encoded, 3) == captioner.n_best(images, 3)
    # cross-attention keys and values gathered per caption == each caption given its image's states
    labels = _padded(captioner.token_ids(["Red Shirt", "Blue Jeans", "Nike Men Black Shoes", "Red Shirt"]))
    rows = torch.tensor([2, 0, 1, 0])
    with torch.no_grad():
        shared = sequence_log_likelihoods(captioner.model, encoded.hidden, labels, rows)
        repeated = sequence_log_likelihoods(captioner.model, encoded.hidden[rows], labels)
    assert shared.tolist() == pytest.approx(repeated.tolist(), abs=1e-5)
    # the same caption under another image scores otherwise (by 10x the tolerance above; the tiny model is random)
    assert abs(float(shared[0]) - float(shared[3])) > 1e-4


def test_rerank_scores_likelihood_mirror_view_visual_evidence_and_length(tiny_run: Path, tiny_catalog: Path):
    captioner = Captioner.load(tiny_run)
    image = Image.open(next((tiny_catalog / "images").glob("*.jpg"))).convert("RGB")
    neighbours = [("Puma Women Blue Printed Round Neck T-shirt", 0.9), ("Nike Men Black Shoes", 0.5)]
    plain = RerankConfig(num_beams=0, mirror=False, visual_weight=0.0, length_weight=0.0)
    [ranked] = rerank(captioner, [image], ["Nike Men Black Shoes"], [neighbours], plain)
    assert {c.text for c in ranked} == {name for name, _ in neighbours}  # the greedy caption is a neighbour's name
    alone = captioner.log_likelihoods([image], [[c.text for c in ranked]])[0]
    assert [c.score for c in ranked] == pytest.approx(sorted(alone, reverse=True), abs=1e-4)
    # both views: the likelihood adds the mirror image's
    [both] = rerank(captioner, [image], ["Nike Men Black Shoes"], [neighbours], replace(plain, mirror=True))
    mirrored = captioner.log_likelihoods([ImageOps.mirror(image)], [[c.text for c in both]])[0]
    direct = captioner.log_likelihoods([image], [[c.text for c in both]])[0]
    assert [c.log_likelihood for c in both] == pytest.approx(list(direct + mirrored), abs=1e-4)
    # overwhelming visual evidence picks the nearest image's name; a length bonus counts words
    [visual] = rerank(captioner, [image], ["Nike Men Black Shoes"], [neighbours], replace(plain, visual_weight=1e4))
    assert visual[0].text == neighbours[0][0] and visual[0].similarity == 0.9
    [longer] = rerank(captioner, [image], ["Nike Men Black Shoes"], [neighbours], replace(plain, length_weight=1e4))
    assert longer[0].text == neighbours[0][0]
    # beam hypotheses join the pool; no candidates at all gives an empty list
    [beamed] = rerank(captioner, [image], [""], [[]], replace(plain, num_beams=3))
    assert 1 <= len(beamed) <= 3 and all(c.generated and c.text for c in beamed)
    assert rerank(captioner, [image], [""], [[]], plain) == [[]]


def test_candidate_pool_keeps_each_text_once_with_its_best_evidence():
    neighbours = [("Blue Jeans", 0.8), ("Red Top", 0.6), ("Blue Jeans", 0.7)]
    pool = candidate_pool([" Red Shirt", "Blue Jeans", ""], neighbours, margin=0.05)
    assert pool == {"Blue Jeans": (0.8, False), "Red Top": (0.6, False), "Red Shirt": (pytest.approx(0.55), True)}
    assert candidate_pool(["Red Shirt"], [], margin=0.02) == {"Red Shirt": (-0.02, True)}


def test_save_load_round_trip_gives_identical_logits(tmp_path: Path):
    spec = ModelSpec(n_layer=1, n_embd=64, n_head=2)
    model = build_captioner(spec).eval()
    save_captioner(model, spec, tmp_path / "model", half=False)
    loaded, loaded_spec = load_model_dir(tmp_path / "model")
    assert loaded_spec == spec
    pixels, labels = torch.randn(2, 3, 128, 128), torch.tensor([[5, 6, 50256], [7, 50256, -100]])
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels, labels=labels).logits,
                           loaded(pixel_values=pixels, labels=labels).logits)


def test_fp16_export_stays_close_and_small(tiny_run: Path):
    size = (tiny_run / "model" / "model.safetensors").stat().st_size
    model, _ = load_model_dir(tiny_run / "model")
    params = sum(p.numel() for p in model.parameters())
    assert size < params * 2 * 1.05  # fp16, tied embedding stored once


@pytest.mark.parametrize("damage", ["truncated", "missing_config", "other_architecture"])
def test_damaged_checkpoints_raise_clear_errors(tiny_run: Path, tmp_path: Path, damage: str):
    import shutil

    model_dir = shutil.copytree(tiny_run / "model", tmp_path / "model")
    if damage == "truncated":
        weights = model_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
    elif damage == "missing_config":
        (model_dir / "config.json").unlink()
    else:
        (model_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError):
        Captioner.load(model_dir)


def test_kill_minus_nine_then_same_command_resumes(tiny_catalog: Path, tmp_path: Path):
    args = tiny_train_args(tiny_catalog, tmp_path / "runs", tmp_path / "cache", name="killed", epochs=3)
    run_dir = tmp_path / "runs" / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "training.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not list((run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json")):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    assert saved, "no checkpoint appeared before the kill"
    first = pd.read_csv(run_dir / "history.csv")
    assert first["epoch"].tolist()[0] == 1

    done = run_cli(args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming run" in done.stderr
    history = pd.read_csv(run_dir / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]  # no duplicate, no gap
    assert history.loc[0, "val_loss"] == pytest.approx(first.loc[0, "val_loss"])  # epoch 1 kept, not redone
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_a_different_run_in_the_output_folder_is_refused_untouched(tiny_run: Path):
    before = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*") if p.is_file()}
    args = tiny_train_args(Path("unused"), tiny_run.parent, Path("unused"), name=tiny_run.name, epochs=5)
    with pytest.raises(RunError, match="different run"):
        main(args)
    assert before == {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*") if p.is_file()}


def test_a_run_recorded_before_an_argument_existed_resumes_with_that_arguments_old_value(tmp_path: Path):
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"args": {"epochs": 10}}))  # written before --flip_p existed
    assert open_run_dir(run_dir, {"epochs": 10, "flip_p": 0.0}) is True
    with pytest.raises(RunError, match="differs in: flip_p 0.0 there, 0.5 now"):
        open_run_dir(run_dir, {"epochs": 10, "flip_p": 0.5})
    assert json.loads((run_dir / "run.json").read_text()) == {"args": {"epochs": 10}}


def test_paper_preset_offline_says_so_in_one_line(tmp_path: Path):
    done = run_cli(["--preset", "paper", "--results_dir", str(tmp_path), "--run_name", "paper"])
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach the Hugging Face Hub") and "--preset cpu" in last


def test_missing_data_folder_is_one_clear_line(tmp_path: Path):
    done = run_cli(["--data_dir", str(tmp_path / "nowhere"), "--results_dir", str(tmp_path), "--n_layer", "1"])
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "does not exist" in done.stderr.strip().splitlines()[-1]



def test_larger_photos_replace_a_share_of_the_rows_that_have_one_and_no_other_row():
    from training.data import CaptionDataset, LargerPhotos

    n = 400
    mid, final = torch.zeros(n, 2, 3, 4), torch.zeros(n, 5, 2, 2)
    mid_m, final_m = torch.full((n, 2, 3, 4), 2.0), torch.full((n, 5, 2, 2), 2.0)
    # rows 0..199 have a larger photo (row i -> larger row i); the larger maps hold their row number + 10
    big_mid = torch.arange(200.0).view(200, 1, 1, 1).expand(200, 2, 3, 4) + 10
    big_final = torch.arange(200.0).view(200, 1, 1, 1).expand(200, 5, 2, 2) + 10
    big_mirrored = (-big_mid, -big_final)
    row = torch.tensor([i if i < 200 else -1 for i in range(n)])
    data = CaptionDataset([[1]] * n, maps=(mid, final), mirrored_maps=(mid_m, final_m),
                          larger=LargerPhotos(row, (big_mid, big_final), big_mirrored, p=0.5))
    torch.manual_seed(0)
    items = [data[i] for i in range(n)]
    shown = [bool(it["mid"].max() >= 10) for it in items]
    assert not any(shown[200:])  # no larger photo, never swapped
    assert 60 < sum(shown[:200]) < 140
    for i, it in enumerate(items):  # both scales and the mirrored pair come from the same photo of the same product
        if shown[i]:
            assert torch.equal(it["final"], big_final[i]) and torch.equal(it["mid_mirrored"], -big_mid[i])
        else:
            assert torch.equal(it["final"], final[i]) and torch.equal(it["mid_mirrored"], mid_m[i])
    always = CaptionDataset([[1]] * n, maps=(mid, final),
                            larger=LargerPhotos(row, (big_mid, big_final), None, p=1.0))
    assert torch.equal(always[5]["mid"], big_mid[5]) and "mid_mirrored" not in always[5]


def test_training_with_a_folder_of_larger_photos(tiny_catalog: Path, tmp_path: Path):
    larger = tmp_path / "larger"
    (larger / "images").mkdir(parents=True)
    for path in sorted((tiny_catalog / "images").glob("*.jpg"))[::2]:  # half the products, photos twice the size
        with Image.open(path) as im:
            im.resize((im.width * 2, im.height * 2)).save(larger / "images" / path.name)
    done = run_cli([*tiny_train_args(tiny_catalog, tmp_path / "runs", tmp_path / "cache", epochs=1),
                    "--larger_images_dir", str(larger)], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shown = next(line for line in done.stderr.splitlines() if "larger photos:" in line)
    n_train = len(json.loads((tmp_path / "runs" / "tiny" / "split.json").read_text())["train_ids"])
    assert f"of {n_train} training products" in shown and 40 < int(shown.split("larger photos: ")[1].split()[0]) < 90
    info = json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())
    assert info["args"]["larger_images_dir"] == str(larger)
    other_split = run_cli([*tiny_train_args(tiny_catalog, tmp_path / "runs", tmp_path / "cache", "other", epochs=1),
                           "--larger_images_dir", str(larger), "--split_seed", "1"], timeout=300)
    assert other_split.returncode == 0 and "extracting" not in other_split.stderr  # the first split's files serve
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    refused = run_cli([*tiny_train_args(tiny_catalog, tmp_path / "runs2", tmp_path / "cache", epochs=1),
                       "--larger_images_dir", str(empty)])
    assert refused.returncode != 0 and "none of the" in refused.stderr.strip().splitlines()[-1]


def test_training_with_jittered_views(tiny_catalog: Path, tmp_path: Path):
    args = tiny_train_args(tiny_catalog, tmp_path / "runs", tmp_path / "cache", epochs=1)
    done = run_cli([*args, "--jitter_views", "2"], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    n_train = len(json.loads((tmp_path / "runs" / "tiny" / "split.json").read_text())["train_ids"])
    assert f"jittered views: {n_train} of {n_train} training products, 2 views" in done.stderr
    assert len(list((tmp_path / "cache" / "features").glob("*-jitter[01].safetensors"))) == 2
    info = json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())
    assert info["args"]["jitter_views"] == 2 and info["status"] == "complete"
    refused = run_cli([*args, "--jitter_views", "1", "--cache_features", "false", "--run_name", "other"])
    assert refused.returncode != 0 and "--jitter_views works on cached" in refused.stderr
    files = sorted((tmp_path / "cache" / "features").glob("*.safetensors"))
    other_split = run_cli([*args, "--jitter_views", "2", "--split_seed", "1", "--run_name", "other-split"], timeout=300)
    assert other_split.returncode == 0, other_split.stderr[-2000:]
    assert json.loads((tmp_path / "runs" / "other-split" / "split.json").read_text())["train_ids"] != json.loads(
        (tmp_path / "runs" / "tiny" / "split.json").read_text())["train_ids"]
    assert "extracting" not in other_split.stderr  # every view of every product was extracted for the first split
    assert sorted((tmp_path / "cache" / "features").glob("*.safetensors")) == files


def test_a_products_jittered_view_does_not_depend_on_the_products_beside_it(tiny_catalog: Path):
    from ris_core.data import load_catalog
    from ris_core.modeling import ModelSpec
    from training.data import decode_images

    catalog, spec = load_catalog(tiny_catalog), ModelSpec()
    ids = [int(i) for i in catalog.products.index[:6]]
    together, kept, _ = decode_images(catalog, ids, spec, jitter_seed=0)
    alone, _, _ = decode_images(catalog, ids[3:4], spec, jitter_seed=0)
    assert kept == ids and torch.equal(together[3], alone[0])
    other_seed, _, _ = decode_images(catalog, ids[3:4], spec, jitter_seed=1)
    assert not torch.equal(alone[0], other_seed[0])


def test_jitter_is_a_seeded_crop_rescale_and_mirror_that_keeps_most_of_the_photo():
    import numpy as np

    from training.data import JITTER_AREA, JITTER_MARGIN, jitter

    photo = Image.new("RGB", (60, 80), (255, 255, 255))
    photo.paste((200, 0, 0), (0, 0, 30, 80))  # left half red: a mirror shows on the right
    draws = [jitter(photo, np.random.default_rng(seed)) for seed in range(40)]
    again = [jitter(photo, np.random.default_rng(seed)) for seed in range(40)]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(draws, again))  # the same view every time
    assert len({d.size for d in draws}) > 10  # framings differ
    for d in draws:  # never more than the margin added, never less than the smallest crop keeps
        assert d.width * d.height <= 60 * 80 * (1 + JITTER_MARGIN) ** 2 + 200
        assert d.width * d.height >= 60 * 80 * JITTER_AREA[0] * 0.8
    red_on_right = [np.asarray(d)[:, -3:, 1].mean() < 100 for d in draws]
    assert 8 < sum(red_on_right) < 32  # about half are mirrored
    tiny = jitter(Image.new("RGB", (1, 1)), np.random.default_rng(0))  # a 1-px photo still gives an image
    assert tiny.width >= 1 and tiny.height >= 1


def test_jittered_views_replace_a_share_of_the_rows_and_are_not_mirrored_again():
    from training.data import CaptionDataset, JitteredViews, make_collator

    n = 400
    mid, final = torch.zeros(n, 2, 3, 4), torch.zeros(n, 5, 2, 2)
    mid_m, final_m = torch.full((n, 2, 3, 4), 2.0), torch.full((n, 5, 2, 2), 2.0)
    views = [(torch.full((300, 2, 3, 4), 10.0 + v) + torch.arange(300.0).view(300, 1, 1, 1) * 100,
              torch.full((300, 5, 2, 2), 10.0 + v)) for v in range(2)]
    row = torch.tensor([i if i < 300 else -1 for i in range(n)])
    data = CaptionDataset([[1]] * n, maps=(mid, final), mirrored_maps=(mid_m, final_m),
                          jittered=JitteredViews(row, views, p=0.5))
    torch.manual_seed(0)
    items = [data[i] for i in range(n)]
    shown = [bool(it["final"].max() >= 10) for it in items]
    assert not any(shown[300:]) and 100 < sum(shown[:300]) < 200
    used = {int(it["final"].max()) - 10 for it in items if it["final"].max() >= 10}
    assert used == {0, 1}  # both views are drawn
    for i, it in enumerate(items):
        if shown[i]:  # the product's own row of the view, both scales from the same view
            v = int(it["final"].max()) - 10
            assert torch.equal(it["mid"], views[v][0][i]) and torch.equal(it["mid_mirrored"], it["mid"])
    batch = make_collator(ModelSpec(), flip_p=1.0)([items[i] for i in range(300) if shown[i]])
    assert bool((batch["final"] >= 10).all())  # a flip keeps a jittered view as it was drawn


def test_flip_augmentation_swaps_in_mirrored_maps_for_a_share_of_the_training_batch():
    from training.data import make_collator

    spec = ModelSpec()
    mid, final = torch.randn(64, 2, 3, 4), torch.randn(64, 5, 2, 2)
    mid_m, final_m = torch.randn(64, 2, 3, 4), torch.randn(64, 5, 2, 2)
    items = [{"labels": [1, 2], "mid": mid[i], "final": final[i], "mid_mirrored": mid_m[i],
              "final_mirrored": final_m[i]} for i in range(64)]
    plain = make_collator(spec)(items)
    assert torch.equal(plain["mid"], mid) and torch.equal(plain["final"], final)  # validation: untouched
    torch.manual_seed(0)
    flipped = make_collator(spec, flip_p=0.5)(items)
    swapped = torch.tensor([torch.equal(flipped["mid"][i], mid_m[i]) for i in range(64)])
    kept = torch.tensor([torch.equal(flipped["mid"][i], mid[i]) for i in range(64)])
    assert (swapped | kept).all() and 16 < int(swapped.sum()) < 48
    for i in range(64):  # both scales of one image are swapped together, and its caption never changes
        assert torch.equal(flipped["final"][i], final_m[i] if swapped[i] else final[i])
    assert torch.equal(flipped["labels"], plain["labels"])
    pixels = make_collator(spec, flip_p=1.0)([{"labels": [1], "pixels": torch.arange(12, dtype=torch.uint8)
                                              .view(1, 2, 6).expand(3, 2, 6)}])["pixel_values"]
    reference = make_collator(spec)([{"labels": [1], "pixels": torch.arange(12, dtype=torch.uint8)
                                      .view(1, 2, 6).expand(3, 2, 6)}])["pixel_values"]
    assert torch.equal(pixels, reference.flip(-1))


def test_length_grouped_batches_hold_captions_of_similar_length_in_random_order(tmp_path: Path):
    from transformers import TrainingArguments

    from training.data import CaptionDataset
    from training.train import CaptionTrainer

    base = build_captioner(ModelSpec(n_layer=1, n_embd=64, n_head=2))
    model = TrainableCaptioner(config=base.config, encoder=base.encoder, decoder=base.decoder)
    lengths = torch.randint(2, 30, (650,), generator=torch.Generator().manual_seed(0)).tolist()
    dataset = CaptionDataset([[7] * n for n in lengths], maps=(torch.zeros(650, 1), torch.zeros(650, 1)))
    widths = {}
    for strategy in ("random", "group_by_length"):
        args = TrainingArguments(output_dir=str(tmp_path / strategy), per_device_train_batch_size=16, use_cpu=True,
                                 report_to=[], train_sampling_strategy=strategy)
        torch.manual_seed(0)
        order = list(CaptionTrainer(model=model, args=args, train_dataset=dataset)._get_train_sampler())
        assert sorted(order) == list(range(650))  # every row once per epoch
        widths[strategy] = [max(lengths[i] for i in order[k : k + 16]) for k in range(0, 640, 16)]
    # the padded width a batch costs: close to the mean length when grouped, near the maximum when not
    assert sum(widths["group_by_length"]) < 0.7 * sum(widths["random"])
    # ... and the batches come in random order, not longest to shortest 10 batches at a time as Trainer's own
    # sampler gives them (at most 3 steps up in 40 batches there)
    steps_up = sum(b > a for a, b in zip(widths["group_by_length"], widths["group_by_length"][1:]))
    assert steps_up >= 10


def test_training_with_length_grouped_batches(tiny_catalog: Path, tmp_path: Path):
    args = tiny_train_args(tiny_catalog, tmp_path / "runs", tmp_path / "cache", epochs=1)
    done = run_cli([*args, "--group_by_length", "true"], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())
    assert info["args"]["group_by_length"] is True and info["status"] == "complete"


def test_length_grouped_training_weighs_every_token_alike_across_batches():
    base = build_captioner(ModelSpec(n_layer=1, n_embd=64, n_head=2))
    model = TrainableCaptioner(config=base.config, encoder=base.encoder, decoder=base.decoder).train()
    mid, final = torch.randn(4, 96, 8, 8), torch.randn(4, 1280, 4, 4)
    labels = torch.full((4, 6), -100)
    labels[:, :3] = torch.randint(0, 5000, (4, 3))  # 12 tokens, 3 a caption
    torch.manual_seed(0)
    per_token_mean = model(labels=labels, mid=mid, final=final).loss
    model.tokens_per_caption = 6.0  # the training set's mean: this batch's captions are half as long
    torch.manual_seed(0)  # the same dropout
    weighted = model(labels=labels, mid=mid, final=final).loss
    assert torch.allclose(weighted, per_token_mean * 12 / (4 * 6.0))
    assert model.token_count == 24 and abs(model.loss_sum - 24 * per_token_mean.item()) < 1e-3  # the running mean
    model.eval()  # validation stays a mean per token
    evaluated = model(labels=labels, mid=mid, final=final).loss
    model.tokens_per_caption = None
    assert torch.equal(model(labels=labels, mid=mid, final=final).loss, evaluated)
