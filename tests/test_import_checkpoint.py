"""Any transformers captioner opens as a run: tiny random ViT / DeiT / Swin + GPT-2 (and a BERT decoder)
`VisionEncoderDecoderModel`s built here, saved with `save_pretrained`, imported, captioned and evaluated."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import (
    BertConfig,
    BertTokenizerFast,
    DeiTConfig,
    GPT2Config,
    SwinConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessor,
)

from ris_core.captioner import load_any_captioner
from ris_core.encoder_decoder import Captioner
from ris_core.errors import CheckpointError, HubUnavailable
from ris_core.runs import RunError, discover_runs
from ris_core.tokenizer import EOS_TOKEN_ID, gpt2_tokenizer
from training import import_checkpoint
from training.evaluate import main as evaluate_main

SIZE = 32
ENCODERS = {
    "vit": lambda: ViTConfig(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=64),
    "deit": lambda: DeiTConfig(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64),
    "swin": lambda: SwinConfig(image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                               window_size=4),
}


def gpt2_decoder():
    return GPT2Config(n_embd=48, n_layer=1, n_head=2, n_positions=64, add_cross_attention=True, is_decoder=True,
                      bos_token_id=EOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID), gpt2_tokenizer()


def bert_decoder(words: list[str]):
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))])}
    tokenizer = BertTokenizerFast(vocab=vocab)
    return BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, is_decoder=True, add_cross_attention=True), tokenizer


def save_foreign(dest: Path, encoder: str = "vit", decoder=None, trainer_state: dict | None = None) -> Path:
    """A random captioner saved the way Seq2SeqTrainer users save one: model, image processor, tokenizer."""
    torch.manual_seed(0)
    decoder_config, tokenizer = decoder or gpt2_decoder()
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ENCODERS[encoder](), decoder_config)
    model = VisionEncoderDecoderModel(config=config)
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else EOS_TOKEN_ID
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else EOS_TOKEN_ID
    model.config.decoder_start_token_id, model.config.eos_token_id = start, end
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(dest)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    if trainer_state is not None:
        (dest / "trainer_state.json").write_text(json.dumps(trainer_state))
    return dest


TRAINER_STATE = {"best_model_checkpoint": None, "log_history": [
    {"epoch": 0.5, "loss": 4.0, "learning_rate": 1e-4, "step": 5},
    {"epoch": 1.0, "loss": 3.0, "learning_rate": 9e-5, "step": 10},
    {"epoch": 1.0, "eval_loss": 2.5, "eval_runtime": 1.5, "step": 10},
    {"epoch": 2.0, "loss": 2.0, "learning_rate": 5e-5, "step": 20},
    {"epoch": 2.0, "eval_loss": 2.2, "eval_runtime": 1.4, "step": 20},
]}


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_run: Path, tiny_catalog: Path) -> Path:
    """A random ViT + GPT-2 captioner imported on the tiny run's split and evaluated on the tiny catalog."""
    root = tmp_path_factory.mktemp("import")
    source = save_foreign(root / "vit-gpt2", trainer_state=TRAINER_STATE)
    out = import_checkpoint.main([str(source), "--out", str(root / "runs" / "vit-gpt2"),
                                  "--split_from", str(tiny_run)])
    evaluate_main(["--run", str(out), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50",
                   "--max_products", "12", "--refine_queries", "4"])
    return out


def test_an_imported_transformers_captioner_is_a_run_that_evaluates(imported: Path, tiny_run: Path):
    info = json.loads((imported / "run.json").read_text())
    assert info["kind"] == "imported" and info["model_spec"]["encoder"] == "vit"
    assert info["model_spec"]["decoder"] == "gpt2" and info["model_spec"]["image_size"] == SIZE
    assert (imported / "split.json").read_text() == (tiny_run / "split.json").read_text()
    assert [r.name for r in discover_runs(imported.parent)] == ["vit-gpt2"]
    for path in (imported / "model").iterdir():  # readable by whoever serves the dashboard
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path.name
    assert not list((imported / "model").glob("trainer_state.json"))
    history = pd.read_csv(imported / "history.csv")
    assert history["epoch"].tolist() == [1, 2] and history["val_loss"].tolist() == [2.5, 2.2]
    assert history["train_loss"].tolist() == [3.0, 2.0] and info["best_epoch"] == 2
    metrics = json.loads((imported / "eval" / "caption_metrics.json").read_text())
    assert metrics["n_scored"] == 12 and 0 <= metrics["model"]["bleu_4"] <= 100
    assert metrics["model"]["perplexity"] > 1000  # a random model over a 50,257-token vocabulary
    assert "reranked" in metrics and "cider_d" in metrics["model"]
    strategies = set(pd.read_csv(imported / "eval" / "retrieval.csv", usecols=["strategy"])["strategy"])
    assert {"last_two_words", "full_caption", "reranked:last_two_words", "image_knn:encoder"} <= strategies


