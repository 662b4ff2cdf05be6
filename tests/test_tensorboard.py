"""`--report_to tensorboard` (Trainer's own integration) and the training-curves page reading the event files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ris_app.history_io import parse_history
from tests.conftest import tiny_train_args

pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def logged_run(tiny_catalog: Path, tmp_path_factory) -> Path:
    from training.train import main

    root = tmp_path_factory.mktemp("tensorboard")
    args = tiny_train_args(tiny_catalog, root / "runs", root / "cache", name="logged", epochs=2)
    return main([*args, "--report_to", "tensorboard"])


@pytest.mark.slow
def test_a_run_logs_to_tensorboard_and_its_events_read_as_its_history(logged_run: Path):
    folder = logged_run / "tensorboard"
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert len(files) >= 2  # Trainer's own writer and the per-epoch rows
    epochs = next(p for p in files if p.name.endswith(".epochs"))
    frame = parse_history(epochs.name, epochs.read_bytes())
    history = pd.read_csv(logged_run / "history.csv")
    assert frame["epoch"].tolist() == [1.0, 2.0]
    assert frame["val_loss"].tolist() == pytest.approx(history["val_loss"].tolist(), rel=1e-6)
    assert frame["train_loss"].tolist() == pytest.approx(history["train_loss"].tolist(), rel=1e-6)
    assert json.loads((logged_run / "run.json").read_text())["args"]["report_to"] == "tensorboard"


@pytest.mark.slow
def test_the_training_curves_page_opens_an_event_file(logged_run: Path, tiny_catalog: Path, monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("RIS_RUNS_DIRS", str(logged_run.parent))
    monkeypatch.setenv("RIS_DATA_DIR", str(tiny_catalog))
    monkeypatch.chdir(tmp_path)
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "dashboard.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/training_curves.py").run()
    epochs = next((logged_run / "tensorboard").glob("events.out.tfevents.*.epochs"))
    at.file_uploader(key="curves_upload").set_value((epochs.name, epochs.read_bytes(), "application/octet-stream"))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.success and "tfevents" in at.success[0].value
    at.file_uploader(key="curves_upload").set_value(("events.out.tfevents.torn", b"\x00garbage", "")).run()
    assert not at.exception and at.error and "TensorBoard" in at.error[0].value


def test_a_torn_event_file_or_one_without_losses_is_one_clear_line(tmp_path: Path):
    from torch.utils.tensorboard import SummaryWriter

    with pytest.raises(ValueError, match="TensorBoard event file|no loss scalars"):
        parse_history("events.out.tfevents.x", b"\x00\x01 not events")
    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_scalar("accuracy", 0.5, 1)
    path = next(tmp_path.glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="no loss scalars with an epoch beside them .*accuracy"):
        parse_history(path.name, path.read_bytes())
