"""Dashboard page timings under Streamlit's AppTest: first render of each page and the cost of a page switch.

AppTest runs the real scripts in this process (no browser, no websocket), so these are server-side times: the
script, the cached loaders and the element tree. `cold` renders run first, in page order, on empty Streamlit caches
(the captioner, catalog index and image-kNN index are built by whichever page first needs them; Python imports are
already warm when other benchmarks ran before; the search demo reuses <run>/eval/catalog_knn.npz when the run has
been evaluated, else embeds every catalog image, minutes on data/demo); `warm` renders are
new sessions once every cache is full; `switch` is moving between pages inside one warm session.
bench/load_dashboard.py measures a real `streamlit run` server with 20 concurrent sessions.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from bench.common import REPO, reference_run, run_sample
from ris_app.navigation import PAGE_PATHS as PAGES
from ris_core.data import DEFAULT_DATA_DIR

DASHBOARD = REPO / "dashboard.py"


@contextmanager
def dashboard_env(data_dir: Path, workdir: Path):
    """RIS_DATA_DIR set, cwd in a temp folder (DuckDuckGo's cache), DuckDuckGo unable to reach the network."""
    old_cwd, old_data = Path.cwd(), os.environ.get("RIS_DATA_DIR")
    os.environ["RIS_DATA_DIR"] = str(data_dir)
    os.chdir(workdir)
    try:
        with mock.patch("ris_core.search.duckduckgo._default_ddgs_factory", side_effect=OSError("benchmark: offline")):
            yield
    finally:
        os.chdir(old_cwd)
        if old_data is None:
            os.environ.pop("RIS_DATA_DIR", None)
        else:
            os.environ["RIS_DATA_DIR"] = old_data


def timed_render(at, page: str | None) -> float:
    start = time.perf_counter()
    (at.switch_page(page) if page else at).run()
    seconds = time.perf_counter() - start
    if at.exception:
        raise RuntimeError(f"{page}: {at.exception[0].value}")
    expected = Path(page or PAGES[0]).stem.replace("_", " ").capitalize()  # "Search demo"
    if [t.value for t in at.title][:1] != [expected]:
        raise RuntimeError(f"{page}: rendered {[t.value for t in at.title]}, not {expected!r}")
    return seconds


def first_render(page: str, timeout: float) -> float:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(DASHBOARD), default_timeout=timeout)
    return timed_render(at, page if page != PAGES[0] else None)  # a new session opening that page's URL


def bench_dashboard(quick: bool = False) -> dict:
    from streamlit.testing.v1 import AppTest

    if not DASHBOARD.is_file():
        return {"skipped": f"{DASHBOARD} does not exist"}
    run, source = reference_run()
    timeout = 120 if quick else 900  # a cold search demo embeds every catalog image once
    with tempfile.TemporaryDirectory(prefix="bench-dash-") as tmp:
        data_dir = DEFAULT_DATA_DIR
        if quick and run is not None:  # 24 of the run's products: the image-kNN index builds in a second
            data_dir = run_sample(run, Path(tmp) / "data", 8, 16)
        out: dict = {"model": source, "data_dir": str(data_dir if not quick else "24-product cut of data/demo")}
        with dashboard_env(data_dir, Path(tmp)):
            for page in PAGES:
                out[f"cold_{Path(page).stem}_seconds"] = round(first_render(page, timeout), 3)
            for page in PAGES:
                out[f"warm_{Path(page).stem}_seconds"] = round(first_render(page, timeout), 3)
            at = AppTest.from_file(str(DASHBOARD), default_timeout=timeout)
            at.run()
            switches: dict[str, list[float]] = {page: [] for page in PAGES}
            for _ in range(1 if quick else 5):
                for page in [*PAGES[1:], PAGES[0]]:
                    switches[page].append(timed_render(at, page))
            for page, values in switches.items():
                out[f"switch_to_{Path(page).stem}_seconds"] = round(statistics.median(values), 3)
    return out
