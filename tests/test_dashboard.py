"""Every dashboard page under Streamlit's AppTest: renders, shows its key elements, survives one interaction,
and turns bad input (non-images, huge images, corrupt runs) into messages instead of exceptions.

Runs on the session's tiny trained run (tests/conftest.py) evaluated on the tiny catalog; the network is
patched out (DuckDuckGo never leaves the process). Uploads go through AppTest's own file_uploader support.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from ris_app.history_io import parse_history
from ris_app.navigation import PAGES
from ris_core.runs import RESULTS_DIR, Run
from ris_core.search import SearchResponse, SearchResult, SearchUnavailable

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = str(REPO / "dashboard.py")
PAPER_RUN = RESULTS_DIR / "paper-2024"
TIMEOUT = 120  # seconds per script run: the first one loads the captioner


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_run, tiny_catalog) -> Path:
    """Two copies of the tiny run: `evaluated` (eval/ computed) and `fresh` (no eval/ yet)."""
    from training.evaluate import main as evaluate

    root = tmp_path_factory.mktemp("dash_runs")
    for name in ("evaluated", "fresh"):
        shutil.copytree(tiny_run, root / name, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    evaluate(["--run", str(root / "evaluated"), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "100"])
    # A 2-epoch model mostly emits empty captions; give the per-product views a caption a trained model would
    # write (the product name's last three words) so searches return results to judge.
    path = root / "evaluated" / "eval" / "captions.csv"
    captions = pd.read_csv(path, keep_default_na=False)
    captions["generated"] = captions["reference"].str.split().str[-3:].str.join(" ")
    captions.to_csv(path, index=False)
    return root


@contextmanager
def fixed_caption(text: str):
    """Patch the captioner so uploads get `text` as caption (the embeddings stay real)."""
    from ris_app import loaders
    from ris_core.captioner import Captioner

    real = Captioner.run_batch

    def run_batch(self, images, *args, **kwargs):
        out = real(self, images, *args, **kwargs)
        out.captions = [text] * len(images)
        return out

    clear = [loaders._photo_caption.clear, loaders._photo_rerank.clear]  # photo captions are shared by sessions
    for fn in clear:
        fn()
    try:
        with mock.patch.object(Captioner, "run_batch", run_batch):
            yield
    finally:
        for fn in clear:
            fn()


@pytest.fixture(autouse=True)
def offline(monkeypatch, runs_root, tiny_catalog, tmp_path):
    """Every test: runs and data from the fixtures, DuckDuckGo cut off from the network, caches in tmp."""
    monkeypatch.setenv("RIS_RUNS_DIRS", str(runs_root))
    monkeypatch.setenv("RIS_DATA_DIR", str(tiny_catalog))
    monkeypatch.chdir(tmp_path)  # DuckDuckGo's default cache (.cache/) lands here, not in the repo
    with mock.patch("ris_core.search.duckduckgo._default_ddgs_factory", side_effect=OSError("network disabled")):
        yield


def app(page: str | None = None, run: Path | None = None, runs: list[Path] | None = None) -> AppTest:
    """The dashboard, on `page`, with the sidebar's run (or runs) chosen up front."""
    at = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT)
    if run is not None:
        at.session_state["_keep_sidebar_run"] = str(run.resolve())
    if runs is not None:
        at.session_state["_keep_sidebar_runs"] = [str(r.resolve()) for r in runs]
    at.run()
    if page:
        at.switch_page(page).run()
    return at


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [e.value for e in at.info]
    return "\n".join(str(p) for p in parts)


