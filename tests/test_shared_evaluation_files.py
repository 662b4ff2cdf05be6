"""Files an evaluation computes without the run's own weights are shared with the evaluations of other runs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from ris_core.evaluation import shared


def test_a_shared_file_is_linked_into_the_workspace_and_found_under_its_key(tmp_path: Path):
    folder, made = tmp_path / "shared", tmp_path / "eval-a" / "names.npy"
    made.parent.mkdir()
    made.write_bytes(b"vectors")
    shared.share(folder, "k1", [made])
    wanted = tmp_path / "eval-b" / "names.npy"
    assert not shared.fetch(folder, "k2", [wanted]) and not wanted.exists()  # another key: nothing
    assert shared.fetch(folder, "k1", [wanted]) and wanted.read_bytes() == b"vectors"
    assert wanted.stat().st_ino == made.stat().st_ino  # one copy on disk
    made.unlink()  # an evaluation replacing its own file leaves the shared one alone
    assert wanted.read_bytes() == b"vectors"


def test_a_set_of_files_is_fetched_whole_or_not_at_all(tmp_path: Path):
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "k-index.npz").write_bytes(b"arrays")  # its .json half is missing
    wanted = [tmp_path / "eval" / "index.npz", tmp_path / "eval" / "index.json"]
    assert not shared.fetch(folder, "k", wanted)
    assert not any(path.exists() for path in wanted)
    assert not shared.fetch(None, "k", wanted)  # sharing off


def test_a_folder_that_cannot_take_files_only_costs_a_warning(tmp_path: Path, caplog):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder should be")
    made = tmp_path / "names.npy"
    made.write_bytes(b"vectors")
    with caplog.at_level(logging.WARNING):
        shared.share(blocked, "k", [made])
    assert "not sharing names.npy" in caplog.text and made.read_bytes() == b"vectors"


def test_the_folder_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(shared.FOLDER_VARIABLE, "/somewhere/else")
    assert shared.default_folder() == Path("/somewhere/else")
    monkeypatch.setenv(shared.FOLDER_VARIABLE, "")
    assert shared.default_folder() is None
    monkeypatch.delenv(shared.FOLDER_VARIABLE)
    assert shared.default_folder() == Path(".cache") / "evaluation"


def _with_other_decoder(run: Path, dest: Path) -> Path:
    """A copy of `run` whose decoder weights differ (another checkpoint on the same frozen backbone)."""
    run = shutil.copytree(run, dest / run.name, ignore=shutil.ignore_patterns("eval"))
    weights = run / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.startswith("decoder.") and k.endswith("weight"))
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return run


@pytest.mark.slow
def test_another_checkpoint_on_the_same_backbone_reuses_the_catalog_names_and_contrastive_model(
        tiny_run: Path, tiny_catalog: Path, tmp_path: Path, monkeypatch):
    from ris_core import captioner
    from ris_core.evaluation import pipeline
    from ris_core.runs import Run
    from training.evaluate import main as evaluate_main

    monkeypatch.setenv(shared.FOLDER_VARIABLE, str(tmp_path / "shared"))
    first = shutil.copytree(tiny_run, tmp_path / "a" / tiny_run.name, ignore=shutil.ignore_patterns("eval"))
    second = _with_other_decoder(tiny_run, tmp_path / "b")
    plain, other = captioner.Captioner.load(first), captioner.Captioner.load(second)
    assert pipeline.model_digest(Run(first)) != pipeline.model_digest(Run(second))
    assert plain.embedding_key() == other.embedding_key() is not None
    evaluate_main(["--run", str(first), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50"])

    def fail(*args, **kwargs):
        raise AssertionError("computed again what another run's evaluation had computed")

    monkeypatch.setattr(captioner.Captioner, "embed_paths", fail)
    monkeypatch.setattr(pipeline, "train_contrastive", fail)
    evaluate_main(["--run", str(second), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50"])
    for name in ("catalog_knn.npz", "catalog_knn.json", "name_embeddings.npy", "contrastive.safetensors"):
        # one file on disk, linked into both evaluations: nothing was computed and written again
        assert (second / "eval" / name).stat().st_ino == (first / "eval" / name).stat().st_ino, name
    assert json.loads((second / "eval" / "state.json").read_text())["knn_key"] == \
        json.loads((first / "eval" / "state.json").read_text())["knn_key"]
    strategies = set(pd.read_csv(second / "eval" / "retrieval.csv", usecols=["strategy"])["strategy"])
    assert {"image_knn:clip", "image_to_name:clip"} <= strategies  # from the shared contrastive model


@pytest.mark.slow
def test_the_backbone_key_follows_the_weights_and_the_precision_path(tiny_run: Path, monkeypatch):
    from ris_core import precision
    from ris_core.captioner import Captioner

    model = Captioner.load(tiny_run)
    model.model.encoder.config.backbone_precision = "bf16"  # as trained where bf16 is fast
    keys = {}
    for mode in ("native", "emulated"):
        monkeypatch.setenv(precision.OVERRIDE, mode)
        precision.fast_bf16.cache_clear()
        keys[mode] = model.embedding_key()
    precision.fast_bf16.cache_clear()
    monkeypatch.delenv(precision.OVERRIDE)
    assert keys["native"] != keys["emulated"]  # the two paths give slightly different maps
    with torch.no_grad():
        next(iter(model.model.encoder.backbone.parameters())).mul_(1.01)
    assert model.embedding_key() not in keys.values()


@pytest.mark.slow
def test_a_torn_shared_file_is_computed_again_and_replaced(tiny_run: Path, tiny_catalog: Path, tmp_path: Path,
                                                           monkeypatch, caplog):
    from training.evaluate import main as evaluate_main

    folder = tmp_path / "shared"
    monkeypatch.setenv(shared.FOLDER_VARIABLE, str(folder))
    first = shutil.copytree(tiny_run, tmp_path / "a" / tiny_run.name, ignore=shutil.ignore_patterns("eval"))
    evaluate_main(["--run", str(first), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50"])
    torn = {path.name.split("-", 1)[1]: path for path in folder.iterdir()}
    for name in ("catalog_knn.npz", "name_embeddings.npy", "contrastive.safetensors"):
        torn[name].unlink()  # the evaluation's own link keeps its good copy
        torn[name].write_bytes(b"torn")
    second = shutil.copytree(tiny_run, tmp_path / "b" / tiny_run.name, ignore=shutil.ignore_patterns("eval"))
    with caplog.at_level(logging.WARNING):
        evaluate_main(["--run", str(second), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50"])
    assert "ignoring the unreadable catalog_knn" in caplog.text
    for name in ("catalog_knn.npz", "name_embeddings.npy", "contrastive.safetensors"):
        if name.endswith(".safetensors"):  # the header's metadata order may vary: compare the tensors
            before, after = load_file(str(first / "eval" / name)), load_file(str(second / "eval" / name))
            assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        else:
            assert (first / "eval" / name).read_bytes() == (second / "eval" / name).read_bytes(), name
        assert torn[name].read_bytes() != b"torn" and torn[name].stat().st_ino == (second / "eval" / name).stat().st_ino