def test_its_own_image_processor_decides_the_preprocessing(imported: Path):
    captioner = load_any_captioner(imported)
    assert captioner.spec is None
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 60, 3), dtype=np.uint8))
    expected = ViTImageProcessor(size={"height": SIZE, "width": SIZE})(images=[image], return_tensors="pt")
    torch.testing.assert_close(captioner.preprocess([image]), expected["pixel_values"])  # stretched, not padded


def test_its_scores_are_the_models_own_loss(imported: Path, tiny_catalog: Path):
    """Candidate likelihoods, beams and greedy captions agree with the model's own forward pass."""
    captioner = Captioner.load(imported)
    image = Image.open(next((tiny_catalog / "images").glob("*.jpg"))).convert("RGB")
    text = "Nike Men Blue Shirt"
    score = captioner.log_likelihoods([image], [[text]])[0][0]
    labels = torch.tensor([captioner.token_ids([text])[0]])
    with torch.no_grad():
        out = captioner.model(pixel_values=captioner.preprocess([image]), labels=labels)
    assert score == pytest.approx(-out.loss.item() * labels.shape[1], rel=1e-4)
    beams = captioner.n_best([image], num_beams=3)[0]
    assert len(beams) == 3 and captioner.caption([image])[0] == captioner.caption([image])[0]


@pytest.mark.parametrize("encoder", ["deit", "swin"])
def test_deit_and_swin_encoders_caption_and_score(encoder: str, tmp_path: Path, tiny_run: Path, tiny_catalog: Path):
    source = save_foreign(tmp_path / encoder, encoder=encoder)
    out = import_checkpoint.main([str(source), "--out", str(tmp_path / "runs" / encoder), "--split_from",
                                  str(tiny_run)])
    captioner = load_any_captioner(out)
    images = [Image.open(p).convert("RGB") for p in sorted((tiny_catalog / "images").glob("*.jpg"))[:2]]
    assert len(captioner.caption(images)) == 2 and captioner.embed(images).shape[0] == 2
    scores = captioner.log_likelihoods(images, [["Men Blue Shirt"], ["Women Red Bag", "Red Bag"]])
    assert [len(s) for s in scores] == [1, 2] and all(np.isfinite(s).all() and (s < 0).all() for s in scores)
    assert json.loads((out / "run.json").read_text())["model_spec"]["encoder"] == encoder
    assert not (out / "history.csv").exists()  # no trainer_state.json: no history is made up
    evaluate_main(["--run", str(out), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "20",
                   "--max_products", "6", "--refine_queries", "2", "--rerank_beams", "2"])
    metrics = json.loads((out / "eval" / "caption_metrics.json").read_text())
    assert metrics["n_scored"] == 6 and "reranked" in metrics and metrics["model"]["perplexity"] > 1


def test_a_non_gpt2_decoder_is_scored_through_its_own_forward(tmp_path: Path, tiny_catalog: Path):
    names = pd.read_csv(tiny_catalog / "styles.csv", usecols=["productDisplayName"])["productDisplayName"]
    words = [w.lower() for name in names.dropna() for w in str(name).split()]
    captioner = Captioner.load(save_foreign(tmp_path / "vit-bert", decoder=bert_decoder(words)))
    image = Image.open(next((tiny_catalog / "images").glob("*.jpg"))).convert("RGB")
    labels = torch.tensor([captioner.token_ids(["men blue shirt"])[0]])
    assert labels[0, -1].item() == captioner.tokenizer.sep_token_id  # scored up to its own end token
    with torch.no_grad():
        out = captioner.model(pixel_values=captioner.preprocess([image]), labels=labels)
    score = captioner.log_likelihoods([image], [["men blue shirt"]])[0][0]
    assert score == pytest.approx(-out.loss.item() * labels.shape[1], rel=1e-4)
    assert isinstance(captioner.caption([image])[0], str)


def test_a_trainer_output_folder_gives_its_best_checkpoint(tmp_path: Path, tiny_run: Path):
    state = {**TRAINER_STATE, "best_model_checkpoint": str(tmp_path / "trainer" / "checkpoint-10")}
    for step in (10, 20):
        save_foreign(tmp_path / "trainer" / f"checkpoint-{step}", trainer_state=state)
        (tmp_path / "trainer" / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"pickle, never opened")
    out = import_checkpoint.main([str(tmp_path / "trainer"), "--out", str(tmp_path / "runs" / "t"),
                                  "--split_from", str(tiny_run)])
    info = json.loads((out / "run.json").read_text())
    assert Path(info["source"]["folder"]).name == "checkpoint-10"  # the best, not the last
    assert not (out / "model" / "optimizer.pt").exists()


