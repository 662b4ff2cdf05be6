"""Safe to deploy: what a hostile visitor or a careless user of a shared server found, each pinned by a test.

Malformed run and evaluation files, folders outside the operator's roots, markdown in names, a 1 x 40,000,000
image, forged safetensors headers, two evaluations of one run at once, a kill in the middle of replacing an
evaluation, implausible training histories.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from ris_app.access import NOT_ALLOWED, Access
from ris_app.history_io import flag_implausible
from ris_app.navigation import PAGE_PATHS
from ris_core.errors import CheckpointError, ImageError
from ris_core.evaluation import files
from ris_core.files import write_text_atomic
from ris_core.images import open_image
from ris_core.jobs import Busy, Jobs
from ris_core.runs import Run, discover_runs
from tests.conftest import REPO
from tests.test_faults import finish, kill_when, start

DASHBOARD = str(REPO / "dashboard.py")
TRACKING = "![x](http://127.0.0.1:9/pixel.png)"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def evaluated(tiny_run, tiny_catalog, tmp_path_factory) -> Path:
    """A copy of the tiny run with its evaluation (k = 10)."""
    from training.evaluate import main as evaluate

    run = shutil.copytree(tiny_run, tmp_path_factory.mktemp("deploy") / "runs" / "good",
                          ignore=shutil.ignore_patterns("checkpoints", "eval"))
    evaluate(["--run", str(run), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50", "--refine_queries", "0"])
    return run


def copy_run(source: Path, dest: Path, with_eval: bool = True) -> Path:
    skipped = ["checkpoints", "eval.partial", *([] if with_eval else ["eval"])]
    return shutil.copytree(source, dest, ignore=shutil.ignore_patterns(*skipped))


def dashboard(monkeypatch, runs: Path, data: Path, page: str, run: Path | None = None, **env: str) -> AppTest:
    monkeypatch.setenv("RIS_RUNS_DIRS", str(runs))
    monkeypatch.setenv("RIS_DATA_DIR", str(data))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    at = AppTest.from_file(DASHBOARD, default_timeout=120)
    if run is not None:
        at.session_state["_keep_sidebar_run"] = str(run.resolve())
    at.run()
    at.switch_page(page).run()
    return at


def shown(at: AppTest) -> str:
    parts = [*at.markdown, *at.caption, *at.info, *at.warning, *at.error, *at.success]
    return "\n".join(str(p.value) for p in parts)


# ---------------------------------------------------------------- 1. one malformed run folder crashes nothing


MALFORMED = {
    "run_json_list": ("run.json", "[1, 2, 3]"),
    "run_json_note_is_a_list": ("run.json", json.dumps({"name": "x", "note": [1], "epochs_done": 2})),
    "split_json_corrupt": ("split.json", '{"seed": 0, "val_ids": [1, 2'),
    "split_json_strings": ("split.json", json.dumps({"seed": 0, "val_fraction": 0.1, "train_ids": ["a"],
                                                     "val_ids": [1]})),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_run_is_listed_as_unreadable_and_every_page_keeps_working(case, evaluated, tiny_catalog,
                                                                             tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    copy_run(evaluated, runs / "good")
    bad = copy_run(evaluated, runs / "bad")
    name, text = MALFORMED[case]
    (bad / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    for page in PAGE_PATHS:
        at = dashboard(monkeypatch, runs, tiny_catalog, page, run=bad)
        assert not at.exception, (page, [e.value for e in at.exception])
    at = dashboard(monkeypatch, runs, tiny_catalog, "pages/caption_quality.py", run=bad)
    assert "cannot be shown" in shown(at)  # the chosen bad run says why instead of crashing
    at = dashboard(monkeypatch, runs, tiny_catalog, "pages/caption_quality.py", run=runs / "good")
    assert not at.exception and any(m.label == "BLEU-4" for m in at.metric)  # the other run still works
    options = at.sidebar.selectbox(key="sidebar_run").options
    assert any("bad · unreadable" in o for o in options) and any(o == "good" for o in options), options


@pytest.mark.parametrize("case", MALFORMED)
def test_the_evaluate_cli_gives_one_error_line_for_a_malformed_run(case, evaluated, tiny_catalog, tmp_path):
    bad = copy_run(evaluated, tmp_path / "bad")
    name, text = MALFORMED[case]
    (bad / name).write_text(text)
    done = finish("training.evaluate", ["--run", str(bad), "--data_dir", str(tiny_catalog), "--quiet"])
    assert done.returncode != 0
    assert done.stderr.strip().startswith("error:") and "Traceback" not in done.stderr, done.stderr[-800:]
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_model_config_holding_a_list_is_a_checkpoint_error(evaluated, tmp_path):
    from ris_core.captioner import load_any_captioner

    bad = copy_run(evaluated, tmp_path / "bad")
    (bad / "model" / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="not a model config object"):
        load_any_captioner(bad)


@pytest.mark.parametrize("state", ["", "{", "[]", '{"captions_key": 5}'], ids=["empty", "torn", "list", "wrong_type"])
@pytest.mark.parametrize("force", [False, True], ids=["rerun", "force"])
def test_a_corrupt_state_json_is_recomputed_not_fatal(state, force, evaluated, tiny_catalog, tmp_path):
    run = copy_run(evaluated, tmp_path / "run")
    shutil.copytree(evaluated / "eval", run / "eval", dirs_exist_ok=True)
    (run / "eval" / files.STATE).write_text(state)
    args = ["--run", str(run), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50", "--refine_queries", "0"]
    done = finish("training.evaluate", args + (["--force"] if force else []))
    assert done.returncode == 0, done.stderr[-1500:]
    assert json.loads((run / "eval" / files.STATE).read_text())["captions_key"]


def test_a_string_where_a_number_belongs_is_dropped_and_reported(evaluated, tiny_catalog, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    run = copy_run(evaluated, runs / "run")
    shutil.copytree(evaluated / "eval", run / "eval", dirs_exist_ok=True)
    metrics = json.loads((run / "eval" / files.CAPTION_METRICS).read_text())
    metrics["model"]["bleu_4"], metrics["images_per_second"], metrics["model"]["loss"] = "lots", "fast", [1]
    (run / "eval" / files.CAPTION_METRICS).write_text(json.dumps(metrics))
    summary = json.loads((run / "eval" / files.RETRIEVAL_SUMMARY).read_text())
    summary["rows"][0]["p_at_10"] = "high"
    summary["n_queries"] = "many"
    (run / "eval" / files.RETRIEVAL_SUMMARY).write_text(json.dumps(summary))
    clean, checked, found = files.read_summaries(run / "eval")
    assert "bleu_4" not in clean["model"] and "images_per_second" not in clean and "n_queries" not in checked
    assert len(checked["rows"]) == len(summary["rows"]) - 1 and len(found) == 3
    monkeypatch.chdir(tmp_path)
    for page in PAGE_PATHS:
        at = dashboard(monkeypatch, runs, tiny_catalog, page, run=run)
        assert not at.exception, (page, [e.value for e in at.exception])
    at = dashboard(monkeypatch, runs, tiny_catalog, "pages/caption_quality.py", run=run)
    assert "malformed field" in shown(at) and {m.label: m.value for m in at.metric}["BLEU-4"] == "–"


# ---------------------------------------------------------------- 2. the operator's folders, and nothing else


def test_only_the_operators_folders_can_be_opened(tmp_path):
    data = tmp_path / "data"
    (data / "styles.csv").parent.mkdir()
    (data / "styles.csv").write_text("id\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (data / "link").symlink_to(outside, target_is_directory=True)  # a symlink under a root, leading out of it
    access = Access.from_env({"RIS_DATA_DIR": str(data)})
    assert access.data_folder(str(data)) == data and access.data_folder("") == data
    for text in ("/", "/proc/self", str(outside), str(data / "link"), str(data / ".." / "outside"),
                 str(tmp_path / "missing"), "~"):
        assert access.data_folder(text) is None, text  # refused, whether it exists or not
    assert access.data_choices() == [data.resolve()]
    assert "/" not in NOT_ALLOWED.replace("/ ", "")
    opened = Access.from_env({"RIS_DATA_DIR": str(data), "RIS_OPEN_FOLDERS": "1"})
    assert opened.data_folder(str(outside)) == outside  # a local single-user server keeps its freedom


def test_messages_for_visitors_name_no_server_path(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    access = Access.from_env({"RIS_DATA_DIR": str(data)})
    message = access.public(f"{data}/styles.csv not found; /proc/24253/styles.csv too; see {REPO}/results/x")
    assert str(tmp_path) not in message and "/proc" not in message and str(REPO) not in message
    assert "data/styles.csv" in message and "results/x" in message
    assert Access.from_env({"RIS_OPEN_FOLDERS": "1"}).public("/proc/1/x") == "/proc/1/x"


def test_the_sidebar_offers_no_free_folder_fields_on_a_shared_server(evaluated, tiny_catalog, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    at = dashboard(monkeypatch, evaluated.parent, tiny_catalog, "pages/overview.py", run=evaluated)
    assert not at.exception
    assert not [t for t in at.sidebar.text_input]  # no "More run folders", no typed data folder
    assert at.sidebar.selectbox(key="sidebar_data_choice").value == str(tiny_catalog.resolve())
    at = dashboard(monkeypatch, evaluated.parent, tiny_catalog, "pages/overview.py", run=evaluated,
                   RIS_OPEN_FOLDERS="1")
    assert {t.key for t in at.sidebar.text_input} == {"sidebar_runs_dirs", "sidebar_data_dir"}


def test_run_discovery_is_bounded(tmp_path):
    deep = tmp_path.joinpath(*[f"d{i}" for i in range(7)])
    deep.mkdir(parents=True)
    (deep / "run.json").write_text("{}")
    (tmp_path / "d0" / "near").mkdir()
    (tmp_path / "d0" / "near" / "run.json").write_text("{}")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "run.json").write_text("{}")
    assert [r.name for r in discover_runs(tmp_path)] == ["near"]
    assert [r.name for r in discover_runs(tmp_path, max_depth=8)] == ["d6", "near"]


# ---------------------------------------------------------------- 3. heavy work as bounded jobs


def test_two_evaluations_of_one_run_at_once_one_runs_the_other_is_told(evaluated, tiny_catalog, tmp_path):
    from ris_core.evaluation.pipeline import EvalConfig, evaluate_run

    run = copy_run(evaluated, tmp_path / "run", with_eval=False)
    started, outcomes = threading.Barrier(3), []

    def evaluate() -> None:
        started.wait()
        try:
            evaluate_run(Run(run), tiny_catalog, EvalConfig(n_boot=50, refine_queries=0, progress_bars=False))
            outcomes.append("done")
        except Busy as err:
            outcomes.append(f"busy: {err}")
        except Exception as err:  # noqa: BLE001 - the test reports any other failure
            outcomes.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=evaluate) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.split(":")[0] for o in outcomes) == ["busy", "busy", "done"], outcomes
    assert all(o == "done" or "already running" in o for o in outcomes)
    assert all((run / "eval" / name).is_file() for name in files.OUTPUTS)
    assert not (run / "eval.partial").exists()


def test_jobs_run_one_per_key_within_the_operators_limit(tmp_path):
    jobs, release = Jobs(tmp_path, max_jobs=1), threading.Event()

    def work(progress) -> None:
        for i in range(3):
            progress("step", i + 1, 3)
        release.wait(10)

    status = jobs.start("a", work)
    assert status.running and jobs.status("a").running
    with pytest.raises(Busy, match="already running"):
        jobs.start("a", work)
    with pytest.raises(Busy, match="1 job"):
        jobs.start("b", work)  # the slot is taken
    release.set()
    deadline = time.time() + 10
    while jobs.status("a").running and time.time() < deadline:
        time.sleep(0.05)
    assert jobs.status("a").state == "done" and jobs.status("a").done == 3
    failing = jobs.start("b", lambda progress: 1 / 0)
    assert failing.running
    while jobs.status("b").running and time.time() < deadline:
        time.sleep(0.05)
    assert jobs.status("b").state == "failed" and "ZeroDivisionError" in jobs.status("b").message
    assert jobs.status("never").state == "idle"


def test_the_evaluate_button_runs_a_background_job_that_every_visitor_sees(evaluated, tiny_catalog, tmp_path,
                                                                          monkeypatch):
    runs = tmp_path / "runs"
    fresh = copy_run(evaluated, runs / "fresh", with_eval=False)
    monkeypatch.chdir(tmp_path)
    at = dashboard(monkeypatch, runs, tiny_catalog, "pages/caption_quality.py", run=fresh)
    at.button(key="quality_evaluate").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    other = dashboard(monkeypatch, runs, tiny_catalog, "pages/caption_quality.py", run=fresh)
    running = not (fresh / "eval" / files.CAPTION_METRICS).is_file()
    if running:  # a second visitor sees the progress, and no button to start another
        assert not [b for b in other.button if b.key == "quality_evaluate"]
    deadline = time.time() + 300
    while not (fresh / "eval" / files.CAPTION_METRICS).is_file() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # the job writes its final status right after swapping eval/ in
    at.run()
    assert not at.exception and any(m.label == "BLEU-4" for m in at.metric)


def test_the_operators_product_limit_stops_heavy_work_before_it_starts(evaluated, tiny_catalog, tmp_path,
                                                                       monkeypatch):
    runs = tmp_path / "runs"
    fresh = copy_run(evaluated, runs / "fresh", with_eval=False)
    monkeypatch.chdir(tmp_path)
    at = dashboard(monkeypatch, runs, tiny_catalog, "pages/caption_quality.py", run=fresh, RIS_MAX_PRODUCTS="5")
    at.button(key="quality_evaluate").click().run()
    assert not at.exception and any("evaluates at most 5" in e.value for e in at.error)
    assert not (fresh / "eval").exists() and not (fresh / "eval.partial").exists()
    at = dashboard(monkeypatch, runs, tiny_catalog, "pages/search_demo.py", run=fresh, RIS_MAX_PRODUCTS="5")
    assert not at.exception and any("embeds at most 5" in e.value for e in at.error)
    assert not list((tmp_path / ".cache" / "knn").glob("*.npz")) if (tmp_path / ".cache" / "knn").exists() else True


# ---------------------------------------------------------------- 4. text from files is text


def test_markdown_in_names_and_notes_is_shown_as_text(evaluated, tiny_catalog, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    run = copy_run(evaluated, runs / f"run {TRACKING}")
    shutil.copytree(evaluated / "eval", run / "eval", dirs_exist_ok=True)
    info = json.loads((run / "run.json").read_text())
    info.update(note=f"{TRACKING} :red[restyled]", model_spec={**info["model_spec"], "encoder": TRACKING})
    (run / "run.json").write_text(json.dumps(info))
    monkeypatch.chdir(tmp_path)
    for page in PAGE_PATHS:
        at = dashboard(monkeypatch, runs, tiny_catalog, page, run=run)
        assert not at.exception, page
        for element in [*at.markdown, *at.caption, *at.info, *at.warning, *at.error]:
            text = str(element.value)
            assert "![x](" not in text and ":red[restyled" not in text, (page, text[:200])


# ---------------------------------------------------------------- 5. small files that cost a lot of memory


def test_a_strip_of_forty_million_pixels_is_refused_before_decoding():
    from tests.test_hostile_input import png_header

    data = png_header(1, 40_000_000)  # within the 40-megapixel budget; padded square it would take gigabytes
    Image.init()  # Pillow's plugins first: one of them builds an image when it is imported
    with mock.patch.object(Image.Image, "load", side_effect=AssertionError("decoded")):
        with pytest.raises(ImageError, match="not a photo's shape"):
            open_image(data)


def test_a_safetensors_header_declaring_more_than_the_file_holds_is_refused(evaluated, tmp_path):
    from ris_core.modeling import load_model_dir, safetensors_shapes

    model = copy_run(evaluated, tmp_path / "run") / "model"
    weights = model / "model.safetensors"
    header = json.dumps({"decoder.transformer.wte.weight": {"dtype": "F32", "shape": [50257, 5000],
                                                            "data_offsets": [0, 50257 * 5000 * 4]}}).encode()
    weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 1024)
    with pytest.raises(CheckpointError, match="truncated or forged"):
        safetensors_shapes(weights)
    with pytest.raises(CheckpointError, match="truncated or forged"):
        load_model_dir(model)
    with open(weights, "r+b") as handle:  # sparse: the declared gigabyte "exists" but holds nothing
        handle.truncate(8 + len(header) + 50257 * 5000 * 4)
    with pytest.raises(CheckpointError, match="declare 251,285,000 parameters"):
        load_model_dir(model)  # refused by comparing with the config's sizes, before reading any tensor


def test_an_upload_is_decoded_once_per_file():
    from ris_app import loaders

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buffer, format="PNG")
    data = buffer.getvalue()
    loaders._decoded.clear()
    with mock.patch.object(loaders, "open_image", wraps=open_image) as opened:
        first, second = loaders.decode_upload(data), loaders.decode_upload(bytes(data))
    assert opened.call_count == 1 and first is second


# ---------------------------------------------------------------- 6. an evaluation's files replaced as one set


def test_a_killed_re_evaluation_leaves_the_previous_set_whole(evaluated, tiny_catalog, tmp_path):
    run = copy_run(evaluated, tmp_path / "run")
    shutil.copytree(evaluated / "eval", run / "eval", dirs_exist_ok=True)
    before = {name: (run / "eval" / name).read_bytes() for name in files.OUTPUTS}
    work = run / "eval.partial"
    args = ["--run", str(run), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50", "--k", "5", "--force",
            "--refine_queries", "0"]
    def replaced(name: str) -> bool:  # the workspace holds a newly written file, not the hard link to eval/'s
        try:
            return (work / name).stat().st_ino != (run / "eval" / name).stat().st_ino
        except FileNotFoundError:
            return False

    moments = {
        "captions written": lambda: replaced(files.STATE) and not replaced("catalog_knn.npz"),
        "metrics written": lambda: replaced(files.CAPTION_METRICS) and not replaced(files.RETRIEVAL_SUMMARY),
    }
    for name, condition in moments.items():
        shutil.rmtree(work, ignore_errors=True)
        assert kill_when(start("training.evaluate", args), condition), f"evaluation ended before {name}"
        after = {n: (run / "eval" / n).read_bytes() for n in files.OUTPUTS}
        assert after == before, f"killed when {name}: eval/ changed before the new set was complete"
    done = finish("training.evaluate", args)
    assert done.returncode == 0, done.stderr[-1500:]
    assert json.loads((run / "eval" / files.RETRIEVAL_SUMMARY).read_text())["k"] == 5  # the new set, whole
    assert (run / "eval" / files.CAPTIONS).read_bytes() and not work.exists()


def test_a_swap_cut_short_between_its_renames_is_recovered(tmp_path):
    eval_dir = tmp_path / "eval"
    old = tmp_path / "eval.old"
    old.mkdir()
    (old / files.CAPTIONS).write_text("id,reference,generated\n1,a,b\n")  # eval/ renamed away, then a kill
    work = files.open_workspace(eval_dir)
    assert eval_dir.is_dir() and (work / files.CAPTIONS).read_text() == (eval_dir / files.CAPTIONS).read_text()
    write_text_atomic(work / files.CAPTIONS, "id,reference,generated\n2,c,d\n")  # writers replace whole files
    assert "1,a,b" in (eval_dir / files.CAPTIONS).read_text()
    files.publish(work, eval_dir)
    assert "2,c,d" in (eval_dir / files.CAPTIONS).read_text() and not work.exists() and not old.exists()


# ---------------------------------------------------------------- 7. implausible histories


def test_implausible_history_values_are_flagged_and_never_best():
    from ris_app.charts import best_epoch

    history = pd.DataFrame({"epoch": [1, 2, 3, 4], "val_loss": [2.0, -5.0, float("nan"), 1.5],
                            "val_perplexity": [7.4, 0.0067, float("inf"), 4.5], "seconds": [60, 1e308, 60, 60]})
    flagged = flag_implausible(history)
    assert best_epoch(flagged) == 4  # -5 would have won
    assert flagged.loc[1, "flags"] == "val_loss -5; val_perplexity 0.0067; seconds 1e+308"
    assert "val_perplexity inf" in flagged.loc[2, "flags"] and flagged.loc[0, "flags"] == ""
    assert flagged["seconds"].sum() == 180


def test_the_training_curves_page_flags_implausible_epochs(evaluated, tiny_catalog, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    run = copy_run(evaluated, runs / "run")
    history = pd.read_csv(run / "history.csv")
    history.loc[0, "val_loss"], history.loc[0, "seconds"] = -5, 1e308
    history.to_csv(run / "history.csv", index=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RIS_RUNS_DIRS", str(runs))
    monkeypatch.setenv("RIS_DATA_DIR", str(tiny_catalog))
    at = AppTest.from_file(DASHBOARD, default_timeout=120)
    at.session_state["_keep_sidebar_runs"] = [str(run.resolve())]
    at.run()
    at.switch_page("pages/training_curves.py").run()
    assert not at.exception
    assert any("implausible" in w.value for w in at.warning)
    summary = at.dataframe[0].value
    assert summary.loc[0, "best epoch"] != 1 and np.isfinite(summary.loc[0, "training minutes"])
    assert summary.loc[0, "training minutes"] < 1e6