def queries(at: AppTest) -> list:
    """The code boxes that show queries (not the page's shareable link)."""
    return [c for c in at.code if "?" not in c.value or not c.value.startswith(("/", "http"))]


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def png_bytes(mode: str = "RGB", size=(60, 80), color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


def huge_png_header(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid PNG header claiming 100 megapixels (never decoded: the size check comes first)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------- 0. overview (the landing page)


def test_overview_headlines_and_the_claim_table_then_change_run(runs_root):
    at = app(run=runs_root / "evaluated")
    assert_clean(at)
    assert at.title[0].value == "Overview"
    metrics = {m.label: m for m in at.metric}
    assert len(metrics) == 4, list(metrics)
    evaluation = json.loads((runs_root / "evaluated" / "eval" / "caption_metrics.json").read_text())
    assert metrics["BLEU-4"].value == f"{evaluation['model']['bleu_4']:.1f}"
    assert "vs NN caption" in metrics["BLEU-4"].delta and "Best query P@10" in metrics
    assert "paper-2024" in metrics["Val perplexity (best epoch)"].delta  # the reported run is the reference
    claim = next(m.value for m in at.markdown if "vs the full caption" in m.value)
    assert claim.count("\n| R") == 3  # one row per relevance level
    assert all(word in claim for word in ("R1: articleType", "R2: articleType + baseColour"))
    assert any(w in claim for w in ("better", "worse", "no significant difference"))
    assert len(at.get("page_link")) == len(PAGES) - 1 >= 4  # one link per other page
    assert not at.get("plotly_chart")  # light: no chart on the landing page

    at.sidebar.selectbox(key="sidebar_run").set_value(str((runs_root / "fresh").resolve())).run()
    assert_clean(at)
    assert at.subheader[0].value == "fresh" and "no evaluation yet" in texts(at)
    assert len(at.metric) == 1  # only the perplexity, from run.json

    at.sidebar.selectbox(key="sidebar_run").set_value(str(PAPER_RUN.resolve())).run()
    assert_clean(at)
    assert "numbers reported elsewhere" in texts(at)


@pytest.mark.parametrize("metrics, retrieval", [
    ('{"model": {"bleu_4": "x"}, "nn_caption_baseline": null}', '{"rows": [{"level": "R1"}], "paired": [3]}'),
    ("[1, 2]", '{"rows": "none", "paired": [{"a": "last_two_words", "b": "full_caption", "R1_p_at_10": 5}]}'),
    ("{broken", "null"),
])
def test_overview_survives_foreign_or_hand_edited_summaries(runs_root, tmp_path, monkeypatch, metrics, retrieval):
    monkeypatch.setenv("RIS_RUNS_DIRS", str(tmp_path / "runs"))
    run = tmp_path / "runs" / "edited"
    shutil.copytree(runs_root / "evaluated", run, ignore=shutil.ignore_patterns("checkpoints"))
    (run / "eval" / "caption_metrics.json").write_text(metrics)
    (run / "eval" / "retrieval.json").write_text(retrieval)
    at = app(run=run)
    assert_clean(at)
    assert at.subheader[0].value == "edited" and len(at.metric) == 1  # perplexity only: nothing else is usable


# ---------------------------------------------------------------- 1. training curves


def test_training_curves_overlay_runs_with_reported_dashed(runs_root):
    at = app("pages/training_curves.py", runs=[runs_root / "evaluated", PAPER_RUN])
    assert_clean(at)
    assert at.title[0].value == "Training curves"
    charts = at.get("plotly_chart")
    assert len(charts) == 2
    spec = charts[0].proto.spec
    assert "paper-2024 (reported)" in spec and '"dash":"dash"' in spec.replace(" ", "")
    saved_as = json.loads(charts[0].proto.config)["toImageButtonOptions"]  # the camera button's file name
    assert saved_as["filename"] == "evaluated-paper-2024-loss" and saved_as["format"] == "png"
    assert "best epoch" in spec
    assert len(at.dataframe) == 2 and at.download_button
    history = at.dataframe[1].value
    assert set(history["run"]) == {"evaluated", "paper-2024"}

    at.toggle(key="curves_log").set_value(True).run()
    assert_clean(at)
    assert '"type":"log"' in at.get("plotly_chart")[0].proto.spec.replace(" ", "")
    raw = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    at.slider(key="curves_smoothing").set_value(0.6).run()
    assert_clean(at)
    smoothed = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    line = next(t for t in smoothed if t["name"] == "evaluated · val" and t["mode"] == "lines+markers")
    before = next(t for t in raw if t["name"] == "evaluated · val")
    assert line["y"][0] == pytest.approx(before["y"][0]) and line["y"][1] != pytest.approx(before["y"][1])
    assert any(t["name"] == "evaluated · val raw" and t["y"] == before["y"] for t in smoothed)  # raw kept, faint

    at.sidebar.multiselect(key="sidebar_runs").set_value([str((runs_root / "fresh").resolve())]).run()
    assert_clean(at)
    assert set(at.dataframe[1].value["run"]) == {"fresh"}


def test_training_curves_view_lives_in_the_link(runs_root):
    shared = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT)
    shared.query_params.update({"runs": ["evaluated", "paper-2024"], "log": "true", "smoothing": "0.6"})
    shared.run()
    shared.switch_page("pages/training_curves.py").run()
    assert_clean(shared)
    assert shared.toggle(key="curves_log").value is True and shared.slider(key="curves_smoothing").value == 0.6
    assert set(shared.dataframe[1].value["run"]) == {"evaluated", "paper-2024"}
    link = next(c.value for c in shared.code if "?runs=" in c.value)
    assert "runs=evaluated" in link and "runs=paper-2024" in link and "log=True" in link and "smoothing=0.6" in link


def test_training_curves_show_each_runs_status_and_note(runs_root, tmp_path, monkeypatch):
    ablation = tmp_path / "ablation"
    ablation.mkdir()
    monkeypatch.setenv("RIS_RUNS_DIRS", f"{runs_root}{os.pathsep}{tmp_path}")
    shutil.copy(runs_root / "fresh" / "history.csv", ablation / "history.csv")
    info = json.loads((runs_root / "fresh" / "run.json").read_text())
    (ablation / "run.json").write_text(json.dumps({**info, "name": "ablation", "status": "stopped",
                                                   "args": {**info["args"], "dropout": 0.25},
                                                   "note": "Dropout 0.25; stopped by hand after epoch 2."}))
    at = app("pages/training_curves.py", runs=[runs_root / "evaluated", ablation])
    assert_clean(at)
    summary = at.dataframe[0].value.set_index("run")
    assert summary.loc["ablation", "status"] == "stopped" and summary.loc["evaluated", "status"] == "complete"
    assert any(r"**ablation**: Dropout 0\.25; stopped by hand" in c.value for c in at.caption)  # as text
    assert not any("**evaluated**" in c.value for c in at.caption)  # no note, no line
    differing = at.dataframe[1].value  # only what differs: the dropout
    assert list(differing.columns) == ["dropout"] and differing.loc["ablation", "dropout"] == "0.25"
    history = pd.read_csv(ablation / "history.csv")
    assert summary.loc["ablation", "last val loss"] == pytest.approx(history.sort_values("epoch")["val_loss"].iloc[-1])
    assert summary.loc["ablation", "min train loss"] == pytest.approx(history["train_loss"].min())


def test_training_curves_open_trainer_state_and_reject_garbage(runs_root):
    at = app("pages/training_curves.py", runs=[runs_root / "evaluated"])
    state = {"log_history": [
        {"epoch": 1.0, "loss": 3.2, "learning_rate": 1e-3, "step": 10},
        {"epoch": 1.0, "eval_loss": 2.9, "step": 10},
        {"epoch": 2.0, "loss": 2.5, "step": 20},
        {"epoch": 2.0, "eval_loss": 2.4, "step": 20},
    ]}
    at.file_uploader(key="curves_upload").set_value(
        ("trainer_state.json", json.dumps(state).encode(), "application/json")).run()
    assert_clean(at)
    assert any(r"trainer\_state\.json" in s.value for s in at.success)  # the file's name, as text
    assert "trainer_state.json" in set(at.dataframe[1].value["run"])

    at.file_uploader(key="curves_upload").set_value(("notes.csv", b"\x00\x01garbage\xff", "text/csv")).run()
    assert_clean(at)
    assert at.error and r"notes\.csv" in at.error[0].value


def test_history_parsers_accept_aliases_and_explain_failures():
    frame = parse_history("h.csv", b"Epoch,loss,eval_loss\n1,3.0,2.5\n2,2.0,1.5\n")
    assert frame["epoch"].tolist() == [1, 2]
    assert frame["val_perplexity"].round(3).tolist() == [round(float(np.exp(2.5)), 3), round(float(np.exp(1.5)), 3)]
    merged = parse_history("trainer_state.json", json.dumps({"log_history": [
        {"epoch": 0.5, "loss": 4.0}, {"epoch": 1.0, "loss": 3.0}, {"epoch": 1.0, "eval_loss": 2.0}]}).encode())
    assert merged["epoch"].tolist() == [0.5, 1.0] and merged["val_loss"].isna().tolist() == [True, False]
    for name, data, message in [
        ("a.csv", b"step,accuracy\n1,0.5\n", "no 'epoch' column"),
        ("a.csv", b"epoch,accuracy\n1,0.5\n", "no loss column"),
        ("s.json", b'{"global_step": 3}', "log_history"),
        ("s.json", b"{not json", "not valid JSON"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_history(name, data)


# ---------------------------------------------------------------- 2. caption quality


def test_caption_quality_metrics_histogram_and_filters(runs_root):
    at = app("pages/caption_quality.py", run=runs_root / "evaluated")
    assert_clean(at)
    labels = [m.label for m in at.metric]
    assert {"BLEU-1", "BLEU-4", "Last two words match", "Exact match"} <= set(labels)
    assert all("vs NN caption" in (m.proto.delta or "") for m in at.metric)
    assert "held-out products scored" in texts(at)
    assert "Reranked" in texts(at) and "vs greedy" in texts(at)
    assert at.get("plotly_chart")
    table = at.dataframe[-1].value
    assert table["image"].str.startswith("data:image/jpeg;base64,").all()
    assert {"generated", "reranked", "nn_caption"} <= set(table.columns)
    metrics = json.loads((runs_root / "evaluated" / "eval" / "caption_metrics.json").read_text())
    assert f"{metrics['model']['bleu_1']:.1f}" != f"{metrics['reranked']['bleu_1']:.1f}"  # the cards can tell
    assert {m.label: m.value for m in at.metric}["BLEU-1"] == f"{metrics['model']['bleu_1']:.1f}"
    at.button_group(key="quality_decoding").set_value("reranked").run()
    assert_clean(at)
    assert {m.label: m.value for m in at.metric}["BLEU-1"] == f"{metrics['reranked']['bleu_1']:.1f}"

    article = sorted(table["articleType"].unique())[0]
    at.multiselect(key="quality_article").set_value([article]).run()
    assert_clean(at)
    filtered = at.dataframe[-1].value
    assert len(filtered) and (filtered["articleType"] == article).all()
    counts = {}
    for wanted in ("match", "no match"):
        at.radio(key="quality_match").set_value(wanted).run()
        assert_clean(at)
        shown = at.dataframe[-1].value
        assert (shown["articleType"] == article).all()
        assert (shown["last_two_match"].astype(str).str.lower() == str(wanted == "match").lower()).all(), wanted
        counts[wanted] = int(next(c.value for c in at.caption if "match the filters" in c.value).split(" of ")[0])
    assert counts["match"] + counts["no match"] == len(filtered)  # the two filters split the article's products



@pytest.fixture
def brand_run(runs_root):
    """A copy of `evaluated` beside it (where the sidebar finds runs), removed after the test."""
    run = runs_root / "brands"
    shutil.copytree(runs_root / "evaluated", run)
    yield run
    shutil.rmtree(run)


def test_caption_quality_shows_how_often_the_first_word_is_right_for_the_products_shown(brand_run):
    """The first word (mostly the brand) comes from captions.csv, so older evaluations show it too."""
    run = brand_run
    path = run / "eval" / "captions.csv"
    captions = pd.read_csv(path, keep_default_na=False)
    first = captions["reference"].str.split().str[0]
    n = len(captions)
    captions["seen"] = [i % 2 == 0 for i in range(n)]
    # greedy: the reference's first word on every third product; the baseline: on every product
    captions["generated"] = [f"{w} Shirt" if i % 3 == 0 else "Zzz Shirt" for i, w in enumerate(first)]
    captions["nn_caption"] = first + " Bag"
    captions.to_csv(path, index=False)

    def shown(at: AppTest) -> str:
        return next(m for m in at.metric if m.label == "First word (brand) matches")

    at = app("pages/caption_quality.py", run=run)
    assert_clean(at)
    assert run.name in texts(at) or run.name in str([s.value for s in at.selectbox])
    everywhere = sum(i % 3 == 0 for i in range(n)) / n
    assert shown(at).value == f"{everywhere * 100:.1f}%"
    assert shown(at).proto.delta == f"{(everywhere - 1) * 100:+.1f}% vs NN caption"
    at.button_group(key="quality_subset").set_value("novel").run()
    assert_clean(at)
    odd = [i for i in range(n) if i % 2]
    novel = sum(i % 3 == 0 for i in odd) / len(odd)
    assert novel != everywhere and shown(at).value == f"{novel * 100:.1f}%"
    assert not any("brand step" in c.value for c in at.caption)
    # an evaluation of a run with a brand step says its greedy captions begin with the step's word
    metrics_path = run / "eval" / "caption_metrics.json"
    metrics_path.write_text(json.dumps({**json.loads(metrics_path.read_text()), "brand_step_words": 432}))
    at = app("pages/caption_quality.py", run=run)
    assert_clean(at)
    assert any("Greedy after a brand step" in c.value and "over 432 words" in c.value for c in at.caption)

def test_compare_captions_marks_words_filters_and_reopens_from_its_link(runs_root):
    from ris_core.caption_compare import System, compare_table, only

    at = app("pages/compare_captions.py", runs=[runs_root / "evaluated"])
    assert_clean(at)
    assert at.multiselect(key="compare_systems").value == ["evaluated · greedy", "evaluated · reranked"]
    frame = pd.read_csv(runs_root / "evaluated" / "eval" / "captions.csv", keep_default_na=False)
    systems = [System("evaluated", "greedy"), System("evaluated", "reranked")]
    table = compare_table({s: frame for s in systems})
    diff = next(m.value for m in at.markdown if m.value.startswith("| id | name |"))
    assert ":gray[~~" in diff  # greedy captions are the names' last three words: the first words are missing
    summary = at.dataframe[0].value
    assert summary["products"].tolist() == [len(table)] * 2

    at.selectbox(key="compare_filter").set_value("one_right").run()
    assert_clean(at)
    expected = only(table, systems, "one_right")
    assert at.dataframe[0].value["products"].tolist() == [len(expected)] * 2
    assert len(expected), "the fixture should have products where only one caption ends right"
    product = str(int(expected["id"].iloc[-1]))
    at.selectbox(key="compare_product").set_value(product).run()
    assert_clean(at)
    assert at.query_params["product"] == product and at.query_params["only"] == "one_right"
    link = at.code[-1].value
    assert f"product={product}" in link and "only=one_right" in link

    # a new session opened on that link: the same runs, captions, filter and product
    shared = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT)
    for name, values in at.query_params.items():
        shared.query_params[name] = values
    shared.run()
    shared.switch_page("pages/compare_captions.py").run()
    assert_clean(shared)
    assert shared.selectbox(key="compare_filter").value == "one_right"
    assert shared.selectbox(key="compare_product").value == product
    assert shared.multiselect(key="compare_systems").value == ["evaluated · greedy", "evaluated · reranked"]
    from ris_app.widgets import md

    name = md(expected.loc[expected["id"] == int(product), "reference"].iloc[0])
    assert any(m.value.startswith(f"**{name}**") for m in shared.markdown)  # the product's own card


def test_compare_captions_of_two_runs_and_of_runs_without_evaluation(runs_root, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "evaluated", root / "evaluated")
    shutil.copytree(runs_root / "evaluated", root / "other")
    path = root / "other" / "eval" / "captions.csv"
    other = pd.read_csv(path, keep_default_na=False)
    other["generated"] = other["reference"]  # a perfect captioner
    other.iloc[1:].to_csv(path, index=False)  # ... that skipped one product
    shutil.copytree(runs_root / "fresh", root / "fresh")
    monkeypatch.setenv("RIS_RUNS_DIRS", str(root))
    at = app("pages/compare_captions.py", runs=[root / "evaluated", root / "other", root / "fresh"])
    assert_clean(at)
    assert at.multiselect(key="compare_systems").value == ["evaluated · greedy", "other · greedy"]
    assert "not evaluated yet" in texts(at) and "fresh" in texts(at)
    summary = at.dataframe[0].value.set_index("captions")
    assert summary.loc["other · greedy", "last two right"] == 1.0
    assert summary.loc["other · greedy", "products"] == len(other) - 1  # only products both runs captioned
    assert "held out by every chosen run" in texts(at)
    at.multiselect(key="compare_systems").set_value([]).run()
    assert_clean(at)
    assert "Pick at least one" in texts(at)


def test_caption_quality_by_category_worst_first_and_one_click_to_examples(runs_root):
    from ris_core.evaluation.categories import per_category

    at = app("pages/caption_quality.py", run=runs_root / "evaluated")
    at.slider(key="quality_min_size").set_value(1).run()
    assert_clean(at)
    captions = pd.read_csv(runs_root / "evaluated" / "eval" / "captions.csv", keep_default_na=False)
    expected = per_category(captions, "articleType").sort_values("bleu_4")
    chart = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                 if json.loads(c.proto.spec)["layout"].get("yaxis", {}).get("title", {}).get("text") == "articleType")
    bars = chart["data"][0]
    assert bars["y"] == expected["category"].tolist()  # worst BLEU-4 first...
    assert chart["layout"]["yaxis"]["autorange"] == "reversed"  # ... drawn at the top
    assert bars["text"] == [f"n={n}" for n in expected["products"]]
    worst = expected["category"].iloc[0]
    at.button(key=f"quality_worst_{worst}").click().run()
    assert_clean(at)
    samples = at.dataframe[-1].value
    assert len(samples) and (samples["articleType"] == worst).all()
    at.button_group(key="quality_by").set_value("gender").run()
    assert_clean(at)
    assert any(json.loads(c.proto.spec)["layout"].get("yaxis", {}).get("title", {}).get("text") == "gender"
               for c in at.get("plotly_chart"))


def test_caption_quality_view_lives_in_the_link(runs_root):
    captions = pd.read_csv(runs_root / "evaluated" / "eval" / "captions.csv", keep_default_na=False)
    article = captions["articleType"].value_counts().index[0]
    shared = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT)
    shared.query_params.update({"run": "evaluated", "captions": "reranked", "products": "novel", "group": "gender",
                                "sort": "last_two_match", "min_size": "3", "types": [article, "<b>nonsense</b>"],
                                "last_two": "no match"})
    shared.run()
    shared.switch_page("pages/caption_quality.py").run()
    assert_clean(shared)
    assert not shared.warning or all("Session State" not in w.value for w in shared.warning)
    assert shared.segmented_control(key="quality_decoding").value == "reranked"
    assert shared.segmented_control(key="quality_by").value == "gender"
    assert shared.slider(key="quality_min_size").value == 3
    assert shared.multiselect(key="quality_article").value == [article]  # the unknown type is dropped
    samples = shared.dataframe[-1].value
    assert (samples["articleType"] == article).all() and not samples["last_two_match"].astype(bool).any()
    link = next(c.value for c in shared.code if "?run=" in c.value)
    assert "captions=reranked" in link and "group=gender" in link and "min_size=3" in link and "types=" in link