def test_a_hub_id_downloads_through_the_hub_client_and_fails_soft_offline(tmp_path: Path, tiny_run: Path,
                                                                          monkeypatch):
    import huggingface_hub

    source = save_foreign(tmp_path / "hub-copy")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns=None: asked.append((repo_id, allow_patterns)) or str(source))
    out = import_checkpoint.main(["someone/vit-gpt2", "--out", str(tmp_path / "runs" / "hub"), "--split_from",
                                  str(tiny_run)])
    assert asked[0][0] == "someone/vit-gpt2" and "*.bin" not in asked[0][1]
    assert json.loads((out / "run.json").read_text())["source"]["hub_id"] == "someone/vit-gpt2"

    def offline(repo_id, allow_patterns=None):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(HubUnavailable, match="cannot download 'nlpconnect/vit-gpt2-image-captioning'.*folder"):
        import_checkpoint.main(["nlpconnect/vit-gpt2-image-captioning", "--out", str(tmp_path / "runs" / "x")])
    assert not (tmp_path / "runs" / "x").exists()


def _break(folder: Path, how: str) -> None:
    if how == "no config":
        (folder / "config.json").unlink()
    elif how == "wrong architecture":
        (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    elif how == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            (folder / name).unlink(missing_ok=True)
    elif how == "no image processor":
        (folder / "preprocessor_config.json").unlink()
    elif how == "pickled weights":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


@pytest.mark.parametrize("how, message", [
    ("no config", "not a saved captioner"),
    ("wrong architecture", "not a vision-encoder-decoder"),
    ("no tokenizer", "no usable tokenizer"),
    ("no image processor", "no usable image processor"),
    ("pickled weights", "is a pickle, never opened"),
])
def test_a_folder_that_is_not_a_captioner_is_one_clear_line_and_nothing_written(how: str, message: str,
                                                                               tmp_path: Path, tiny_run: Path):
    source = save_foreign(tmp_path / "broken")
    _break(source, how)
    with pytest.raises(CheckpointError, match=message):
        import_checkpoint.main([str(source), "--out", str(tmp_path / "runs" / "broken"), "--split_from",
                                str(tiny_run)])
    assert not (tmp_path / "runs").exists()


def test_an_existing_run_is_never_overwritten(imported: Path, tmp_path: Path, tiny_run: Path, capsys):
    before = {p: p.read_bytes() for p in sorted(imported.rglob("*")) if p.is_file()}
    other = save_foreign(tmp_path / "other", encoder="deit")
    with pytest.raises(SystemExit):
        import_checkpoint.cli([str(other), "--out", str(imported), "--split_from", str(tiny_run)])
    assert "holds a different run; nothing was changed" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted(imported.rglob("*")) if p.is_file()} == before
    with pytest.raises(RunError):  # a copy of the same weights in another folder is still another source's run
        shutil.copytree(other, tmp_path / "again")
        import_checkpoint.main([str(tmp_path / "again"), "--out", str(imported), "--split_from", str(tiny_run)])


def test_the_dashboard_lists_shows_and_searches_with_an_imported_captioner(imported: Path, tiny_catalog: Path,
                                                                          tmp_path: Path, monkeypatch):
    from unittest import mock

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("RIS_RUNS_DIRS", str(imported.parent))
    monkeypatch.setenv("RIS_DATA_DIR", str(tiny_catalog))
    monkeypatch.chdir(tmp_path)
    dashboard = str(Path(__file__).resolve().parent.parent / "dashboard.py")
    with mock.patch("ris_core.search.duckduckgo._default_ddgs_factory", side_effect=OSError("network disabled")):
        for page in ("pages/overview.py", "pages/caption_quality.py", "pages/query_strategies.py",
                     "pages/search_demo.py", "pages/training_curves.py"):
            at = AppTest.from_file(dashboard, default_timeout=120)
            at.session_state["_keep_sidebar_run"] = str(imported.resolve())
            at.session_state["_keep_sidebar_runs"] = [str(imported.resolve())]
            at.run()
            at.switch_page(page).run()
            assert not at.exception, (page, [e.value for e in at.exception])
            body = "\n".join(str(m.value) for m in [*at.markdown, *at.caption, *at.info])
            chosen = [w.value for w in [*at.selectbox, *at.multiselect]]
            assert "vit-gpt2" in body or "vit-gpt2" in str(chosen), page
            if page == "pages/search_demo.py":
                assert "Caption:" in body and "captioned in" in body
