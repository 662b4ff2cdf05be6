"""The shared sidebar: which run(s) and which data folder every page works on.

The folders come from the operator (`ris_app.access`): runs under the run roots, data folders among the
allowed ones. With RIS_OPEN_FOLDERS=1 (a local `make run`) the visitor may also type any folder.
Widgets keep their value across pages through a shadow key (`_keep_<key>`): Streamlit drops a widget's
state when the page that drew it is left, so each page restores it before drawing the same widget.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from ris_app import loaders
from ris_app.access import NOT_ALLOWED, Access
from ris_core.evaluation.files import has_evaluation
from ris_core.runs import Run, RunError, discover_runs

DEFAULT_RUN = "reference-cpu"  # the committed reference run, when present


@dataclass
class Selection:
    """What the sidebar chose: the runs (one on most pages) and the data folder."""

    runs: list[Run]
    data_dir: Path
    available: list[Run]
    access: Access | None = None

    @property
    def data_label(self) -> str:
        """The data folder as a visitor may see it (its place under a root, not the server's path)."""
        return self.access.label(self.data_dir) if self.access else str(self.data_dir)

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
    if problem(run):
        return f"{label} · unreadable"
    info = run.info()
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


@st.cache_data(ttl=10, show_spinner=False, max_entries=16)
def _discover(roots: tuple[str, ...], version: tuple[int, ...]) -> list[Run]:
    """Runs under the roots: re-scanned when a root or one of its folders changes, else at most every 10 s."""
    return discover_runs(*map(Path, roots))


def runs_under(roots: list[Path]) -> list[Run]:
    folders = [r for r in roots if r.is_dir()]
    children = [c for r in folders for c in sorted(r.iterdir()) if c.is_dir()]
    return _discover(tuple(str(r) for r in roots), loaders.stamp(*folders, *children))


@st.cache_data(show_spinner=False, max_entries=256)
def _problem(run_path: str, version: tuple[int, ...]) -> str | None:
    return Run(Path(run_path)).problem()


def problem(run: Run) -> str | None:
    """Why the run cannot be shown (a malformed run.json, history.csv or split.json), or None; cached per file."""
    return _problem(str(run.path), loaders.stamp(*(run.path / f for f in ("run.json", "history.csv", "split.json"))))


def _folder_fields(access: Access) -> tuple[list[Path], Path | None]:
    """The "Folders" expander: (more run roots typed by the visitor, the chosen data folder or None)."""
    if not access.open_folders:
        choices = access.data_choices()
        labels = {str(p): access.label(p) for p in choices}
        _restore("sidebar_data_choice", str(choices[0]), valid=lambda v: v in labels)
        chosen = st.selectbox("Data folder", list(labels), key="sidebar_data_choice", format_func=labels.get,
                              on_change=_keep, args=("sidebar_data_choice",),
                              help="The data folders this server offers (its operator sets RIS_DATA_DIR and "
                                   "RIS_DATA_DIRS; runs come from RIS_RUNS_DIRS).")
        return [], Path(chosen)
    _restore("sidebar_runs_dirs", "")
    extra = st.text_input(
        "More run folders", key="sidebar_runs_dirs", on_change=_keep, args=("sidebar_runs_dirs",),
        placeholder="/path/to/runs" + os.pathsep + "/other/runs",
        help=f"Searched besides results/ (and RIS_RUNS_DIRS); separate folders with '{os.pathsep}'.",
    )
    _restore("sidebar_data_dir", str(access.default_data))
    data_text = st.text_input(
        "Data folder", key="sidebar_data_dir", on_change=_keep, args=("sidebar_data_dir",),
        help="Kaggle layout: styles.csv beside images/<id>.jpg. Default: the bundled demo catalog "
        "(RIS_DATA_DIR overrides).",
    )
    return split_dirs(extra), access.data_folder(data_text)


def sidebar(multi: bool = False) -> Selection:
    """Draw the shared sidebar and return the chosen run(s) and data folder."""
    _through_dashboard()
    access = Access.from_env()
    with st.sidebar:
        # Folder settings first in the script (their values decide the run list), drawn below the run picker.
        run_box = st.container()
        with st.expander("Folders", expanded=False):
            extra, data_dir = _folder_fields(access)
            if data_dir is None:
                st.warning(NOT_ALLOWED)
        roots = [*access.runs_roots, *extra]
        missing = [str(p) for p in extra if not p.is_dir()]
        available = runs_under(roots)
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
        several = st.query_params.get_all("runs")  # /compare_captions?runs=a&runs=b
        if multi and several and "_keep_sidebar_runs" not in st.session_state:
            matches = [p for w in several for p, r in by_path.items() if w in (r.name, p)]
            if matches:
                st.session_state["_keep_sidebar_runs"] = list(dict.fromkeys(matches))
        with run_box:
            if not available:
                st.warning("No runs found in this server's run folders. Train one (`make reference`)"
                           + (" or add a folder below." if access.open_folders else "."))
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
    return Selection(runs=[by_path[p] for p in chosen if p in by_path],
                     data_dir=data_dir if data_dir is not None else access.default_data, available=available,
                     access=access)