def test_caption_quality_empty_state_then_evaluate_button(runs_root):
    at = app("pages/caption_quality.py", run=runs_root / "fresh")
    assert_clean(at)
    assert "no caption evaluation yet" in texts(at)
    at.button(key="quality_evaluate").click().run()  # starts a background job; the page follows its progress
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    deadline = time.time() + 300
    while not (runs_root / "fresh" / "eval" / "caption_metrics.json").is_file() and time.time() < deadline:
        time.sleep(0.2)
    assert (runs_root / "fresh" / "eval" / "caption_metrics.json").is_file()
    time.sleep(0.5)  # the job records "done" right after swapping eval/ in
    at.run()
    assert_clean(at)
    assert any(m.label == "BLEU-4" for m in at.metric)


# ---------------------------------------------------------------- 3. query strategies


def test_query_strategies_side_by_side_and_aggregate(runs_root):
    at = app("pages/query_strategies.py", run=runs_root / "evaluated")
    assert_clean(at)
    assert at.multiselect(key="strategies_names").value == ["last_two_words", "full_caption"]
    assert len(queries(at)) == 2
    body = texts(at)
    assert "Generated caption" in body and "relevant**]" in body and "of 10 relevant (R1)" in body
    strategies = at.dataframe[-1].value["strategy"]
    assert at.get("plotly_chart") and strategies.str.startswith("oracle:").any()
    assert strategies.str.startswith("reranked:").any()
    assert "last_two_words − full_caption" in body and "95% CI" in body

    at.multiselect(key="strategies_names").set_value(["last_two_words", "full_caption", "drop_brand"]).run()
    at.radio(key="strategies_level").set_value("R2").run()
    assert_clean(at)
    assert len(queries(at)) == 3
    assert "at R2" in texts(at)
    before = at.selectbox(key="strategies_product").value
    for _ in range(5):  # a random pick lands on another product within a few tries
        at.button(key="strategies_random").click().run()
        if at.selectbox(key="strategies_product").value != before:
            break
    assert_clean(at)
    assert at.selectbox(key="strategies_product").value != before


