"""Read a training history written by another tool: a CSV with epoch/loss columns, a transformers
`trainer_state.json` (its `log_history`), or a TensorBoard event file (`events.out.tfevents.*`, e.g. from
`--report_to tensorboard`). Pure functions: bytes in, a DataFrame in the run's history.csv columns out, or a
ValueError whose message says what the file lacks.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd

from ris_core.data import decode_text

MAX_BYTES = 20_000_000  # a history is kilobytes; refuse anything absurd before parsing it

# lower-cased header -> history.csv column
ALIASES = {
    "epoch": "epoch", "epochs": "epoch",
    "loss": "train_loss", "train_loss": "train_loss", "training_loss": "train_loss", "train/loss": "train_loss",
    "eval_loss": "val_loss", "val_loss": "val_loss", "validation_loss": "val_loss", "valid_loss": "val_loss",
    "eval/loss": "val_loss", "val/loss": "val_loss",
    "train_perplexity": "train_perplexity", "train_ppl": "train_perplexity",
    "val_perplexity": "val_perplexity", "eval_perplexity": "val_perplexity", "val_ppl": "val_perplexity",
    "learning_rate": "learning_rate", "lr": "learning_rate",
}
COLUMNS = ["epoch", "train_loss", "train_perplexity", "val_loss", "val_perplexity", "learning_rate"]


def parse_history(name: str, data: bytes) -> pd.DataFrame:
    """A history from an uploaded file: `trainer_state.json` (or any .json with `log_history`) or a CSV."""
    if len(data) > MAX_BYTES:
        raise ValueError(f"{name} is {len(data) / 1e6:.0f} MB; a training history is far smaller")
    if "tfevents" in name:
        return from_tensorboard(name, data)
    text = _text(name, data)
    if name.lower().endswith(".json") or text.lstrip().startswith("{"):
        return from_trainer_state(name, text)
    return from_csv(name, text)


def _text(name: str, data: bytes) -> str:
    text = decode_text(data)
    if text is None:
        raise ValueError(f"{name} is not a text file (CSV or JSON)")
    return text


def from_trainer_state(name: str, text: str) -> pd.DataFrame:
    """`log_history` entries with `epoch` and `loss` (training) or `eval_loss` (validation), merged by epoch."""
    try:
        state = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{name} is not valid JSON ({err.args[0] if err.args else err})") from None
    logs = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(logs, list):
        raise ValueError(f"{name} has no 'log_history' list: expected a transformers trainer_state.json")
    train, val = {}, {}
    for entry in logs:
        if not isinstance(entry, dict) or _number(entry.get("epoch")) is None:
            continue
        epoch = round(float(entry["epoch"]), 4)
        if _number(entry.get("loss")) is not None:
            train[epoch] = {"train_loss": float(entry["loss"]), "learning_rate": _number(entry.get("learning_rate"))}
        if _number(entry.get("eval_loss")) is not None:
            val[epoch] = {"val_loss": float(entry["eval_loss"])}
    if not train and not val:
        raise ValueError(f"{name}: no log_history entry has an 'epoch' with a 'loss' or 'eval_loss'")
    epochs = sorted(set(train) | set(val))
    rows = [{"epoch": e, **train.get(e, {}), **val.get(e, {})} for e in epochs]
    return _finish(pd.DataFrame(rows))


# TensorBoard scalar tag -> history.csv column: RIS Eval's per-epoch rows first, then Trainer's own tags
TENSORBOARD_TAGS = {"history/train_loss": "train_loss", "history/val_loss": "val_loss",
                    "history/learning_rate": "learning_rate", "train/loss": "train_loss", "eval/loss": "val_loss",
                    "train/learning_rate": "learning_rate"}
EPOCH_TAGS = ("history/epoch", "train/epoch", "eval/epoch")


def from_tensorboard(name: str, data: bytes) -> pd.DataFrame:
    """Loss curves from one TensorBoard event file: each step's epoch comes from an epoch scalar logged beside."""
    import tempfile
    from pathlib import Path

    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise ValueError(f"{name} is a TensorBoard event file: reading it needs the tensorboard package") from None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "events.out.tfevents.upload"
        path.write_bytes(data)
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        try:
            events.Reload()
        except Exception as err:  # a torn or foreign file: the reader raises many types
            raise ValueError(f"{name} is not a readable TensorBoard event file ({type(err).__name__})") from None
        tags = set(events.Tags().get("scalars", []))
        if not tags:  # the reader skips what it cannot parse: a torn or foreign file reads as empty
            raise ValueError(f"{name} is not a readable TensorBoard event file (no scalar events in it)")
        series = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in tags}
    epoch_of: dict[int, float] = {}
    for tag in EPOCH_TAGS:
        for step, value in series.get(tag, {}).items():
            epoch_of.setdefault(step, value)
    columns: dict[str, dict[float, float]] = {}
    for tag, column in TENSORBOARD_TAGS.items():
        if tag in series and column not in columns:
            columns[column] = {round(epoch_of[s], 4): v for s, v in series[tag].items() if s in epoch_of}
    if not epoch_of or not any(columns.get(c) for c in ("train_loss", "val_loss")):
        raise ValueError(f"{name} holds no loss scalars with an epoch beside them (found tags: "
                         f"{', '.join(sorted(tags)) or 'none'})")
    epochs = sorted({e for values in columns.values() for e in values})
    return _finish(pd.DataFrame([{"epoch": e, **{c: v.get(e) for c, v in columns.items()}} for e in epochs]))


