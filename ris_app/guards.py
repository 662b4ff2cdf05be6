"""The one check every page starts with: is there a run it can show? If not, say what to do and stop."""

from __future__ import annotations

import streamlit as st

from ris_app.sidebar import Selection, problem
from ris_app.widgets import md, say
from ris_core.errors import RunError
from ris_core.runs import Run


def require_run(choice: Selection, needs_checkpoint: bool = False) -> Run:
    """The chosen run, or an explanation and `st.stop()`.

    A run of reported numbers only (the paper's) has no captions to show; an imported paper notebook has
    reported history and real weights, so it passes. `needs_checkpoint`: the page captions with the model."""
    run = choice.run
    if run is None:
        st.info("No run to show: train one (`make reference`) or add a runs folder in the sidebar.")
        st.stop()
    why = problem(run)
    if why:
        st.error(f"{md(run.name)} cannot be shown: {say(why)} Pick another run in the sidebar.")
        st.stop()
    try:
        reported = run.reported_only
    except RunError as err:
        st.error(say(err))
        st.stop()
    if reported and not run.has_checkpoint:
        st.info(f"**{md(run.name)}** holds numbers reported elsewhere (no checkpoint, no held-out captions). Its "
                "reported losses are on the Training curves page; pick a trained run in the sidebar for the rest.")
        st.stop()
    if needs_checkpoint and not run.has_checkpoint:
        st.info("Pick a trained run (one with a checkpoint) in the sidebar to caption photos.")
        st.stop()
    return run
