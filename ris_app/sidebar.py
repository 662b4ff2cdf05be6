"""The shared sidebar: which run(s) and which data folder every page works on.

Widgets keep their value across pages through a shadow key (`_keep_<key>`): Streamlit drops a widget's
state when the page that drew it is left, so each page restores it before drawing the same widget.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from ris_core.data import DEFAULT_DATA_DIR
from ris_core.evaluation.files import has_evaluation
from ris_core.runs import RESULTS_DIR, Run, RunError, discover_runs

DEFAULT_RUN = "reference-cpu"  # the committed reference run, when present


@dataclass
class Selection:
    """What the sidebar chose: the runs (one on most pages) and the data folder."""

    runs: list[Run]
    data_dir: Path
    available: list[Run]

    @property
    def run(self) -> Run | None:
        return self.runs[0] if self.runs else None


def _keep(key: str) -> None:
    st.session_state["_keep_" + key] = st.session_state[key]


def _restore(key: str, default: object, valid=None) -> None:
    """Put the kept value (or the default) into the widget's key before the widget is drawn."""
    shadow = "_keep_" + key
    value = st.session_state.get(shadow, default)
    if valid is not None and not valid(value):
        value = default
    st.session_state[shadow] = value
    st.session_state[key] = value


def split_dirs(text: str | None) -> list[Path]:
    """Folders from an os.pathsep- or newline-separated string; blanks ignored."""
    parts = (text or "").replace("\n", os.pathsep).split(os.pathsep)
    return [Path(p.strip()).expanduser() for p in parts if p.strip()]


def run_label(run: Run, duplicate_names: set[str]) -> str:
    label = run.name if run.name not in duplicate_names else f"{run.name} ({run.path.parent.name})"
    try:
        info = run.info()
    except RunError:
        return f"{label} · unreadable run.json"
    if info.get("reported_not_reproduced"):
        # An imported paper notebook: its history is the paper's reported numbers, its weights are real.
        return f"{label} · reported history, notebook weights" if run.has_checkpoint else f"{label} · reported"
    if not run.has_checkpoint:
        return f"{label} · no checkpoint"
    return label


def default_single(runs: list[Run]) -> str | None:
    """The reference run once it has a checkpoint; else an evaluated run, any trained run, or the first."""
    if not runs:
        return None

    def rank(run: Run) -> tuple[int, int, int]:
        evaluated = has_evaluation(run.eval_dir)
        return (not run.has_checkpoint, run.name != DEFAULT_RUN, not evaluated)

    return str(min(runs, key=rank).path)


def default_multi(runs: list[Run], single: str | None) -> list[str]:
    """The reference run (or the single-run choice) plus every reported run: what the paper is compared with."""
    chosen = [single] if single else []
    for run in runs:
        try:
            reported = run.reported_only
        except RunError:
            reported = False
        if reported and str(run.path) not in chosen:
            chosen.append(str(run.path))
    return chosen or [str(r.path) for r in runs[:3]]


def _through_dashboard() -> None:
    """Rerun through dashboard.py when Streamlit ran this page on its own.

    A server that has just started treats a `pages/` folder as an old-style multipage app until the entry
    point has called `st.navigation` once, so a first visit straight to /search_demo would run the page
    without dashboard.py (no wide layout, file names as page titles). One rerun fixes that for good.
    """
    try:
        from streamlit import config
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a future Streamlit without the old behaviour
        return
    # AppTest resets the flag before every run (and would lose the run's widget events to a rerun).
    if PagesManager.uses_pages_directory and not config.get_option("global.appTest"):
        PagesManager.uses_pages_directory = False
        st.rerun()


def sidebar(multi: bool = False) -> Selection:
    """Draw the shared sidebar and return the chosen run(s) and data folder."""
    _through_dashboard()
    env_dirs = os.environ.get("RIS_RUNS_DIRS", "")
    env_data = os.environ.get("RIS_DATA_DIR", "").strip() or str(DEFAULT_DATA_DIR)
    with st.sidebar:
        # Folder settings first in the script (their values decide the run list), drawn below the run picker.
        run_box = st.container()
        with st.expander("Folders", expanded=False):
            _restore("sidebar_runs_dirs", "")
            extra = st.text_input(
                "More run folders", key="sidebar_runs_dirs", on_change=_keep, args=("sidebar_runs_dirs",),
                placeholder="/path/to/runs" + os.pathsep + "/other/runs",
                help=f"Searched besides {RESULTS_DIR} (and RIS_RUNS_DIRS); separate folders with '{os.pathsep}'.",
            )
            _restore("sidebar_data_dir", env_data)
            data_text = st.text_input(
                "Data folder", key="sidebar_data_dir", on_change=_keep, args=("sidebar_data_dir",),
                help="Kaggle layout: styles.csv beside images/<id>.jpg. Default: the bundled demo catalog "
                "(RIS_DATA_DIR overrides).",
            )
        roots = [RESULTS_DIR, *split_dirs(env_dirs), *split_dirs(extra)]
        missing = [str(p) for p in roots[1:] if not p.is_dir()]
        available = discover_runs(*roots)
        paths = [str(r.path) for r in available]
        by_path = dict(zip(paths, available, strict=True))
        names = [r.name for r in available]
        duplicates = {n for n in names if names.count(n) > 1}
        labels = {p: run_label(r, duplicates) for p, r in by_path.items()}
        wanted = st.query_params.get("run")  # shareable links: /search_demo?run=reference-cpu
        if wanted and "_keep_sidebar_run" not in st.session_state:
            match = next((p for p, r in by_path.items() if wanted in (r.name, p)), None)
            if match:
                st.session_state["_keep_sidebar_run"] = match
        with run_box:
            if not available:
                st.warning(f"No runs found under {RESULTS_DIR}. Train one (`make reference`) or add a folder below.")
                chosen: list[str] = []
            elif multi:
                single = st.session_state.get("_keep_sidebar_run") or default_single(available)
                _restore("sidebar_runs", default_multi(available, single),
                         valid=lambda v: isinstance(v, list) and all(p in by_path for p in v))
                chosen = st.multiselect("Runs", paths, key="sidebar_runs", format_func=labels.get,
                                        on_change=_keep, args=("sidebar_runs",), placeholder="Choose runs")
            else:
                _restore("sidebar_run", default_single(available), valid=lambda v: v in by_path)
                chosen = [st.selectbox("Run", paths, key="sidebar_run", format_func=labels.get,
                                       on_change=_keep, args=("sidebar_run",))]
            if missing:
                st.caption("Not found: " + ", ".join(missing))
    data_dir = Path(data_text.strip()).expanduser() if data_text and data_text.strip() else Path(env_data)
    return Selection(runs=[by_path[p] for p in chosen if p in by_path], data_dir=data_dir, available=available)
