"""The dashboard in a real browser: `streamlit run` + headless Chromium, first and repeat visits side by side.

Each figure is seconds from `driver.get(url)` to a page's content (a text the page shows once its script has run)
and, for the training curves, to its plotly chart drawn; polled every 50 ms, on the default data folder and runs
(what `make run` opens). Per page:

- `first_visit`: a browser that is already running opens the page for the first time (empty HTTP cache)
- `repeat_visit`: the same browser opens it again (Streamlit's JavaScript from the HTTP cache)

`cold_server` is the very first visit after the server came up (that session imports pandas and plotly on the
server); `browser_launch_seconds` is starting Chromium itself. `search_demo_cold`: a new server in a new
working directory (no `.cache/`, as on a fresh clone) whose first visit is the search demo, seconds until the
gallery product's caption, its reranked caption and every column's results are on screen; once with the demo's
precomputed files (`data/demo/precomputed/`, what a fresh clone has) and once with a copy of the catalog
without them (the page captions, reranks and embeds the catalog itself); on the first server, then, the first
upload of a photo no cache has seen at once (`upload_after_gallery`: the captioner may still be loading) and of
another 10 s later (`upload_10s_later`: the time a user takes to pick a file): seconds until its caption, and until
its whole run (results, reranked caption, every column) has finished. Servers start as `make run` starts them
(`python -m ris_app.serve`: torch imported before the server listens; `*_startup_seconds` until healthy);
`plain_streamlit_run` repeats the gallery and the upload at once under a plain `streamlit run dashboard.py`, whose
sessions import torch themselves (the old path).
Navigation Timing splits a visit into the HTML/JS load (`dom_content_loaded`) and what follows (the websocket,
the script run, React rendering). Needs Debian's chromium + chromium-driver; skipped (not failed) without them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from bench.common import REPO

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PAGES = {  # url path -> (text shown once the page has rendered, whether to wait for a plotly chart too)
    "": ("Explore", False),  # the overview: the heading above its links to the other pages
    "training_curves": ("Best epochs", True),  # the table under the chart
}
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,800")
NAV_TIMING = """
const n = performance.getEntriesByType('navigation')[0];
const js = performance.getEntriesByType('resource').filter(r => r.name.endsWith('.js'));
return {dom_content_loaded: n.domContentLoadedEventEnd / 1000, load_event: n.loadEventEnd / 1000,
        js_files: js.length, js_kb: Math.round(js.reduce((s, r) => s + r.decodedBodySize, 0) / 1024)};
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def streamlit_server(env: dict[str, str] | None = None, log_path: Path | None = None, timeout: float = 60,
                     checkout: Path = REPO, preload: bool = True, timings: dict | None = None):
    """The dashboard of `checkout` (this one, or e.g. a `git worktree` of an older commit) on a free port, started
    as `make run` starts it (`python -m ris_app.serve`: torch imported before the server listens) or, with
    `preload=False` (or a checkout without that launcher), by a plain `streamlit run dashboard.py`; in a
    temporary working directory (DuckDuckGo's cache lands there); yields its URL once healthy. Always stopped;
    with `log_path`, its output is kept there; `timings["startup_seconds"]`: from start until healthy."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="ris-streamlit-") as cwd, \
            open(log_path or os.devnull, "w") as log:
        launcher = (["-m", "ris_app.serve"] if preload and (checkout / "ris_app" / "serve.py").is_file()
                    else ["-m", "streamlit", "run", str(checkout / "dashboard.py")])
        started = time.monotonic()
        server = subprocess.Popen(
            [sys.executable, *launcher, "--server.headless", "true", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                          "PYTHONPATH": str(checkout), **(env or {})},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = started + timeout
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"streamlit exited with code {server.returncode} before it was healthy")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"streamlit was not healthy within {timeout:.0f} s")
                try:
                    with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2):
                        break
                except OSError:
                    time.sleep(0.2)
            if timings is not None:
                timings["startup_seconds"] = round(time.monotonic() - started, 2)
            yield base
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()


@contextmanager
def chromium():
    """A fresh headless Chromium at 1280x800 with its own empty profile (so an empty HTTP cache)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="bench-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def timed_visit(driver, url: str, marker: str, want_chart: bool, timeout: float = 60) -> dict:
    """Seconds from navigation to the content text and to the drawn chart, plus the browser's own timings."""
    driver.get("about:blank")
    start = time.perf_counter()
    driver.get(url)  # returns at the load event: Streamlit has not rendered anything yet
    content = chart = None
    while time.perf_counter() - start < timeout and (content is None or (want_chart and chart is None)):
        has_content, has_chart = driver.execute_script(
            "return [document.body.innerText.includes(arguments[0]), !!document.querySelector('.js-plotly-plot svg')]",
            marker)
        now = time.perf_counter() - start
        content = now if content is None and has_content else content
        chart = now if chart is None and has_chart else chart
        time.sleep(0.05)
    if content is None:
        raise TimeoutError(f"{marker!r} did not appear on {url} within {timeout:.0f} s")
    return {"content_seconds": round(content, 2), "chart_seconds": round(chart, 2) if chart else None,
            **{k: round(v, 2) if isinstance(v, float) else v for k, v in driver.execute_script(NAV_TIMING).items()}}


