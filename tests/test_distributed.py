"""Training on more than one process, as on many GPUs or machines: `accelerate launch` with two CPU processes.

Two launchers: `--cpu --num_processes 2` starts its processes through MPI (`mpirun`, Debian's `openmpi-bin`,
installed by CI; without `--mpirun_hostfile` accelerate runs one process), and `--multi_gpu`, torch's own launcher
(torchrun), which on a machine without GPUs joins them with gloo: the code path of a multi-GPU run, on CPUs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from ris_core.captioner import load_any_captioner
from tests.conftest import REPO, tiny_train_args

pytestmark = pytest.mark.slow
ACCELERATE = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
HOSTFILE = REPO / "training" / "localhost.hostfile"  # two slots on this machine
LAUNCHERS = {"multi_gpu": [*ACCELERATE, "--multi_gpu", "-m", "training.train"],
             "cpu": [*ACCELERATE, "--cpu", "--mpirun_hostfile", str(HOSTFILE), "-m", "training.train"]}
LAUNCH = LAUNCHERS["multi_gpu"]
# OpenMPI refuses to start as root (CI containers) unless told twice
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
       "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def launcher(name: str) -> list[str]:
    if name == "cpu" and not shutil.which("mpirun"):
        if os.environ.get("RIS_REQUIRE_MPI"):
            pytest.fail("mpirun not found: apt-get install openmpi-bin (CI installs it)")
        pytest.skip("accelerate's --cpu launcher needs mpirun (apt-get install openmpi-bin)")
    return LAUNCHERS[name]


def launch(args: list[str], name: str = "multi_gpu", **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher(name), *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
                          **kwargs)


@pytest.mark.parametrize("name", ["cpu", "multi_gpu"])
def test_two_processes_write_one_run_that_loads_and_compares_with_one(name: str, tiny_catalog: Path,
                                                                      tmp_path: Path):
    args = tiny_train_args(tiny_catalog, tmp_path / "runs", tmp_path / "cache", name="two", epochs=2)
    done = launch(args, name)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("starting run") == 2  # both processes ran, one folder
    run = tmp_path / "runs" / "two"
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [1, 2]  # written once per epoch, by the main process
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["epochs_done"] == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["two"]
    assert isinstance(load_any_captioner(run).caption([Image.new("RGB", (60, 80), "white")])[0], str)

    # one process with the same global batch (2 x 16): the same data, the same number of steps
    single = tiny_train_args(tiny_catalog, tmp_path / "runs1", tmp_path / "cache1", name="one", epochs=2)
    single[single.index("--batch_size") + 1] = "32"
    done = subprocess.run([sys.executable, "-m", "training.train", *single], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = pd.read_csv(tmp_path / "runs1" / "one" / "history.csv")
    # other batch orders (each process draws its own half), same schedule: close, not equal
    assert history["val_loss"].iloc[-1] == pytest.approx(one["val_loss"].iloc[-1], rel=1e-3)  # 6e-6 measured


def test_a_kill_of_both_processes_resumes_with_the_same_command(tiny_catalog: Path, tmp_path: Path):
    """With the launcher the issue names, `accelerate launch --cpu --num_processes 2` (through mpirun)."""
    args = tiny_train_args(tiny_catalog, tmp_path / "runs", tmp_path / "cache", name="killed", epochs=4)
    args[args.index("--batch_size") + 1] = "4"  # more steps per epoch: time to kill between checkpoints
    run = tmp_path / "runs" / "killed"
    proc = subprocess.Popen([*launcher("cpu"), *args], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((run / "checkpoints").glob("checkpoint-*/trainer_state.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher, mpirun and both training processes
    proc.wait()
    first = pd.read_csv(run / "history.csv")
    assert 1 <= len(first) < 4, "the run finished before it could be killed"

    done = launch(args, "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("resuming run") == 2
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4]  # no duplicate, no gap
    assert history.loc[0, "val_loss"] == pytest.approx(first.loc[0, "val_loss"])
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("name", ["cpu", "multi_gpu"])
def test_two_processes_share_the_captioning_and_write_the_same_evaluation_as_one(name: str, tiny_run: Path,
                                                                                tiny_catalog: Path, tmp_path: Path):
    """`accelerate launch -m training.evaluate`: the image batches are shared, the files are those of one process."""
    runs = {name: shutil.copytree(tiny_run, tmp_path / name / tiny_run.name, ignore=shutil.ignore_patterns("eval"))
            for name in ("one", "two")}
    common = ["--data_dir", str(tiny_catalog), "--quiet", "--n_boot", "50", "--refine_queries", "8",
              "--batch_size", "8"]
    one = subprocess.run([sys.executable, "-m", "training.evaluate", "--run", str(runs["one"]), *common], cwd=REPO,
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    evaluate = [a if a != "training.train" else "training.evaluate" for a in launcher(name)]
    two = subprocess.run([*evaluate, "--run", str(runs["two"]), *common], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("captions.csv", "retrieval.csv"):
        assert (runs["two"] / "eval" / name).read_bytes() == (runs["one"] / "eval" / name).read_bytes(), name
    first, second = (json.loads((runs[k] / "eval" / "caption_metrics.json").read_text()) for k in ("one", "two"))
    assert {k: v for k, v in first["model"].items()} == pytest.approx(second["model"])
    listing = {k: sorted(p.relative_to(runs[k]).as_posix() for p in runs[k].rglob("*")) for k in runs}
    assert listing["two"] == listing["one"]  # the other process wrote nothing, left no workspace behind
