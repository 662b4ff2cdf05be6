"""The paper notebook's checkpoints: import a tiny random `captioner.pt`, rebuild it exactly, decode both ways,
refuse anything that is not a plain dict of tensors (without running it), and name wrong keys."""

from __future__ import annotations

import json
import logging
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ris_core.captioner import ImageCaptioner, load_any_captioner
from ris_core.data import Split
from ris_core.modeling import CheckpointError
from ris_core.paper_notebook import (
    CHECKPOINT_LAYOUT,
    NOTEBOOK_DIR,
    NotebookCaptioner,
    NotebookCaptionerAdapter,
    NotebookCaptionerConfig,
    drop_first_word,
    expected_shapes,
    load_notebook_checkpoint,
    read_state_dict,
)
from ris_core.runs import Run
from ris_core.tokenizer import EOS_TOKEN_ID, encode_captions
from training.import_paper_checkpoint import cli, main

TINY = NotebookCaptionerConfig(depth=2, width=64, heads=2, patch=16, image_size=32, n_positions=64)


def tiny_model(seed: int = 0) -> NotebookCaptioner:
    torch.manual_seed(seed)
    model = NotebookCaptioner(TINY)
    with torch.no_grad():  # non-zero norms and biases, so a swapped parameter would show in the logits
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (30 + 5 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(original model, its captioner.pt, the imported run folder, the run it took its split from)."""
    root = tmp_path_factory.mktemp("paper_notebook")
    model = tiny_model()
    checkpoint = root / "captioner.pt"
    torch.save(model.state_dict(), checkpoint)  # what the notebook does: a bare, tied state_dict
    reference = root / "reference-cpu"
    reference.mkdir()
    Split(seed=0, val_fraction=0.25, train_ids=[1, 2, 3], val_ids=[4]).save(reference / "split.json")
    (reference / "run.json").write_text(json.dumps({"data": {"data_dir": "/data/fashion"}}))
    out = main([str(checkpoint), "--out", str(root / "runs" / "paper-notebook"),
                "--split_from", str(reference), "--heads", "2"])
    return model, checkpoint, out, reference


def test_layout_is_the_models_own_parameter_names():
    model_keys = set(NotebookCaptioner(TINY).state_dict())
    assert model_keys == set(expected_shapes(TINY)) | {"norm.weight", "norm.bias", "lm_head.weight"}
    assert all(tuple(v.shape) == expected_shapes(TINY)[k] for k, v in NotebookCaptioner(TINY).state_dict().items()
               if k in expected_shapes(TINY))
    assert "transformer.h.{i}.cross_attn.q.weight" in CHECKPOINT_LAYOUT


def test_import_writes_a_run_folder(imported):
    model, checkpoint, out, reference = imported
    run = Run(out)
    info = run.info()
    assert info["kind"] == "paper-notebook" and run.reported_only
    assert info["source"]["sha256"] and info["decoding"]["default"] == "greedy_drop_first"
    assert set(info["decoding"]["modes"]) == {"notebook", "greedy_drop_first"}
    assert info["data"]["data_dir"] == "/data/fashion"
    assert (out / "split.json").read_bytes() == (reference / "split.json").read_bytes()
    history = run.history()
    assert history["epoch"].tolist() == [5]
    assert history.loc[0, "val_loss"] == 1.156 and history.loc[0, "val_perplexity"] == 3.18
    others = history.drop(columns=["epoch", "val_loss", "val_perplexity"])
    assert others.isna().all().all()  # nothing invented
    from safetensors import safe_open

    with safe_open(out / "notebook" / "model.safetensors", "pt") as stored:
        keys = set(stored.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # tied: stored once
    assert json.loads((out / "notebook" / "config.json").read_text())["heads"] == 2
    for path in [p for p in out.rglob("*") if p.is_file()]:  # readable by whoever serves the dashboard
        assert os.stat(path).st_mode & 0o644 == 0o644, path.name


def test_rebuilt_model_gives_exactly_the_same_logits(imported):
    model, checkpoint, out, _ = imported
    adapter = load_any_captioner(out)
    assert isinstance(adapter, NotebookCaptionerAdapter) and isinstance(adapter, ImageCaptioner)
    torch.manual_seed(1)
    pixels, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 50257, (2, 7))
    with torch.no_grad():
        assert torch.equal(adapter.model(pixels, ids), model(pixels, ids))
        assert torch.equal(load_notebook_checkpoint(checkpoint, heads=2)(pixels, ids), model(pixels, ids))


def test_decoding_modes(imported):
    model, _, _, _ = imported
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    greedy_ids = model.generate_ids(pixels, max_new_tokens=12)
    assert torch.equal(greedy_ids, model.generate_ids(pixels, max_new_tokens=12))  # deterministic
    # the cached step-by-step decoding picks the argmax of the full forward at every position
    sequence = torch.cat([torch.full((4, 1), EOS_TOKEN_ID), greedy_ids], dim=1)
    with torch.no_grad():
        full = model(pixels, sequence)[:, :-1].argmax(-1)
    ended = torch.cumsum(greedy_ids == EOS_TOKEN_ID, dim=1) - (greedy_ids == EOS_TOKEN_ID).long() > 0
    assert torch.equal(full[~ended], greedy_ids[~ended])

    from ris_core.tokenizer import gpt2_tokenizer

    kept = [t.strip() for t in gpt2_tokenizer().batch_decode(greedy_ids, skip_special_tokens=True)]
    dropped = model.generate(pixels, mode="greedy_drop_first", max_new_tokens=12)
    assert dropped == [drop_first_word(t) for t in kept]
    assert dropped == model.generate(pixels, mode="greedy_drop_first", max_new_tokens=12)

    sampled = model.generate(pixels, mode="notebook", max_new_tokens=12, seed=0)
    assert sampled == model.generate(pixels, mode="notebook", max_new_tokens=12, seed=0)  # same seed, same text
    assert sampled != kept  # sampling at temperature 1, not greedy
    assert sampled != model.generate(pixels, mode="notebook", max_new_tokens=12, seed=1)
    with pytest.raises(ValueError, match="greedy_drop_first"):
        model.generate(pixels, mode="beam")
    assert drop_first_word("Turtle Men Navy Blue Shirt") == "Men Navy Blue Shirt" and drop_first_word("One") == ""


def test_adapter_captions_like_our_runs(imported):
    model, _, out, _ = imported
    adapter = NotebookCaptionerAdapter.load(out)
    pics = images(3)
    refs = ["Nike Men Blue Shirt", "Puma Women Red Heels", "Titan Watch"]
    batch = adapter.run_batch(pics, references=refs)
    assert len(batch.captions) == 3 and batch.embeddings.shape == (3, 64)
    assert np.allclose(np.linalg.norm(batch.embeddings, axis=1), 1.0, atol=1e-5)
    assert isinstance(adapter, ImageCaptioner) and not adapter.can_rerank
    assert np.allclose(adapter.embed(pics), batch.embeddings, atol=1e-6)  # embed_paths works too
    assert batch.captions == adapter.caption(pics) == adapter.run_batch(pics).captions

    # the loss, teacher-forced from BOS, recomputed by hand with the full forward
    labels = encode_captions(refs)
    total, tokens = 0.0, 0
    with torch.no_grad():
        pixels = adapter.preprocess(pics)
        for i, seq in enumerate(labels):
            inputs = torch.tensor([[EOS_TOKEN_ID] + seq[:-1]])
            logits = model(pixels[i : i + 1], inputs)[0]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(seq), reduction="sum").item()
            tokens += len(seq)
    assert batch.tokens == tokens and batch.loss_sum == pytest.approx(total, rel=1e-4)
    # the notebook's definition: [t1..tn] predict [t2..tn, EOS]; the first token is given, never predicted
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i, seq in enumerate(labels):
            logits = model(pixels[i : i + 1], torch.tensor([seq[:-1]]))[0]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(seq[1:]), reduction="sum").item()
            tokens += len(seq) - 1
    assert batch.other_losses["notebook"][1] == tokens == batch.tokens - 3
    assert batch.other_losses["notebook"][0] == pytest.approx(total, rel=1e-4)
    assert pixels.shape == (3, 3, 32, 32) and float(pixels.min()) >= -1 and float(pixels.max()) <= 1
    with pytest.raises(ValueError, match="num_beams=1"):
        adapter.run_batch(pics, num_beams=3)


def test_load_any_captioner_falls_back_to_our_runs(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model/"):
        load_any_captioner(tmp_path)


class RunsCode:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch_save", "plain_pickle", "inside_state_dict"])
def test_code_in_a_checkpoint_is_refused_not_run(tmp_path, how):
    marker, path = tmp_path / "pwned", tmp_path / "captioner.pt"
    payload = RunsCode(marker)
    if how == "torch_save":
        torch.save(payload, path)
    elif how == "plain_pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save({**tiny_model().state_dict(), "evil": payload}, path)
    with pytest.raises(CheckpointError, match="refused and nothing in it was executed"):
        read_state_dict(path)
    with pytest.raises(CheckpointError):
        main([str(path), "--out", str(tmp_path / "out"), "--split_from", str(tmp_path)])
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_non_tensor_values_are_refused(tmp_path):
    path = tmp_path / "captioner.pt"
    torch.save({"transformer.wte.weight": torch.zeros(3, 2), "epoch": 5, "optimizer": {"lr": 1e-4}}, path)
    with pytest.raises(CheckpointError, match=r"epoch \(int\).*optimizer \(dict\)"):
        read_state_dict(path)
    torch.save({"model": tiny_model().state_dict(), "epoch": 5, "optimizer": {"lr": 1e-4}}, path)
    with pytest.raises(CheckpointError, match="under 'model'"):  # beside more than plain numbers: refused
        read_state_dict(path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not a state_dict"):
        read_state_dict(path)


def test_wrong_key_names_are_listed(tmp_path):
    state = tiny_model().state_dict()
    for i in range(TINY.depth):
        for part in ("weight", "bias"):
            old = state.pop(f"transformer.h.{i}.cross_attn.q.{part}")
            state[f"transformer.h.{i}.crossattention.q_proj.{part}"] = old
    state["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(10, 64)
    path = tmp_path / "captioner.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_notebook_checkpoint(path, heads=2)
    message = str(err.value)
    assert "missing keys: transformer.h.0.cross_attn.q.bias, transformer.h.0.cross_attn.q.weight" in message
    assert "unexpected keys: transformer.h.0.crossattention.q_proj.bias" in message
    assert "transformer.h.0.mlp.c_fc.weight (10, 64) != (256, 64)" in message
    assert "CHECKPOINT_LAYOUT" in message

    partly = {**{f"module.{k}": v for k, v in tiny_model().state_dict().items()}, "extra.weight": torch.zeros(1)}
    torch.save(partly, path)
    with pytest.raises(CheckpointError, match="wrapper prefix"):  # not every key prefixed: not a wrapper
        load_notebook_checkpoint(path)


@pytest.mark.parametrize("wrap", ["module", "_orig_mod", "both", "model_dict", "state_dict_dict"])
def test_common_wrappers_are_unwrapped_with_one_line_each(tmp_path, wrap, caplog):
    """DataParallel/DDP and torch.compile prefixes, and {"model": ...} / {"state_dict": ...} with plain numbers."""
    model = tiny_model()
    state = model.state_dict()
    wrapped = {
        "module": {f"module.{k}": v for k, v in state.items()},
        "_orig_mod": {f"_orig_mod.{k}": v for k, v in state.items()},
        "both": {f"_orig_mod.module.{k}": v for k, v in state.items()},
        "model_dict": {"model": state, "epoch": 4, "val_loss": 1.133},
        "state_dict_dict": {"state_dict": {f"module.{k}": v for k, v in state.items()}, "step": 100},
    }[wrap]
    path = tmp_path / "captioner.pt"
    torch.save(wrapped, path)
    with caplog.at_level(logging.INFO, logger="ris_core.paper_notebook.checkpoint"):
        loaded = load_notebook_checkpoint(path, heads=2)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == {"both": 2, "state_dict_dict": 2}.get(wrap, 1), said
    assert any(("prefix" in m) or ("state dict under" in m) for m in said)


def test_notebook_files_without_final_norm_and_with_mask_buffers_load(tmp_path):
    """Notebooks that copy only timm's blocks have no `norm`; their attention keeps a causal-mask buffer."""
    state = tiny_model().state_dict()
    del state["norm.weight"], state["norm.bias"]
    for i in range(TINY.depth):
        state[f"transformer.h.{i}.attn.mask"] = torch.ones(1, 1, 64, 64).tril()
    path = tmp_path / "captioner.pt"
    torch.save(state, path)
    model = load_notebook_checkpoint(path, heads=2)
    assert not model.config.final_norm and "norm.weight" not in model.state_dict()
    state["lm_head.weight"] = state["lm_head.weight"].clone() + 1  # untied: another model
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="ties them"):
        load_notebook_checkpoint(path, heads=2)