def test_query_strategies_precision_curves_end_at_the_tables_p_at_10(runs_root):
    at = app("pages/query_strategies.py", run=runs_root / "evaluated")
    assert_clean(at)
    chosen = at.multiselect(key="strategies_curves").value
    assert chosen[:2] == ["last_two_words", "full_caption"]
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    curve = next(c for c in charts if c["layout"].get("xaxis", {}).get("title", {}).get("text") == "k (results judged)")
    lines = {t["name"]: t for t in curve["data"] if t.get("mode") == "lines+markers"}
    assert set(lines) == set(chosen)
    summary = json.loads((runs_root / "evaluated" / "eval" / "retrieval.json").read_text())
    table = {r["strategy"]: r for r in summary["rows"] if r["level"] == "R1" and r.get("subset", "all") == "all"}
    for name, trace in lines.items():
        assert trace["x"][-1] == 10 and abs(trace["y"][-1] - table[name]["p_at_10"]) < 1e-9
        assert abs(trace["y"][0] - table[name]["p_at_1"]) < 1e-9
    ranks = at.dataframe[-2].value  # beside the curves; the strategies table is last
    assert set(ranks["strategy"]) == set(chosen) and {"MRR", "nDCG@10", "MRR 95% CI"} <= set(ranks.columns)
    at.multiselect(key="strategies_curves").set_value([]).run()
    assert_clean(at)
    assert "to see their P@k curves" in texts(at)


