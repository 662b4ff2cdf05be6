"""The brand step (ris_core/brand_step.py): forced-prefix decoding, the step's file, the joint choice of the first
word, and its training (training/train_brand_step.py), which resumes after a kill where it stopped."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, update_bn

from ris_core import decoding
from ris_core.brand_step import FILE, BrandStep, first_word, written_forms
from ris_core.draft import NameDraft
from ris_core.encoder_decoder import Captioner
from ris_core.errors import CheckpointError, RunError
from ris_core.evaluation.pipeline import model_digest
from ris_core.modeling import ModelSpec, build_captioner, token_cross_entropy
from ris_core.runs import Run
from tests.conftest import tiny_train_args
from training.train import main as train_main
from training.train_brand_step import LR, Checkpoint, Views, main, pick_by_name, train


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    torch.manual_seed(0)
    spec = ModelSpec(n_layer=2, n_embd=64, n_head=2)
    return Captioner(model=build_captioner(spec).eval(), spec=spec, name="untrained")


def photos(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (60, 80), (60 * i % 256, 90, 200 - 30 * i)) for i in range(n)]


def test_first_words_are_normalised_and_written_as_most_training_names_write_them():
    assert first_word("U.S. Polo Assn Men Shirt") == "us" and first_word("") == ""
    assert written_forms(["U.S. Polo Assn Men Shirt", "U.S. Polo Assn Women Top", "US Polo Kids Cap",
                          "Nike Men Shoes", ""]) == {"us": "U.S.", "nike": "Nike"}


def test_forced_prefixes_come_first_and_greedy_decoding_goes_on_after_them(captioner: Captioner):
    hidden = captioner.encode(photos(3)).hidden
    # an untrained model may end at once: with no end token its captions run to the length limit
    decoder, start, eos = captioner.model.decoder, captioner.start_token_id, -1
    plain = decoding.greedy(decoder, hidden, start, eos, 12)
    assert decoding.greedy(decoder, hidden, start, eos, 12, [[], [], []]) == plain
    assert all(len(caption) == 12 for caption in plain)
    # each image's own first two greedy tokens forced change nothing; others come first, of mixed lengths
    assert decoding.greedy(decoder, hidden, start, eos, 12, [c[:2] for c in plain]) == plain
    forced = decoding.greedy(decoder, hidden, start, eos, 12, [[11], [13, 14], []])
    assert forced[0][:1] == [11] and forced[1][:2] == [13, 14] and forced[2] == plain[2]
    assert all(len(caption) == 12 for caption in forced) and forced[:2] != plain[:2]
    # one image at a time with a draft of guesses: the same captions
    draft = NameDraft([[11, 5, 6, 7], [13, 14, 8]], eos)
    for image, prefix in enumerate([[11], [13, 14]]):
        alone = decoding.drafted_greedy(decoder, hidden[image : image + 1], start, eos, 12, draft, prefix=prefix)
        assert alone == forced[image]
    with pytest.raises(ValueError, match="2 prefixes for 3 images"):
        decoding.greedy(decoder, hidden, start, eos, 12, [[1], [2]])


def test_a_prefix_log_probability_is_what_a_full_forward_pass_gives(captioner: Captioner):
    hidden = captioner.encode(photos(3)).hidden
    prefixes = [[11, 12], [13], [15, 16, 17]]
    log_probs = decoding.prefix_log_probs(captioner.model.decoder, hidden, captioner.start_token_id, prefixes)
    for image, prefix in enumerate(prefixes):
        with torch.no_grad():
            loss, tokens = token_cross_entropy(captioner.model, hidden[image : image + 1], torch.tensor([prefix]),
                                               captioner.start_token_id)
        assert float(log_probs[image]) == pytest.approx(-loss.item() * tokens, abs=1e-4)
    # an image's candidates together (rows grouped by image), of mixed lengths: the same log-probabilities
    grouped = decoding.prefix_log_probs(captioner.model.decoder, hidden[:2], captioner.start_token_id,
                                        [[11, 12], [15, 16, 17], [13], [11, 12]], group=2)
    alone = [decoding.prefix_log_probs(captioner.model.decoder, hidden[[i]], captioner.start_token_id, [p])
             for i, p in ((0, [11, 12]), (0, [15, 16, 17]), (1, [13]), (1, [11, 12]))]
    assert torch.allclose(grouped, torch.cat(alone), atol=1e-4) and grouped[0] != grouped[3]
    with pytest.raises(ValueError, match="empty"):
        decoding.prefix_log_probs(captioner.model.decoder, hidden[:1], captioner.start_token_id, [[]])
    with pytest.raises(ValueError, match="3 prefixes for 2 images of 2"):
        decoding.prefix_log_probs(captioner.model.decoder, hidden[:2], captioner.start_token_id, [[1]] * 3, 2)


def test_a_saved_step_loads_the_same_and_a_broken_one_is_a_clear_error(tmp_path: Path):
    torch.manual_seed(0)
    step = BrandStep(["Nike", "Puma", "U.S."]).eval()
    assert BrandStep.load(tmp_path) is None  # none saved: caption without one
    step.save(tmp_path)
    loaded = BrandStep.load(tmp_path)
    mid = torch.randn(4, 96, 8, 8)
    assert loaded.words == ["Nike", "Puma", "U.S."] and torch.equal(loaded(mid), step(mid))
    data = (tmp_path / FILE).read_bytes()
    (tmp_path / FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable brand step"):
        BrandStep.load(tmp_path)
    BrandStep(["Nike", "Puma"]).save(tmp_path)  # another step's weights under these words: shapes differ
    (tmp_path / FILE).write_bytes((tmp_path / FILE).read_bytes().replace(b'[\\"Nike\\", \\"Puma\\"]',
                                                                         b'[\\"Nike\\", \\"Pum\\", \\"x\\"]'))
    with pytest.raises(CheckpointError, match="not a readable brand step"):
        BrandStep.load(tmp_path)


def test_the_step_averages_the_photo_and_its_mirror_image(captioner: Captioner, monkeypatch):
    torch.manual_seed(0)
    step = BrandStep(["Nike", "Puma", "Roadster"]).eval()
    mid, mirrored = torch.randn(2, 96, 8, 8), torch.randn(2, 96, 8, 8)
    expected = (step(mid).log_softmax(1) + step(mirrored).log_softmax(1)) / 2
    assert torch.allclose(step.log_probs(mid, mirrored), expected)
    assert torch.allclose(step.likeliest(mid, mirrored, k=2)[0], expected.topk(2, dim=1).values)
    seen: list[list[Image.Image]] = []
    encoder_parts = captioner._encoder_parts
    monkeypatch.setattr(captioner, "_encoder_parts", lambda images: seen.append(images) or encoder_parts(images))
    monkeypatch.setattr(captioner, "brand_step", step)
    image = Image.new("RGB", (60, 80), "white")
    image.paste((200, 0, 0), (0, 0, 20, 80))  # a red stripe on the left
    assert captioner.first_word_tokens([image], captioner.encode([image])) is not None
    assert [im.getpixel((5, 40)) for im in (seen[0][0], seen[1][0])] == [(200, 0, 0), (255, 255, 255)]
    assert seen[1][0].getpixel((55, 40)) == (200, 0, 0)  # the second pass saw the mirror image


def test_the_caption_begins_with_the_word_the_step_and_the_decoder_agree_on(captioner: Captioner):
    words = ["Nike", "Puma", "Roadster"]
    step = BrandStep(words).eval()
    torch.nn.init.zeros_(step.out[1].weight)
    images = photos(2)
    try:
        captioner.brand_step = step
        # a step sure of one word: every caption begins with it, batched or one image at a time with a draft
        step.out[1].bias.data = torch.tensor([0.0, 40.0, 0.0])
        assert all(c.startswith("Puma") for c in captioner.caption(images))
        captioner.draft = captioner.draft_from(["Nike Men Shoes"])
        assert captioner.caption(images[:1], batch_size=1)[0].startswith("Puma")
        captioner.draft = None
        # a step with no preference: the decoder's likeliest of the three words
        step.out[1].bias.data = torch.zeros(3)
        encoded = captioner.encode(images)
        tokens = [captioner.token_ids([w])[0][:-1] for w in words]
        for image, caption in enumerate(captioner.caption(images)):
            scores = decoding.prefix_log_probs(captioner.model.decoder, encoded.hidden[[image]],
                                               captioner.start_token_id, tokens, group=3)
            assert caption.startswith(words[int(scores.argmax())])
    finally:
        captioner.brand_step, captioner.draft = None, None


@pytest.mark.parametrize(("mixup", "pick_set"), [(0.0, True), (0.4, True), (0.0, False)])
def test_training_resumed_after_a_kill_ends_where_an_uninterrupted_run_does(tmp_path: Path, mixup: float,
                                                                            pick_set: bool):
    torch.manual_seed(1)
    words = ["Nike", "Puma"]
    mid, labels = torch.randn(40, 96, 4, 4), torch.randint(0, 2, (40,))
    mid[labels == 1] += 0.5  # a learnable difference
    fit, pick = (mid[:32], labels[:32]), (mid[32:], labels[32:]) if pick_set else None
    has_larger = torch.arange(32) % 2 == 0  # a view only some products have
    views = Views(["mirrored", "larger"], [mid[:32].flip(-1), mid[:32] * 1.1],
                  torch.stack([torch.ones(32, dtype=torch.bool), has_larger]))

    def fresh() -> BrandStep:
        torch.manual_seed(0)
        return BrandStep(words)

    class KilledAfter(Checkpoint):
        def save(self, *args) -> None:
            super().save(*args)
            if len(args[-1]["pick_curve"]) == 2:
                raise KeyboardInterrupt

    whole = fresh()
    result = train(whole, fit, pick, epochs=3, views=views, checkpoint=Checkpoint(tmp_path / "whole"),
                   average_last=2, mixup=mixup)
    checkpoint = Checkpoint(tmp_path / "checkpoints")
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), fit, pick, epochs=3, views=views, checkpoint=KilledAfter(checkpoint.tensors.parent),
              average_last=2, mixup=mixup)
    resumed = fresh()
    again = train(resumed, fit, pick, epochs=3, views=views, checkpoint=checkpoint, average_last=2, mixup=mixup)
    assert again == result and len(result["pick_curve"]) == (3 if pick_set else 0)
    for name, tensor in whole.state_dict().items():  # the kept weights (the best epoch's or the average)
        assert torch.allclose(resumed.state_dict()[name].float(), tensor.float(), atol=1e-6), name
    # and the third epoch's, whichever was best: the optimizer's moments were restored with the weights
    last_whole, last_resumed = load_file(tmp_path / "whole" / "state.safetensors"), load_file(checkpoint.tensors)
    assert last_whole.keys() == last_resumed.keys()
    assert all(torch.allclose(last_whole[k].float(), last_resumed[k].float(), atol=1e-6) for k in last_whole)
    # a checkpoint of other words, seed, views, schedule, rate or mixup is not resumed from
    other = BrandStep(["Adidas", "Puma"])
    optimizer = torch.optim.AdamW(other.parameters())
    same = {"words": words, "seed": 0, "views": views.names, "cosine": False, "epochs": 3, "average_last": 2,
            "lr": LR, "mixup": mixup, "pick_set": pick_set}
    assert checkpoint.load(fresh(), optimizer, AveragedModel(fresh()), same) is not None
    for changed in ({"words": other.words}, {"seed": 1}, {"views": ["mirrored"]}, {"cosine": True}, {"epochs": 4},
                    {"average_last": 3}, {"lr": LR / 2}, {"mixup": mixup + 0.1}, {"pick_set": not pick_set}):
        step = other if "words" in changed else fresh()
        assert checkpoint.load(step, optimizer, AveragedModel(step), same | changed) is None


def test_the_last_epochs_weights_are_averaged_and_kept_when_better_on_the_pick_set(tmp_path: Path):
    torch.manual_seed(1)
    mid, labels = torch.randn(48, 96, 4, 4), torch.randint(0, 3, (48,))
    mid += labels[:, None, None, None] * 0.3
    weights = []

    class Recording(Checkpoint):
        def save(self, step, *args) -> None:
            weights.append(step.out[1].weight.detach().clone())

    step = BrandStep(["Nike", "Puma", "Adidas"])
    result = train(step, (mid[:40], labels[:40]), (mid[40:], labels[40:]), epochs=4,
                   checkpoint=Recording(tmp_path), average_last=3)
    assert result["averaged_epochs"] == [2, 3, 4] and 0 <= result["averaged_pick_accuracy"] <= 1
    assert result["kept"] == "average" and result["averaged_pick_accuracy"] >= result["pick_accuracy"]
    assert torch.allclose(step.out[1].weight, torch.stack(weights[1:]).mean(0), atol=1e-6)
    # the batch-norm statistics are the averaged weights' own, over the fit maps
    again = copy.deepcopy(step)
    update_bn([mid[:40]], again)
    norms = [(m, n) for m, n in zip(step.modules(), again.modules()) if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(torch.allclose(m.running_var, n.running_var, atol=1e-5) for m, n in norms)


def test_without_a_pick_set_the_last_epochs_average_is_kept():
    torch.manual_seed(1)
    mid, labels = torch.randn(48, 96, 4, 4), torch.randint(0, 3, (48,))
    weights = []

    class Recording(Checkpoint):
        def save(self, step, *args) -> None:
            weights.append(step.out[1].weight.detach().clone())

    step = BrandStep(["Nike", "Puma", "Adidas"])
    result = train(step, (mid, labels), None, epochs=4, checkpoint=Recording(Path("unused")), average_last=2)
    assert result == {"pick_curve": [], "averaged_epochs": [3, 4], "kept": "average"}
    assert torch.allclose(step.out[1].weight, torch.stack(weights[2:]).mean(0), atol=1e-6)
    last = BrandStep(["Nike", "Puma", "Adidas"])
    assert train(last, (mid, labels), None, epochs=2, checkpoint=Recording(Path("unused")))["kept"] == "last epoch"
    assert torch.equal(last.out[1].weight, weights[-1])


def test_mixup_shows_the_step_each_batch_mixed_with_itself_reordered():
    maps = torch.arange(64, dtype=torch.float).repeat_interleave(96 * 16).view(64, 96, 4, 4)  # each map: its row
    seen: list[torch.Tensor] = []

    class Recording(BrandStep):
        def forward(self, mid, final=None):
            if self.training and torch.is_grad_enabled():
                seen.append(mid[:, 0, 0, 0].detach().clone())
            return super().forward(mid, final)

    torch.manual_seed(0)
    step = Recording(["Nike", "Puma"])
    train(step, (maps[:48], torch.arange(48) % 2), (maps[48:], torch.arange(16) % 2), epochs=1, mixup=0.4)
    order = torch.cat(seen)
    assert len(order) == 48 and not torch.equal(order, order.round())  # rows mixed, not shown as they are
    # each batch mixed with a reordering of itself: its mean (of row numbers) is that of the rows drawn
    means = [batch.mean() for batch in seen]
    torch.manual_seed(0)
    drawn = torch.randperm(48)
    rows = [drawn[s : s + 256].float() for s in range(0, 48, 256)]
    assert all(torch.isclose(m, r.mean()) for m, r in zip(means, rows, strict=True))


def test_views_are_drawn_only_where_a_product_has_them_and_as_often_as_its_photo():
    fit_ids = [10, 11, 12, 13]
    photo = torch.tensor(fit_ids, dtype=torch.float)[:, None]  # each map holds its product's id, plus 100 or 200
    mirrored = {"ids": torch.tensor([13, 12, 11, 10]), "mid": torch.tensor([[113.0], [112.0], [111.0], [110.0]])}
    larger = {"ids": torch.tensor([11, 10]), "mid": torch.tensor([[211.0], [210.0]])}  # for 10 and 11 only
    views = Views.of({"mirrored": mirrored, "larger": larger}, fit_ids)
    torch.manual_seed(0)
    rows = torch.arange(4).repeat(3000)
    shown = views.draw(rows, photo[rows].clone()).squeeze(1)
    assert torch.equal(shown % 100, photo[rows].squeeze(1))  # always a view of the product drawn
    source = shown // 100  # 0: the photo, 1: the mirror image, 2: the larger photo
    with_larger, without = source[rows < 2], source[rows >= 2]
    assert 2 not in without.tolist()
    for view in (0, 1, 2):
        assert abs((with_larger == view).float().mean() - 1 / 3) < 0.03
    assert abs((without == 0).float().mean() - 0.5) < 0.03


def test_the_pick_set_holds_whole_names_out():
    ids, names = list(range(40)), [f"Brand{i % 20} Men Shirt" for i in range(40)]
    picked = pick_by_name(ids, names)
    assert len(picked) == 4 and {names[i] for i in picked}.isdisjoint(names[i] for i in ids if i not in picked)


@pytest.mark.slow
def test_a_trained_step_goes_into_the_run_and_its_captions_begin_with_its_words(tiny_run: Path, tmp_path: Path):
    run_dir = tmp_path / "tiny-brand"
    shutil.copytree(tiny_run, run_dir)
    before = model_digest(Run(run_dir))
    main(["--run", str(run_dir), "--epochs", "2", "--cache_dir", str(tmp_path / "cache")])
    summary = json.loads((run_dir / "brand_step.json").read_text())
    assert len(summary["pick_curve"]) == 2 and summary["words"] > 1 and summary["averaged_epochs"] == [1, 2]
    assert not list((run_dir / "checkpoints" / "brand_step").glob("state.*"))  # done: nothing left to resume
    assert model_digest(Run(run_dir)) != before  # an evaluation captions again
    captioner = Captioner.load(run_dir)
    words = captioner.brand_step.words
    assert len(words) == summary["words"]
    assert all(any(caption.startswith(w) for w in words) for caption in captioner.caption(photos(4)))
    # --fit_all: every training product fit, none held out to pick with
    main(["--run", str(run_dir), "--epochs", "2", "--cache_dir", str(tmp_path / "cache"), "--fit_all"])
    everything = json.loads((run_dir / "brand_step.json").read_text())
    assert everything["fit_all"] and everything["pick_products"] == 0 and everything["kept"] == "average"
    assert everything["fit_products"] == summary["fit_products"] + summary["pick_products"]
    assert "pick_accuracy_with_mirror" not in everything and Captioner.load(run_dir).brand_step is not None


@pytest.mark.slow
def test_the_training_command_fits_the_step_after_the_captioner_once(tiny_catalog: Path, tmp_path: Path):
    args = tiny_train_args(tiny_catalog, tmp_path / "runs", tmp_path / "cache", epochs=1)
    run_dir = train_main(args)  # --brand_step_epochs 0: a captioner alone
    step_file = run_dir / "model" / FILE
    assert not step_file.exists() and not (run_dir / "brand_step.json").exists()
    before = model_digest(Run(run_dir))
    # the same finished run, asked for a step: the captioner is kept, the step fit on every training product
    train_main([*args, "--brand_step_epochs", "2"])
    summary = json.loads((run_dir / "brand_step.json").read_text())
    train_ids = json.loads((run_dir / "split.json").read_text())["train_ids"]
    assert summary["fit_all"] and summary["epochs"] == 2 and summary["fit_products"] == len(train_ids)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    assert model_digest(Run(run_dir)) != before and Captioner.load(run_dir).brand_step is not None
    # and again: a step of those epochs is there, nothing is fit twice
    stamp = step_file.stat().st_mtime_ns
    train_main([*args, "--brand_step_epochs", "2"])
    assert step_file.stat().st_mtime_ns == stamp


def test_training_a_step_where_there_is_nothing_to_train_says_why(tmp_path: Path):
    with pytest.raises(RunError, match="--epochs must be at least 1"):
        main(["--run", str(tmp_path), "--epochs", "0"])
    with pytest.raises(RunError, match="--average_last must be 0 or more"):
        main(["--run", str(tmp_path), "--average_last", "-1"])
    with pytest.raises(RunError, match="--mixup must be 0"):
        main(["--run", str(tmp_path), "--mixup", "-0.5"])
    with pytest.raises(RunError, match="--lr must be above 0"):
        main(["--run", str(tmp_path), "--lr", "0"])
    with pytest.raises(CheckpointError, match="no model/ folder"):
        main(["--run", str(tmp_path / "no-such-run")])
