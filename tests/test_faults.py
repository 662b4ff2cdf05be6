"""Faults: processes killed mid-write, concurrent cache writers, and result folders changing under the dashboard.

    pytest tests/test_faults.py -q          # about a minute on 2 free cores: several tiny trainings and evaluations

Each fault is injected at a deterministic point (a file appearing), not after a guessed delay, so the tests hit
the window they name every time. The plain SIGKILL-after-a-whole-epoch resume is tests/test_training.py's job.
Docstrings saying "Regression" name a failure these tests found and the library has since fixed.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest

from ris_app.navigation import PAGE_PATHS
from ris_core.search.duckduckgo import ResultCache
from tests.conftest import REPO, tiny_train_args

pytestmark = pytest.mark.slow
POLL = 0.002  # seconds between looks at the run folder: checkpoint writes of the tiny model take ~100 ms


def start(module: str, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, condition, timeout: float = 180) -> bool:
    """SIGKILL `proc` the moment `condition()` holds; False when it exited first (the window was never seen)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if condition():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(POLL)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return False


def finish(module: str, args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_consistent_run(run_dir: Path, epochs: int) -> None:
    """history.csv has epochs 1..N once each, run.json parses and says complete, model/ loads and captions."""
    from PIL import Image

    from ris_core.captioner import Captioner

    history = pd.read_csv(run_dir / "history.csv")
    assert history["epoch"].tolist() == list(range(1, epochs + 1))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["epochs_done"] == epochs
    assert info["best_epoch"] == int(history.loc[history["val_loss"].idxmin(), "epoch"])
    captioner = Captioner.load(run_dir)
    assert isinstance(captioner.caption([Image.new("RGB", (60, 80), "white")])[0], str)
    assert not (run_dir / "model.tmp").exists() and not (run_dir / "model.old").exists()


# ---------------------------------------------------------------- training killed mid-write


def half_written_checkpoint(checkpoints: Path):
    """A checkpoint-* folder exists but its trainer_state.json (the Trainer's last write) does not yet."""

    def condition() -> bool:
        try:
            entries = list(os.scandir(checkpoints))
        except FileNotFoundError:
            return False
        return any(e.name.startswith("checkpoint-") and not os.path.exists(os.path.join(e.path, "trainer_state.json"))
                   for e in entries)

    return condition


def second_model_export(run_dir: Path):
    """model.tmp (the best epoch's export, swapped in by _replace_dir) appears for the second time."""
    seen = {"count": 0, "present": False}

    def condition() -> bool:
        present = (run_dir / "model.tmp").exists()
        if present and not seen["present"]:
            seen["count"] += 1
        seen["present"] = present
        return present and seen["count"] >= 2

    return condition


@pytest.mark.parametrize("moment", ["checkpoint_write", "model_export"])
def test_training_killed_mid_write_resumes_to_a_consistent_run(tiny_catalog, tiny_run, tmp_path, moment):
    """Regression (checkpoint_write): Trainer creates checkpoint-<step>/ first and writes trainer_state.json last;
    resuming picked that half-written folder and died ("Can't find a valid checkpoint at .../checkpoint-8", or
    FileNotFoundError for its trainer_state.json) on every rerun. model_export: killed while the best epoch's
    model.tmp is written, before it is swapped in for model/."""
    epochs = 3
    cache = tiny_run.parents[1] / "cache"  # the session run's feature cache: no re-extraction
    args = tiny_train_args(tiny_catalog, tmp_path / "runs", cache, name="killed", epochs=epochs)
    run_dir = tmp_path / "runs" / "killed"
    condition = (half_written_checkpoint(run_dir / "checkpoints") if moment == "checkpoint_write"
                 else second_model_export(run_dir))
    assert kill_when(start("training.train", args), condition), f"training ended before the {moment} window"
    left = sorted(str(p.relative_to(run_dir)) for p in (run_dir / "checkpoints").rglob("*"))

    done = finish("training.train", args)
    assert done.returncode == 0, f"resume after a kill at {moment} failed; left behind {left}:\n{done.stderr[-1500:]}"
    assert "resuming run" in done.stderr
    assert_consistent_run(run_dir, epochs)


# ---------------------------------------------------------------- evaluation killed and rerun

EVAL_FILES = ("captions.csv", "caption_metrics.json", "retrieval.csv", "retrieval.json")


@pytest.fixture(scope="module")
def resumed_evaluation(tiny_run, tiny_catalog, tmp_path_factory) -> tuple[Path, list[str]]:
    """A copy of the tiny run whose evaluation was SIGKILLed three times (while captioning, while embedding the
    catalog, while searching), then rerun with the same command to the end. Returns the run and what each kill
    left behind."""
    run = shutil.copytree(tiny_run, tmp_path_factory.mktemp("eval_kill") / "run",
                          ignore=shutil.ignore_patterns("checkpoints", "eval"))
    work = run / "eval.partial"  # where an evaluation writes before swapping the finished set in as eval/
    args = ["--run", str(run), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50"]
    moments = [  # each rerun gets one stage further, then is killed inside the next one
        ("captioning", lambda: work.is_dir() and not (work / "state.json").exists()),
        ("embedding the catalog", lambda: (work / "state.json").exists()
         and not (work / "catalog_knn.npz").exists()),
        ("searching", lambda: (work / "caption_metrics.json").exists()
         and not (work / "retrieval.json").exists()),
    ]
    left = []
    for name, condition in moments:
        assert kill_when(start("training.evaluate", args), condition), f"evaluation ended before {name}"
        assert not (run / "eval").exists(), f"killed while {name}: eval/ appeared before the set was complete"
        left.append(f"{name}: {sorted(p.name for p in work.iterdir())}")
    done = finish("training.evaluate", args)
    assert done.returncode == 0, done.stderr[-1500:]
    return run, left


def test_evaluation_killed_three_times_then_rerun_writes_all_four_files(resumed_evaluation):
    run, left = resumed_evaluation
    eval_dir = run / "eval"
    assert all((eval_dir / name).is_file() for name in EVAL_FILES), left
    split = json.loads((run / "split.json").read_text())
    captions = pd.read_csv(eval_dir / "captions.csv", keep_default_na=False)
    assert sorted(captions["id"]) == sorted(split["val_ids"])  # every held-out product once, none twice
    metrics = json.loads((eval_dir / "caption_metrics.json").read_text())
    assert metrics["n_scored"] == len(captions)
    retrieval = pd.read_csv(eval_dir / "retrieval.csv", keep_default_na=False)
    assert retrieval.groupby("strategy")["id"].apply(lambda ids: sorted(ids) == sorted(captions["id"])).all()
    summary = json.loads((eval_dir / "retrieval.json").read_text())
    assert summary["n_queries"] == len(captions) and summary["rows"]


def test_a_torn_embedding_file_from_a_killed_forced_rerun_is_recomputed(resumed_evaluation, tiny_catalog, tmp_path):
    """Regression: eval/val_embeddings.npy was written with a plain np.save while state.json kept the previous
    run's captions_key, so a --force rerun killed inside np.save left a torn file that every later run reused and
    died on (raw ValueError from np.load)."""
    from training.evaluate import main as evaluate_main

    run = shutil.copytree(resumed_evaluation[0], tmp_path / "run")
    embeddings = run / "eval" / "val_embeddings.npy"
    embeddings.write_bytes(embeddings.read_bytes()[:1000])  # what a kill inside np.save leaves
    evaluate_main(["--run", str(run), "--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50"])
    assert (run / "eval" / "retrieval.json").is_file()


# ---------------------------------------------------------------- DuckDuckGo cache: concurrent and killed writers


def payload(worker: int, i: int) -> list[dict]:
    return [{"title": f"w{worker} #{i}", "image": f"https://img.invalid/{worker}/{i}.jpg", "pad": "x" * (i % 7) * 100}]


def interleaved_worker(path: str, worker: int, count: int, errors) -> None:
    """Write shared and own keys, reading the other worker's keys between writes; record any torn read."""
    cache = ResultCache(path)
    other = 1 - worker
    for i in range(count):
        cache.put(f"own-{worker}-{i}", {"w": worker}, payload(worker, i), float(i))
        cache.put(f"shared-{i}", {"w": worker}, payload(worker, i), float(i))  # both workers fight over these
        for key, valid in ((f"own-{other}-{i}", [payload(other, i)]),
                           (f"shared-{i}", [payload(0, i), payload(1, i)]),
                           (f"own-{worker}-{i}", [payload(worker, i)])):
            got = cache.get(key)
            if got is None:
                if key.startswith(f"own-{worker}"):
                    errors.put(f"worker {worker}: own key {key} missing right after put")
                continue
            if got[0] not in valid:
                errors.put(f"worker {worker}: {key} read back {got[0]!r}")


def test_cache_survives_interleaved_reads_and_writes_from_two_processes(tmp_path):
    """Harder than tests/test_search.py's two plain writers: the same keys, and reads between the writes."""
    path = str(tmp_path / "cache.sqlite")
    count = 150
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    workers = [context.Process(target=interleaved_worker, args=(path, w, count, errors)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
    assert [p.exitcode for p in workers] == [0, 0]
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, problems[:5]
    cache = ResultCache(path)
    assert len(cache) == 3 * count
    for i in range(count):
        assert cache.get(f"shared-{i}")[0] in (payload(0, i), payload(1, i))
        assert cache.get(f"own-0-{i}")[0] == payload(0, i) and cache.get(f"own-1-{i}")[0] == payload(1, i)
    assert integrity(path) == "ok"


def integrity(path: str) -> str:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def stalled_writer(path: str, committed: int, ready) -> None:
    """Commit `committed` entries, then run a real ResultCache.put that stops just before its COMMIT."""
    cache = ResultCache(path)
    for i in range(committed):
        cache.put(f"done-{i}", {}, payload(9, i), float(i))
    connect = cache._connect

    def stalling_connect() -> sqlite3.Connection:
        conn = connect()

        def trace(statement: str) -> None:
            if statement.strip().upper() == "COMMIT":
                ready.set()  # the write lock is held and the INSERT is done: the parent kills us now
                time.sleep(600)

        conn.set_trace_callback(trace)
        return conn

    cache._connect = stalling_connect
    cache.put("never-committed", {}, payload(9, -1), 0.0)


def test_a_writer_killed_mid_transaction_loses_only_its_own_entry(tmp_path):
    path = str(tmp_path / "cache.sqlite")
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    writer = context.Process(target=stalled_writer, args=(path, 20, ready))
    writer.start()
    try:
        assert ready.wait(60), "the writer never reached its COMMIT"
        reader = ResultCache(path)
        started = time.perf_counter()
        assert reader.get("done-3")[0] == payload(9, 3)  # WAL: readers are not blocked by the held write lock
        assert reader.get("never-committed") is None
        assert time.perf_counter() - started < 2
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(30)
    assert writer.exitcode == -signal.SIGKILL

    survivor = ResultCache(path, busy_timeout_ms=5_000)
    started = time.perf_counter()
    survivor.put("after-kill", {}, payload(1, 1), 1.0)  # the dead writer's lock went with its process
    assert time.perf_counter() - started < 5
    assert survivor.get("never-committed") is None and survivor.get("after-kill")[0] == payload(1, 1)
    assert len(survivor) == 21 and all(survivor.get(f"done-{i}")[0] == payload(9, i) for i in range(20))
    assert integrity(path) == "ok"


def looping_writer(path: str, worker: int) -> None:
    cache = ResultCache(path)
    for i in range(100_000):
        cache.put(f"w{worker}-{i}", {}, payload(worker, i), float(i))


def test_a_writer_killed_at_a_random_moment_leaves_a_prefix_of_whole_entries(tmp_path):
    """One writer is SIGKILLed mid-stream while another keeps writing: every entry is whole, none is lost."""
    import random

    path = str(tmp_path / "cache.sqlite")
    ResultCache(path)  # create the table before the race
    context = multiprocessing.get_context("fork")
    victim = context.Process(target=looping_writer, args=(path, 0))
    steady = context.Process(target=interleaved_worker, args=(path, 1, 60, context.Queue()))
    victim.start()
    steady.start()
    time.sleep(0.3 + random.random() * 0.7)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(30)
    steady.join(120)
    assert steady.exitcode == 0
    cache = ResultCache(path)
    conn = sqlite3.connect(path)
    try:
        keys = [k for (k,) in conn.execute("SELECT key FROM results WHERE key LIKE 'w0-%'")]
    finally:
        conn.close()
    written = sorted(int(k.split("-")[1]) for k in keys)
    assert written and written == list(range(len(written)))  # commits are in order: a prefix, no hole
    assert all(cache.get(f"w0-{i}")[0] == payload(0, i) for i in written)
    assert all(cache.get(f"own-1-{i}")[0] == payload(1, i) for i in range(60))
    assert integrity(path) == "ok"


# ---------------------------------------------------------------- dashboard: the results folder changes under it

DASHBOARD = REPO / "dashboard.py"



def run_every_page(at) -> list[str]:
    """Rerun each page in the same session; the exceptions shown, as text (empty when all is well)."""
    shown = []
    for page in PAGE_PATHS:
        at.switch_page(page).run()
        shown += [f"{page}: {e.value}" for e in at.exception]
    return shown


def dashboard_session(run: Path, tiny_catalog: Path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("RIS_RUNS_DIRS", str(run.parent))
    monkeypatch.setenv("RIS_DATA_DIR", str(tiny_catalog))
    monkeypatch.chdir(run.parent.parent)  # DuckDuckGo's default cache lands here
    at = AppTest.from_file(str(DASHBOARD), default_timeout=120)
    at.session_state["_keep_sidebar_run"] = str(run.resolve())
    at.session_state["_keep_sidebar_runs"] = [str(run.resolve())]
    at.run()
    return at


def cut(path: Path, keep: float) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def cut_tables(run: Path) -> None:
    cut(run / "history.csv", 2 / 3)  # mid-row
    cut(run / "eval" / "captions.csv", 0.3)
    (run / "eval" / "retrieval.json").write_text('{"rows": [')


CHANGES = [
    ("history.csv, captions.csv and retrieval.json cut short", cut_tables),
    ("model/ removed", lambda run: shutil.rmtree(run / "model")),
    ("run.json emptied", lambda run: (run / "run.json").write_text("")),
    ("the run folder deleted", shutil.rmtree),
]


@pytest.mark.skipif(not DASHBOARD.is_file(), reason="dashboard.py does not exist yet")
def test_dashboard_survives_its_run_folder_being_corrupted_then_deleted(resumed_evaluation, tiny_catalog,
                                                                         tmp_path, monkeypatch):
    run = shutil.copytree(resumed_evaluation[0], tmp_path / "runs" / "changing")
    with mock.patch("ris_core.search.duckduckgo._default_ddgs_factory", side_effect=OSError("network disabled")):
        at = dashboard_session(run, tiny_catalog, monkeypatch)
        assert not at.exception, [e.value for e in at.exception]
        assert at.subheader[0].value == "changing"  # the overview shows our run
        at.switch_page("pages/training_curves.py").run()
        assert "changing" in set(at.dataframe[-1].value["run"])  # and so do the training curves
        assert run_every_page(at) == []
        assert not at.error, [e.value for e in at.error]  # the search demo ran on the intact run
        for change, apply in CHANGES:  # the same session reruns after each change, as a browser tab would
            apply(run)
            assert run_every_page(at) == [], change


@pytest.mark.skipif(not DASHBOARD.is_file(), reason="dashboard.py does not exist yet")
def test_dashboard_search_demo_survives_a_cut_short_knn_index(resumed_evaluation, tiny_catalog, tmp_path,
                                                              monkeypatch):
    """Regression: ris_app.loaders read eval/catalog_knn.npz catching (OSError, ValueError, KeyError) only; a cut
    short .npz raises zipfile.BadZipFile (an empty one EOFError) and the search demo showed a raw exception."""
    run = shutil.copytree(resumed_evaluation[0], tmp_path / "runs" / "torn_knn")
    cut(run / "eval" / "catalog_knn.npz", 0.5)
    with mock.patch("ris_core.search.duckduckgo._default_ddgs_factory", side_effect=OSError("network disabled")):
        at = dashboard_session(run, tiny_catalog, monkeypatch)
        assert run_every_page(at) == []