def test_query_strategies_view_lives_in_the_link(runs_root):
    at = app("pages/query_strategies.py", run=runs_root / "evaluated")
    options = at.selectbox(key="strategies_product").options
    product = int(options[-1].split(" · ")[0])
    shared = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT)
    shared.query_params.update({"run": "evaluated", "strategies": ["drop_brand", "last_two_words"], "level": "R3",
                                "product": str(product), "products": "novel", "refine": "true"})
    shared.run()
    shared.switch_page("pages/query_strategies.py").run()
    assert_clean(shared)
    assert shared.multiselect(key="strategies_names").value == ["drop_brand", "last_two_words"]
    assert shared.radio(key="strategies_level").value == "R3"
    assert shared.selectbox(key="strategies_product").value == product
    assert shared.toggle(key="strategies_refine").value is True
    assert not shared.warning or all("Session State" not in w.value for w in shared.warning)
    link = next(c.value for c in shared.code if "?run=" in c.value)
    assert f"product={product}" in link and "level=R3" in link and "strategies=drop_brand" in link
    # nonsense in a link is ignored, not an error
    odd = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT)
    odd.query_params.update({"strategies": ["<script>", "last_two_words"], "level": "R9", "product": "abc"})
    odd.run()
    odd.switch_page("pages/query_strategies.py").run()
    assert_clean(odd)
    assert odd.multiselect(key="strategies_names").value == ["last_two_words"]


def test_query_strategies_without_evaluation_captions_live(runs_root, tmp_path, monkeypatch):
    run = tmp_path / "runs" / "live"
    monkeypatch.setenv("RIS_RUNS_DIRS", str(tmp_path / "runs"))
    shutil.copytree(runs_root / "evaluated", run, ignore=shutil.ignore_patterns("eval"))
    at = app("pages/query_strategies.py", run=run)
    assert_clean(at)
    assert "Generated caption" in texts(at) and len(queries(at)) == 2
    assert "no retrieval evaluation yet" in texts(at)


def test_query_strategies_refinement_before_after_and_aggregate(runs_root):
    at = app("pages/query_strategies.py", run=runs_root / "evaluated")
    body = texts(at)
    assert "After refinement" not in body  # off by default
    assert "P@10 (R1) refined − unrefined" in body and "95% CI" in body  # evaluate.py wrote +refine rows
    assert "last_two_words+refine" in set(at.dataframe[-1].value["strategy"])
    assert "refined (re-ranked by agreement" in at.get("plotly_chart")[0].proto.spec

    at.toggle(key="strategies_refine").set_value(True).run()
    assert_clean(at)
    body = texts(at)
    assert body.count("Before refinement") == 2 and body.count("After refinement") == 2
    assert "agreement **" in body and "· was #" in body and "refined in" in body
    assert body.count("dropped 0, failed 0") == 2

    at.slider(key="strategies_refine_threshold").set_value(1.0).run()  # only a perfect agreement survives
    assert_clean(at)
    assert "dropped 0, failed 0" not in texts(at) and "dropped " in texts(at)


# ---------------------------------------------------------------- 4. search demo


def test_search_demo_gallery_pick_shows_caption_queries_and_timings(runs_root):
    at = app("pages/search_demo.py", run=runs_root / "evaluated")
    assert_clean(at)
    body = texts(at)
    assert "Caption:" in body and "captioned in" in body and "search:" in body
    assert len(queries(at)) == 4  # two strategies, the hybrid and the visual baseline
    from ris_app import loaders

    # the photo was captioned with the catalog's names as guesses (ris_core.draft): the captioner kept them
    draft = loaders.captioner(Run(runs_root / "evaluated")).draft
    assert draft is not None and len(draft.propose([], 4)) > 0
    gallery = [b for b in at.button if b.key and b.key.startswith("demo_pick_")]
    gallery[-1].click().run()
    assert_clean(at)
    assert "Held-out product" in texts(at)
    picked = gallery[-1].key.removeprefix("demo_pick_")
    link = next(c.value for c in at.code if "?run=" in c.value)
    assert f"product={picked}" in link
    # the link reopens that product in a new session; a product the catalog lacks falls back to the first
    for product, shown in ((picked, picked), ("99999999", None)):
        shared = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT)
        shared.query_params.update({"run": "evaluated", "product": product})
        shared.run()
        shared.switch_page("pages/search_demo.py").run()
        assert_clean(shared)
        opened = next(c.value for c in shared.code if "?run=" in c.value)
        assert (f"product={shown}" in opened) if shown else ("product=99999999" not in opened)


