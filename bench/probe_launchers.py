"""Two training processes against one: the val loss of the tiny test run under each launcher.

    python -m bench.probe_launchers        # ~1 min; `--cpu` needs mpirun (apt-get install openmpi-bin)

Trains the 1-layer test captioner on 160 demo products for 2 epochs with `accelerate launch --cpu` (mpirun),
`accelerate launch --multi_gpu` (torchrun; gloo without GPUs), both with 2 processes x batch 16, and in one
process with batch 32 (the same global batch), and prints each run's last history row and how many processes
started. The numbers behind README "Train on more machines"; tests/test_distributed.py asserts they agree.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from tests.conftest import copy_catalog, tiny_train_args
from tests.test_distributed import ENV, LAUNCHERS, REPO


def probe(root: Path) -> dict:
    catalog = copy_catalog(root / "catalog", 160)
    found = {}
    for name in ("cpu", "multi_gpu", "one_process"):
        if name == "cpu" and not shutil.which("mpirun"):
            found[name] = "skipped: mpirun not found"
            continue
        args = tiny_train_args(catalog, root / name, root / f"cache-{name}", name=name, epochs=2)
        if name == "one_process":
            args[args.index("--batch_size") + 1] = "32"
        command = [sys.executable, "-m", "training.train"] if name == "one_process" else LAUNCHERS[name]
        done = subprocess.run([*command, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        last = pd.read_csv(root / name / name / "history.csv").iloc[-1]
        found[name] = {"processes": done.stderr.count("starting run"), "val_loss": float(last["val_loss"]),
                       "train_loss": float(last["train_loss"])}
    return found


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        print(json.dumps(probe(Path(root)), indent=1))


if __name__ == "__main__":
    main()