def from_csv(name: str, text: str) -> pd.DataFrame:
    try:
        frame = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise ValueError(f"{name} is not a readable CSV ({type(err).__name__})") from None
    renamed = {}
    for column in frame.columns:
        target = ALIASES.get(str(column).strip().lower())
        if target and target not in renamed.values():
            renamed[column] = target
    frame = frame[list(renamed)].rename(columns=renamed)
    if "epoch" not in frame:
        raise ValueError(f"{name} has no 'epoch' column (found: {', '.join(map(str, renamed)) or 'none usable'})")
    if "train_loss" not in frame and "val_loss" not in frame:
        raise ValueError(f"{name} has no loss column: name one 'train_loss'/'loss' or 'val_loss'/'eval_loss'")
    return _finish(frame)


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _finish(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.apply(pd.to_numeric, errors="coerce")
    frame = frame.dropna(subset=["epoch"]).sort_values("epoch").reset_index(drop=True)
    if frame.empty:
        raise ValueError("no row has a numeric epoch")
    for split in ("train", "val"):
        loss, ppl = f"{split}_loss", f"{split}_perplexity"
        if loss not in frame:
            frame[loss] = np.nan
        if ppl not in frame:
            frame[ppl] = np.exp(frame[loss].clip(upper=50))  # perplexity = exp(mean token cross-entropy)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = np.nan
    return frame[COLUMNS]


# What a plausible value of each column is: losses are cross-entropies (>= 0), perplexities >= 1, an epoch takes
# at most a year. Anything else comes from a bug or a hand edit: flagged, left out of charts and "best".
PLAUSIBLE = {
    "train_loss": (0.0, math.inf), "val_loss": (0.0, math.inf),
    "train_perplexity": (1.0, math.inf), "val_perplexity": (1.0, math.inf),
    "learning_rate": (0.0, math.inf), "seconds": (0.0, 365 * 86400.0), "samples_per_second": (0.0, math.inf),
}


def flag_implausible(frame: pd.DataFrame) -> pd.DataFrame:
    """The history with implausible values (non-finite, negative losses, ...) blanked and a `flags` column
    naming each one, so a table shows them and no chart draws them or marks them best."""
    frame = frame.copy()
    flags = [[] for _ in range(len(frame))]
    for column, (low, high) in PLAUSIBLE.items():
        if column not in frame:
            continue
        values = pd.to_numeric(frame[column], errors="coerce")
        finite = np.isfinite(values.to_numpy(dtype=float, na_value=np.nan))
        bad = (~finite | (values < low) | (values > high)) & frame[column].notna()
        for row in np.flatnonzero(bad.to_numpy()):
            flags[row].append(f"{column} {frame[column].iloc[row]:.4g}")
        frame.loc[bad, column] = np.nan
    frame["flags"] = ["; ".join(f) for f in flags]
    return frame