def test_existing_different_folder_is_never_overwritten(imported, tmp_path, capsys):
    _, checkpoint, out, reference = imported
    before = (out / "run.json").read_text()
    assert main([str(checkpoint), "--out", str(out), "--split_from", str(reference), "--heads", "2"]) == out
    assert (out / "run.json").read_text() == before  # the same import again: nothing to do

    other = tmp_path / "other.pt"
    torch.save(tiny_model(seed=1).state_dict(), other)
    with pytest.raises(SystemExit) as exit_info:
        cli([str(other), "--out", str(out), "--split_from", str(reference), "--heads", "2"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "holds a different run" in error and "\n" not in error
    assert (out / "run.json").read_text() == before

    with pytest.raises(SystemExit) as exit_info:
        cli([str(other), "--out", str(tmp_path / "new"), "--split_from", str(tmp_path / "nowhere"), "--heads", "2"])
    assert exit_info.value.code == 2 and "--split_from" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.importing-*"))
    assert pd.read_csv(out / "history.csv").shape == (1, 8)


def test_the_notebook_is_fed_images_stretched_as_it_was_trained(imported):
    """The importer records the notebook's preprocessing; the adapter stretches to 224 (here 32) px, bilinear,
    then (x/255 - 0.5)/0.5: equal to a reference computed the notebook's way within resampling noise."""
    _, _, out, _ = imported
    assert json.loads((out / NOTEBOOK_DIR / "config.json").read_text())["extra"]["preprocessing"] == "stretch"
    adapter = NotebookCaptionerAdapter.load(out)
    assert adapter.preprocessing == "stretch"
    size = adapter.model.config.image_size
    rng = np.random.default_rng(1)  # smaller than the model's input, as the dataset's 60x80 photos are for 224
    for shape in ((20, 15, 3), (24, 18, 3), (12, 30, 3)):
        picture = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        reference = np.asarray(picture.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
        reference = torch.from_numpy((reference / 255.0 - 0.5) / 0.5).permute(2, 0, 1)
        pixels = adapter.preprocess([picture])[0]
        assert (pixels - reference).abs().mean() < 0.005, "not the notebook's stretch"  # ~0.0015 measured
        padded = NotebookCaptionerAdapter.from_model(adapter.model, preprocessing="pad").preprocess([picture])[0]
        assert (padded - reference).abs().mean() > 2 * (pixels - reference).abs().mean()  # padding differs
