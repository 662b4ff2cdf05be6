"""Training curves: train/val loss and perplexity per epoch of several runs, the paper's reported run dashed."""

import pandas as pd
import streamlit as st

from ris_app import loaders
from ris_app.charts import Curve, best_epoch, curves_figure, export
from ris_app.history_io import flag_implausible, parse_history
from ris_app.share import Param, flag, link, publish, restore
from ris_app.sidebar import sidebar
from ris_app.widgets import csv_download, md
from ris_core.errors import RunError
from ris_core.runs import differing_arguments

choice = sidebar(multi=True)
SHARED = [Param("curves_log", "log", parse=flag), Param("curves_smoothing", "smoothing", parse=float)]
restore("training_curves", SHARED)
st.title("Training curves")
st.caption("Per-epoch loss and perplexity (per GPT-2 token). Thick lines with filled markers: validation; thin "
           "lines with open markers: training. The star marks each run's best epoch (lowest validation loss); "
           "reported runs (numbers from the paper, not reproduced) are dashed, with diamonds.")

curves: list[Curve] = []
status: dict[str, str] = {}  # run name -> training status (complete, stopped, training)
notes: dict[str, str] = {}  # run name -> what the run is, when its run.json says (ablations)
arguments: dict[str, dict] = {}  # run name -> its training arguments (run.json "args")
for run in choice.runs:
    try:
        info = run.info()
        curves.append(Curve(run.name, loaders.history(run), bool(info.get("reported_not_reproduced"))))
    except RunError as err:
        st.warning(f"**{md(run.name)}**: {md(err)}")
        continue
    if isinstance(info.get("status"), str):
        status[run.name] = info["status"]
    if isinstance(info.get("note"), str) and info["note"].strip():
        notes[run.name] = info["note"].strip()
    if isinstance(info.get("args"), dict):
        arguments[run.name] = info["args"]

with st.expander("Open a history from another tool (CSV, trainer_state.json or a TensorBoard event file)"):
    upload = st.file_uploader("History file", key="curves_upload",
                              help="A CSV with an epoch column and loss columns (train_loss/loss, val_loss/"
                                   "eval_loss), a transformers trainer_state.json (its log_history), or a TensorBoard "
                                   "events.out.tfevents.* file (e.g. a run's tensorboard/ with --report_to "
                                   "tensorboard).")
    if upload is not None:
        try:
            curves.append(Curve(upload.name, flag_implausible(parse_history(upload.name, upload.getvalue()))))
            st.success(f"Added {md(upload.name)}.")
        except ValueError as err:
            st.error(f"Could not read {md(upload.name)}: {md(err)}")

if not curves:
    st.info("Choose one or more runs in the sidebar (or open a history file above) to see their curves.")
    st.stop()

options = st.columns([1, 2, 3])
log_y = options[0].toggle("Logarithmic y axis", key="curves_log", help="Perplexities of early epochs dwarf later ones.")
smoothing = options[1].slider("Smoothing", 0.0, 0.95, 0.0, 0.05, key="curves_smoothing",
                              help="TensorBoard's: an exponential moving average (debiased at the start); the raw "
                                   "points stay faint behind the smoothed line. The table below is never smoothed.")
left, right = st.columns(2)
left.markdown("**Loss per epoch**")
left.plotly_chart(curves_figure(curves, "loss", log_y, smoothing=smoothing), key="curves_loss_chart",
                  config=export(*[c.label for c in curves][:3], "loss"))
right.markdown("**Perplexity per epoch**")
right.plotly_chart(curves_figure(curves, "perplexity", log_y, smoothing=smoothing), key="curves_ppl_chart",
                   config=export(*[c.label for c in curves][:3], "perplexity"))

def last(history: pd.DataFrame, column: str) -> float | None:
    """The value at the latest epoch that has one."""
    if column not in history or history[column].notna().sum() == 0:
        return None
    return float(history.dropna(subset=[column]).sort_values("epoch")[column].iloc[-1])


summary = []
for curve in curves:
    best = best_epoch(curve.history)
    row = curve.history.loc[curve.history["epoch"] == best].iloc[0] if best is not None else None
    seconds = curve.history["seconds"].sum(min_count=1) if "seconds" in curve.history else None
    summary.append({
        "run": curve.label, "kind": "reported" if curve.reported else "measured",
        "status": status.get(curve.label, ""),
        "epochs": int(curve.history["epoch"].nunique()), "best epoch": best,
        "best val loss": None if row is None else row.get("val_loss"),
        "best val perplexity": None if row is None else row.get("val_perplexity"),
        "last val loss": last(curve.history, "val_loss"),
        "min train loss": curve.history["train_loss"].min() if "train_loss" in curve.history else None,
        "last train loss": last(curve.history, "train_loss"),
        "training minutes": None if seconds is None or pd.isna(seconds) else round(float(seconds) / 60, 1),
    })
st.subheader("Best epochs")
st.dataframe(pd.DataFrame(summary), hide_index=True, key="curves_summary",
             column_config={**{c: st.column_config.NumberColumn(format="%.4f")
                               for c in ("best val loss", "last val loss", "min train loss", "last train loss")},
                            "best val perplexity": st.column_config.NumberColumn(format="%.2f")})
if len(arguments) > 1:
    differing = differing_arguments(arguments)
    st.markdown("**What differs between these runs**")
    if differing.empty:
        st.caption("The chosen runs were trained with the same arguments.")
    else:
        st.dataframe(differing, key="curves_arguments")
        st.caption(f"Only the {differing.shape[1]} of {len(set().union(*arguments.values()))} training arguments "
                   "whose values differ between the chosen runs.")
for name, note in notes.items():
    st.caption(f"**{md(name)}**: {md(note)}")
flagged = [(c.label, f) for c in curves if "flags" in c.history for f in c.history["flags"] if f]
if flagged:
    st.warning(f"{len(flagged)} epoch(s) hold implausible values (negative or non-finite losses, impossible "
               "durations): they are listed in the flags column below and left out of the charts and of "
               "\"best\". First: " + md(f"{flagged[0][0]}: {flagged[0][1]}"))

st.subheader("History")
table = pd.concat([c.history.assign(run=c.label) for c in curves], ignore_index=True)
table = table[["run", *[c for c in table.columns if c != "run"]]]
st.dataframe(table, hide_index=True, key="curves_table", height=min(400, 38 + 35 * len(table)))
names = "-".join(c.label for c in curves[:3]) + ("-and-more" if len(curves) > 3 else "")
csv_download("Download CSV", table, f"{names}-history.csv", key="curves_download")
link(publish(SHARED, {"runs": [run.name for run in choice.runs]}), "training_curves")