def test_search_demo_searches_with_the_reranked_caption_unless_turned_off(runs_root):
    from ris_core.strategies import STRATEGIES

    with fixed_caption("zzz unknown words"):  # no catalog name: reranking must pick something searchable
        at = app("pages/search_demo.py", run=runs_root / "evaluated")
        assert_clean(at)
        reranked = next(m.value for m in at.markdown if m.value.startswith("Reranked: **"))
        text = reranked.removeprefix("Reranked: **").removesuffix("**")
        assert "reranked in" in texts(at) and text != "zzz unknown words"
        assert at.code[0].value == STRATEGIES["last_two_words"](text.replace("\\", ""))
        at.toggle(key="demo_rerank").set_value(False).run()
        assert_clean(at)
        assert not any(m.value.startswith("Reranked:") for m in at.markdown)
        assert at.code[0].value == "unknown words"


def test_search_demo_sessions_share_a_photos_caption_and_reranking(runs_root):
    from ris_core.captioner import Captioner

    first = app("pages/search_demo.py", run=runs_root / "evaluated")
    assert_clean(first)

    def fail(*args, **kwargs):
        raise AssertionError("the model ran again for a photo another session already captioned")

    with mock.patch.object(Captioner, "run_batch", fail), mock.patch.object(Captioner, "n_best", fail), \
            mock.patch.object(Captioner, "log_likelihoods", fail):
        second = app("pages/search_demo.py", run=runs_root / "evaluated")
    assert_clean(second)
    assert [m.value for m in second.markdown if m.value.startswith(("Caption:", "Reranked:"))] == \
        [m.value for m in first.markdown if m.value.startswith(("Caption:", "Reranked:"))]


def test_search_demo_answers_a_gallery_photo_from_the_shipped_files_without_the_model(runs_root, tiny_catalog,
                                                                                      tmp_path, monkeypatch):
    import json

    from ris_app import loaders
    from ris_core import demo_artifacts
    from training.precompute_demo import main as precompute

    data = shutil.copytree(tiny_catalog, tmp_path / "catalog")
    precompute(["--run", str(runs_root / "evaluated"), "--data_dir", str(data)])
    monkeypatch.setenv("RIS_DATA_DIR", str(data))
    shipped = json.loads(demo_artifacts.paths(data, "evaluated")[1].read_text())

    def fail(*args, **kwargs):
        raise AssertionError("the captioner was loaded for a photo the demo ships precomputed")

    for clear in (loaders._captioner.clear, loaders._photo_caption.clear, loaders._photo_rerank.clear):
        clear()
    with mock.patch("ris_core.captioner.load_any_captioner", fail):
        at = app("pages/search_demo.py", run=runs_root / "evaluated")
    assert_clean(at)
    assert "captioned ahead of time" in texts(at)
    label = next(m.value for m in at.markdown if m.value.startswith("Caption: **"))
    assert any(label == f"Caption: **{p['greedy']}**" for p in shipped["photos"]) or "(empty)" in label
    assert "search:" in texts(at)  # the visual column answered from the int8 index, nothing embedded

    # stale files (other weights) are ignored: the demo captions live again
    meta = demo_artifacts.paths(data, "evaluated")[1]
    meta.write_text(meta.read_text().replace(shipped["weights_sha256"], "0" * 16))
    loaders._demo_artifacts.clear()
    again = app("pages/search_demo.py", run=runs_root / "evaluated")
    assert_clean(again)
    assert "captioned ahead of time" not in texts(again) and "captioned in" in texts(again)


@pytest.mark.parametrize("name, data, ok", [
    ("photo.png", png_bytes("RGBA", color=(10, 200, 10, 120)), True),
    ("cmyk.jpg", None, True),
    ("deep.png", png_bytes("I;16", color=40_000), True),
    ("notes.png", b"this is not an image at all", False),
    ("cut.jpg", None, False),
    ("huge.png", huge_png_header(), False),
])
def test_search_demo_uploads(runs_root, name, data, ok):
    if name == "cmyk.jpg":
        out = io.BytesIO()
        Image.new("CMYK", (64, 64), (0, 120, 200, 0)).save(out, format="JPEG")
        data = out.getvalue()
    if name == "cut.jpg":
        out = io.BytesIO()
        Image.effect_noise((200, 200), 60).convert("RGB").save(out, format="JPEG")
        data = out.getvalue()[:400]
    at = app("pages/search_demo.py", run=runs_root / "evaluated")
    at.file_uploader(key="demo_upload").set_value((name, data, "image/png")).run()
    assert_clean(at)
    if ok:
        assert not at.error, [e.value for e in at.error]
        assert "Your photo" in texts(at) and "Caption:" in texts(at)
    else:
        assert at.error and "cannot be used" in at.error[0].value
        assert "Traceback" not in at.error[0].value
        # the rest of the page still works: a gallery pick replaces the bad upload
        next(b for b in at.button if b.key and b.key.startswith("demo_pick_")).click().run()
        assert_clean(at)
        assert "Caption:" in texts(at)


def test_search_demo_duckduckgo_offline_falls_back_to_catalog(runs_root):
    with fixed_caption("Roadster Men Navy Blue Shirt"):  # a real query, so DuckDuckGo is really asked
        at = app("pages/search_demo.py", run=runs_root / "evaluated")
        at.radio(key="demo_backend").set_value("duckduckgo").run()
    assert_clean(at)
    assert len(at.warning) == 1 and "DuckDuckGo is not available" in at.warning[0].value
    assert "\n" not in at.warning[0].value
    assert "Local catalog" in texts(at)


def test_search_demo_duckduckgo_cached_results_are_labelled(runs_root):
    class CachedWeb:
        name = "duckduckgo"

        def search(self, query, k=10):
            results = [SearchResult(rank=i, title=f"web {i}", image=f"https://example.invalid/{i}.jpg",
                                    thumbnail=f"https://example.invalid/t{i}.jpg", source_url="https://shop.invalid/x")
                       for i in range(1, k + 1)]
            return SearchResponse(query=query, backend="duckduckgo", results=results, seconds=0.001, from_cache=True)

    with mock.patch("ris_app.loaders.duckduckgo", return_value=CachedWeb()):
        at = app("pages/search_demo.py", run=runs_root / "evaluated")
        at.radio(key="demo_backend").set_value("duckduckgo").run()
    assert_clean(at)
    assert not at.warning
    assert "cached web results" in texts(at)