def results_on_screen(driver, url: str, timeout: float = 180) -> float:
    """Seconds from opening the search demo until its caption, reranked caption and results are all shown."""
    driver.get("about:blank")
    start = time.perf_counter()
    driver.get(url)
    while time.perf_counter() - start < timeout:
        text = driver.execute_script("return document.body.innerText")
        # the two strategies' and the visual column write "search: N ms" under their results, the hybrid "fused in"
        if "Reranked:" in text and text.count("search:") >= 3 and "fused in" in text:
            return round(time.perf_counter() - start, 2)
        time.sleep(0.05)
    raise TimeoutError(f"the search demo showed no results within {timeout:.0f} s")


def upload_on_screen(driver, photo: Path, timeout: float = 120) -> dict:
    """Seconds from choosing a photo in the open search demo until its caption is shown, and until the script run
    has finished (its results, reranked caption and every column on screen: an upper bound on its first results)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    # the page may still be re-rendering after its last answer: wait for the upload field to be there again
    field = WebDriverWait(driver, 60).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, 'input[type="file"]')))
    start = time.perf_counter()
    field.send_keys(str(photo))
    caption = None
    while time.perf_counter() - start < timeout:
        text = driver.execute_script("return document.body.innerText")
        running = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
        # the file name shows at once in the upload field; a second time as the caption block's label
        if caption is None and "Your photo" in text and text.count(photo.name) >= 2 and "captioned in" in text:
            caption = round(time.perf_counter() - start, 2)
        if caption is not None and not running and text.count("search:") >= 3:
            return {"caption_seconds": caption, "all_results_seconds": round(time.perf_counter() - start, 2)}
        time.sleep(0.05)
    raise TimeoutError(f"the uploaded photo's results did not appear within {timeout:.0f} s")


UPLOAD_PAUSE_SECONDS = 10


def search_demo_cold() -> dict:
    from PIL import Image

    from ris_core.data import DEFAULT_DATA_DIR
    from ris_core.demo_artifacts import FOLDER

    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        bare = Path(tmp) / "demo"
        shutil.copytree(DEFAULT_DATA_DIR, bare, ignore=shutil.ignore_patterns(FOLDER))
        # photos no cache has seen (re-encoded: new bytes), as a user's uploads
        photos = [Path(tmp) / f"my_photo_{i}.png" for i in range(2)]
        for photo, source in zip(photos, sorted((DEFAULT_DATA_DIR / "images").glob("*.jpg"))[-2:], strict=True):
            Image.open(source).convert("RGB").save(photo)
        for name, data_dir in (("shipped_files", DEFAULT_DATA_DIR), ("without_shipped_files", bare)):
            timings: dict = {}
            with streamlit_server(env={"RIS_DATA_DIR": str(data_dir)}, timings=timings) as base, \
                    chromium() as driver:
                out[f"{name}_startup_seconds"] = timings["startup_seconds"]
                # without the shipped files the page embeds the 2,600 catalog images first (a minute or more here)
                out[f"{name}_seconds"] = results_on_screen(driver, f"{base}/search_demo",
                                                           timeout=180 if name == "shipped_files" else 600)
                if name == "shipped_files":  # then the first upload on that server, at once (the worst case:
                    # the captioner may still be loading), and another after the time a user takes to pick a file
                    out["upload_after_gallery"] = upload_on_screen(driver, photos[0])
                    time.sleep(UPLOAD_PAUSE_SECONDS)
                    out[f"upload_{UPLOAD_PAUSE_SECONDS}s_later"] = upload_on_screen(driver, photos[1])
        # the old path beside it: a plain `streamlit run`, whose first upload also waits for torch's import
        timings = {}
        with streamlit_server(env={"RIS_DATA_DIR": str(DEFAULT_DATA_DIR)}, preload=False, timings=timings) as base, \
                chromium() as driver:
            plain = {"startup_seconds": timings["startup_seconds"],
                     "shipped_files_seconds": results_on_screen(driver, f"{base}/search_demo")}
            plain["upload_after_gallery"] = upload_on_screen(driver, photos[0])
        out["plain_streamlit_run"] = plain
    return out


def bench_browser(quick: bool = False) -> dict:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        return {"skipped": "needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium-driver)"}
    repeats = 1 if quick else 3
    visits: dict[str, dict[str, list[dict]]] = {path: {"first": [], "repeat": []} for path in PAGES}
    launches: list[float] = []
    cold_server = None
    with streamlit_server() as base:
        for _ in range(repeats):
            for path, (marker, want_chart) in PAGES.items():  # a fresh browser (empty cache) per page
                started = time.perf_counter()
                with chromium() as driver:
                    launches.append(time.perf_counter() - started)
                    driver.get("about:blank")  # the browser is up and has a renderer, as a user's would
                    first = timed_visit(driver, f"{base}/{path}", marker, want_chart)
                    cold_server = cold_server or first
                    visits[path]["first"].append(first)
                    visits[path]["repeat"].append(timed_visit(driver, f"{base}/{path}", marker, want_chart))

    def median(rows: list[dict], key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return round(statistics.median(values), 2) if values else None

    out: dict = {"cold_server": {k: cold_server[k] for k in ("content_seconds", "chart_seconds")}}
    out["search_demo_cold"] = search_demo_cold()
    for path, (_, want_chart) in PAGES.items():
        keys = ["content_seconds", *(["chart_seconds"] if want_chart else []), "dom_content_loaded"]
        name = path or "overview"
        out[f"{name}_first_visit"] = {k: median(visits[path]["first"], k) for k in [*keys, "js_files", "js_kb"]}
        out[f"{name}_repeat_visit"] = {k: median(visits[path]["repeat"], k) for k in keys}
    out["browser_launch_seconds"] = round(statistics.median(launches), 2)
    out["visits"] = 2 * len(launches)
    return out