def test_search_demo_unavailable_backend_message_is_one_line(runs_root):
    class Offline:
        name = "duckduckgo"

        def search(self, query, k=10):
            raise SearchUnavailable("DuckDuckGo is unreachable (DNSError); use the local catalog or replay mode")

    with mock.patch("ris_app.loaders.duckduckgo", return_value=Offline()):
        at = app("pages/search_demo.py", run=runs_root / "evaluated")
        at.radio(key="demo_backend").set_value("duckduckgo").run()
    assert_clean(at)
    assert [w.value for w in at.warning] == [
        "DuckDuckGo is not available (DuckDuckGo is unreachable \\(DNSError\\); use the local catalog or replay "
        "mode); showing local catalog results instead."]  # one line, its text escaped (never markdown)


def test_search_demo_refines_web_and_visual_results_with_failures_counted(runs_root):
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (20, 20, 20), (240, 240, 240)]

    class Web:
        name = "duckduckgo"

        def search(self, query, k=10):
            results = [SearchResult(rank=i, title=f"web {i}", image=f"https://refine.invalid/{i}.jpg",
                                    thumbnail=f"https://refine.invalid/t{i}.jpg", source_url="https://shop.invalid/x")
                       for i in range(1, k + 1)]
            return SearchResponse(query=query, backend="duckduckgo", results=results, seconds=0.001)

    def fetch(url):  # stands in for the network: one thumbnail times out, the others are small PNGs
        fetched.append(url)
        index = int(url.rsplit("/t", 1)[1].split(".")[0])
        if index == 2:
            raise TimeoutError("timed out")
        return png_bytes(color=colors[index % len(colors)])

    fetched: list[str] = []
    with mock.patch("ris_app.loaders.duckduckgo", return_value=Web()), \
            mock.patch("ris_core.refine.fetch_url", side_effect=fetch):
        at = app("pages/search_demo.py", run=runs_root / "evaluated")
        at.radio(key="demo_backend").set_value("duckduckgo").run()
        at.toggle(key="demo_refine").set_value(True).run()
        assert_clean(at)
        body = texts(at)
        assert body.count("Before refinement") == 3 and body.count("After refinement") == 3  # 2 web + image kNN
        assert body.count("dropped 0, failed 1") == 2 and "dropped 0, failed 0" in body  # kNN: local files
        assert "TimeoutError" in body and "agreement **" in body and "refined in" in body
        assert sorted(set(fetched)) == sorted(f"https://refine.invalid/t{i}.jpg" for i in range(1, 7))

        calls = len(fetched)
        at.slider(key="demo_refine_threshold").set_value(1.0).run()
        assert_clean(at)
        assert len(fetched) == calls  # thumbnails and failures are remembered: a rerun fetches nothing
        assert "dropped 0" not in texts(at)


def test_imported_paper_notebook_run_has_a_checkpoint(runs_root, tiny_catalog, tmp_path, monkeypatch):
    from ris_core.paper_notebook import NotebookCaptioner, NotebookCaptionerConfig, save_notebook_dir

    run = tmp_path / "runs" / "paper-notebook"
    save_notebook_dir(NotebookCaptioner(NotebookCaptionerConfig(depth=1, width=64, heads=2, image_size=32,
                                                                n_positions=64)), run / "notebook")
    shutil.copyfile(runs_root / "evaluated" / "split.json", run / "split.json")
    (run / "run.json").write_text(json.dumps({"kind": "paper-notebook", "reported_not_reproduced": True}))
    (run / "history.csv").write_text("epoch,val_loss,val_perplexity\n5,1.156,3.18\n")
    monkeypatch.setenv("RIS_RUNS_DIRS", str(tmp_path / "runs"))
    from ris_app import loaders
    from ris_core.data import load_catalog
    from ris_core.runs import Run

    train_ids = loaders.training_ids(Run(run), load_catalog(tiny_catalog).products)
    loaders.build_knn_index(Run(run), tiny_catalog, train_ids)  # what the demo's background job does

    at = app("pages/search_demo.py", run=run)
    assert_clean(at)
    assert "notebook weights" in at.sidebar.selectbox(key="sidebar_run").format_func(str(run.resolve()))
    assert "Caption:" in texts(at) and "reported numbers only" not in texts(at)
    at.toggle(key="demo_refine").set_value(True).run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    assert "After refinement" in texts(at)

    at.switch_page("pages/query_strategies.py").run()
    assert_clean(at)
    assert "Generated caption" in texts(at) and "reported numbers only" not in texts(at)


# ---------------------------------------------------------------- bad runs and folders


@pytest.fixture
def broken_runs(tmp_path, runs_root) -> Path:
    """A runs folder with a corrupt checkpoint, an unreadable history and an unreadable run.json."""
    root = tmp_path / "broken"
    corrupt = root / "corrupt-model"
    shutil.copytree(runs_root / "evaluated", corrupt, ignore=shutil.ignore_patterns("eval"))
    for weights in (corrupt / "model").glob("*.safetensors"):
        weights.write_bytes(b"\x00" * 64)
    bad_history = root / "bad-history"
    bad_history.mkdir(parents=True)
    (bad_history / "history.csv").write_bytes(b"\xff\xfe\x00garbage")
    (bad_history / "run.json").write_text("{not json")
    text_history = root / "text-history"
    text_history.mkdir()
    (text_history / "history.csv").write_text("epoch,train_loss,val_loss\n1,abc,3.0\n2,2.5,n/a\nx,1,1\n")
    return root


def test_bad_runs_show_messages_and_change_nothing_on_disk(monkeypatch, broken_runs, runs_root):
    monkeypatch.setenv("RIS_RUNS_DIRS", str(broken_runs))
    before = snapshot(broken_runs)
    at = app("pages/training_curves.py",
             runs=[broken_runs / "corrupt-model", broken_runs / "bad-history", broken_runs / "text-history"])
    assert_clean(at)
    assert any(r"bad\-history" in w.value for w in at.warning)
    assert set(at.dataframe[1].value["run"]) == {"corrupt-model", "text-history"}  # text cells become gaps

    corrupt = broken_runs / "corrupt-model"
    for page in ("pages/caption_quality.py", "pages/query_strategies.py", "pages/search_demo.py"):
        at = app(page, run=corrupt)
        assert_clean(at)
        if page.endswith("caption_quality.py"):
            at.button(key="quality_evaluate").click().run()
            assert_clean(at)
        assert at.error, page
        assert all("Traceback" not in e.value for e in at.error)

    for page in ("pages/overview.py", "pages/caption_quality.py", "pages/query_strategies.py",
                 "pages/search_demo.py"):
        at = app(page, run=broken_runs / "bad-history")
        assert_clean(at)
        assert at.error or at.info, page
    assert snapshot(broken_runs) == before


def test_missing_data_folder_is_an_error_not_a_crash(runs_root, monkeypatch, tmp_path):
    monkeypatch.setenv("RIS_DATA_DIR", str(tmp_path / "nowhere"))
    for page in ("pages/query_strategies.py", "pages/search_demo.py"):
        at = app(page, run=runs_root / "evaluated")
        assert_clean(at)
        assert at.error and "does not exist" in at.error[0].value


def test_sidebar_choice_survives_page_switches(runs_root):
    at = app("pages/caption_quality.py", run=runs_root / "evaluated")
    fresh = str((runs_root / "fresh").resolve())
    at.sidebar.selectbox(key="sidebar_run").set_value(fresh).run()
    at.switch_page("pages/search_demo.py").run()
    assert_clean(at)
    assert at.sidebar.selectbox(key="sidebar_run").value == fresh


def test_run_can_be_chosen_by_query_parameter(runs_root):
    at = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT)
    at.query_params["run"] = "fresh"
    at.run()
    at.switch_page("pages/caption_quality.py").run()
    assert_clean(at)
    assert at.sidebar.selectbox(key="sidebar_run").value == str((runs_root / "fresh").resolve())


def test_widget_keys_are_unique_across_pages():
    keys: dict[str, str] = {}
    pattern = 'key="'
    for page in sorted((REPO / "pages").glob("*.py")):
        source = page.read_text()
        for chunk in source.split(pattern)[1:]:
            key = chunk.split('"', 1)[0]
            if "{" in key:  # f-string keys are per-item within one page
                continue
            assert keys.setdefault(key, page.name) == page.name, f"{key} used in {keys[key]} and {page.name}"


def test_visual_index_is_embedded_once_then_read_from_disk(runs_root, tiny_catalog, tmp_path):
    """A fresh clone has no evaluation index: a job embeds the catalog once, later servers read it back."""
    from ris_app import loaders
    from ris_core.captioning import CaptionerBase
    from ris_core.runs import Run
    from ris_core.search.image_knn import IndexNotBuilt

    run = Run(tmp_path / "run")  # without eval/, whose index would be reused instead
    shutil.copytree(runs_root / "fresh", run.path, ignore=shutil.ignore_patterns("eval"))
    ids = sorted(int(p.stem) for p in (tiny_catalog / "images").glob("*.jpg"))[:12]
    real, calls = CaptionerBase.embed_paths, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    loaders._knn_index.clear()  # other tests' sessions share this process's cache
    with mock.patch.object(CaptionerBase, "embed_paths", counting):
        with pytest.raises(IndexNotBuilt):
            loaders.knn_index(run, tiny_catalog, ids)  # a page never embeds inside a visitor's request
        loaders.build_knn_index(run, tiny_catalog, ids)
        first = loaders.knn_index(run, tiny_catalog, ids)
        loaders._knn_index.clear()  # a new server process
        again = loaders.knn_index(run, tiny_catalog, ids)
        assert len(calls) == 1 and list(again.ids) == list(first.ids) == ids
        np.testing.assert_array_equal(again.vectors, first.vectors)
        [saved] = (tmp_path / loaders.KNN_CACHE_DIR).glob("*.npz")
        saved.write_bytes(b"torn")  # a kill mid-write elsewhere: built again, no error
        loaders._knn_index.clear()
        with pytest.raises(IndexNotBuilt):
            loaders.knn_index(run, tiny_catalog, ids)
        loaders.build_knn_index(run, tiny_catalog, ids)
        assert list(loaders.knn_index(run, tiny_catalog, ids).ids) == ids and len(calls) == 2


def test_the_demo_warms_the_captioner_once_in_the_background(runs_root, monkeypatch):
    """After answering from precomputed files the demo loads the model in a thread, so an upload need not."""
    import threading

    import ris_core.captioner as captioner_module
    from ris_app import loaders
    from ris_core.runs import Run

    loaders._captioner.clear()
    loaders._warming.clear()
    calls: list[str] = []
    real = captioner_module.load_any_captioner
    monkeypatch.setattr(captioner_module, "load_any_captioner",
                        lambda path, *args, **kwargs: calls.append(str(path)) or real(path, *args, **kwargs))
    run = Run(runs_root / "evaluated")
    loaders.warm_captioner(run)
    loaders.warm_captioner(run)  # once per process and run
    for thread in threading.enumerate():
        if thread.name == "job-warm-captioner":
            thread.join(timeout=120)
    assert len(calls) == 1
    assert loaders.captioner(run) is loaders.captioner(run) and len(calls) == 1  # the page's call finds it loaded


def test_the_server_launcher_imports_the_captioning_stack_then_runs_the_dashboard(monkeypatch):
    """`make run` = `python -m ris_app.serve`: torch and the model code are imported before streamlit starts,
    so no session pays for it, and the options reach `streamlit run dashboard.py` untouched."""
    import sys

    from streamlit.web import cli

    from ris_app import serve

    seen: dict = {"order": []}
    real_preload = serve.preload

    def fake_main() -> int:
        seen["order"].append("streamlit")
        seen["argv"] = list(sys.argv)
        return 0

    monkeypatch.setattr(serve, "preload", lambda: seen["order"].append("preload") or real_preload())
    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(sys, "argv", ["serve"])
    assert serve.main(["--server.port", "8600", "--server.headless", "true"]) == 0
    assert seen["argv"] == ["streamlit", "run", str(serve.DASHBOARD), "--runner.postScriptGC", "false",
                            "--server.port", "8600", "--server.headless", "true"]
    assert seen["order"] == ["preload", "streamlit"] and serve.DASHBOARD.is_file()
    assert {"torch", "transformers", "ris_core.captioner"} <= set(sys.modules)


def test_an_evaluation_is_read_once_and_shared_not_copied_per_view(runs_root):
    """Pages share one read-only copy of an evaluation's tables (a copy per view made a busy server unpickle
    hundreds of thousands of rows each time); a new evaluation is still picked up."""
    import os

    from ris_app import loaders
    from ris_core.runs import Run

    run = Run(runs_root / "evaluated")
    first = loaders.evaluation(run)
    assert first.retrieval is not None and loaders.evaluation(run) is first
    metrics = run.eval_dir / "caption_metrics.json"
    stamp = metrics.stat().st_mtime_ns + 10**9
    os.utime(metrics, ns=(stamp, stamp))  # as a re-evaluation would
    assert loaders.evaluation(run) is not first
