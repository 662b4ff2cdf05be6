"""Load test: concurrent dashboard sessions against one `streamlit run` on 127.0.0.1, bounded in count and time.

    python -m bench.load_dashboard                                 # 20 sessions for 60 s (the real test)
    python -m bench.load_dashboard --sessions 3 --seconds 10       # a smoke run
    python -m bench.run --load                                     # the same, from the benchmark

Not collected by pytest (no `test_` prefix): it starts a server and takes minutes.

Clients: each session is one thread speaking Streamlit's own protocol over the websocket a browser opens
(`/_stcore/stream`: protobuf BackMsg `rerun_script` with a page's script hash in, ForwardMsg deltas out until
`script_finished`), after fetching the app's HTML once, and fetching every /media/ image a page references, as a
browser would. A page time is from the request to the last image fetched. Why not 20 headless Chromium: on 2 cores
20 browsers measure Chromium's layout and JavaScript, not the server, and need ~4 GB; why not AppTest in threads:
it bypasses the server, the websocket and the session manager, which are what concurrency stresses here.
What this does not measure: the browser's own rendering time.

Warm-up: one session visits every page first, and the test waits for the search demo's background captioner
load to happen (a one-time load, measured neither as the sessions' time nor as their memory growth).

Checks (exit code 1 if one fails): no exception element, error alert, page timeout or transport error in any
session; the captioner loaded once (the server process counts `Captioner.load` calls, see `serve`); server memory
bounded: peak RSS under --max_rss_gb, growth per session under --max_growth_per_session_mb (each session keeps its
own state and media files), and no steady growth: the second half of the concurrent phase adds under
--max_late_growth_mb (a leak keeps growing with every page load; per-session state stops once all sessions are in).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "dashboard.py"
HOST = "127.0.0.1"  # only ever localhost
EVENT = "RIS_LOAD_EVENT"  # the server process prints one such line per expensive load


# ---------------------------------------------------------------- the server


def serve(port: int) -> None:
    """Run the dashboard in this process as `make serve` does (`ris_app.serve`), counting the expensive loads on
    stderr."""
    sys.path.insert(0, str(REPO))
    from ris_app.serve import preload
    from ris_core import data
    from ris_core.captioner import Captioner
    from ris_core.search.catalog import CatalogIndex

    def counted(owner, name: str, label: str, is_classmethod: bool = False) -> None:
        original = getattr(owner, name)
        target = original.__func__ if is_classmethod else original

        def wrapper(*args, **kwargs):
            print(f"{EVENT} {label} {time.time():.3f}", file=sys.stderr, flush=True)
            return target(*args, **kwargs)

        setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)

    counted(Captioner, "load", "captioner", is_classmethod=True)
    counted(CatalogIndex, "build", "catalog_index", is_classmethod=True)
    counted(data, "load_catalog", "catalog")  # ris_app.loaders imported load_catalog by name: patch that too
    import ris_app.loaders

    ris_app.loaders.load_catalog = data.load_catalog
    preload()
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", str(DASHBOARD), "--server.address", HOST, "--server.port", str(port),
                "--server.headless", "true", "--browser.gatherUsageStats", "false",
                "--server.fileWatcherType", "none", "--server.runOnSave", "false"]
    cli.main()


def http_get(url: str, timeout: float = 60) -> bytes:
    assert url.startswith(f"http://{HOST}:"), url  # never leaves this machine
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def start_server(port: int, log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process, in stop_server
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(port)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    proc.log = log  # type: ignore[attr-defined]
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {log_path}")
        try:
            if http_get(f"http://{HOST}:{port}/_stcore/health", timeout=5).strip() == b"ok":
                return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"the server did not answer /_stcore/health within 180 s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.close()  # type: ignore[attr-defined]


class MemorySampler(threading.Thread):
    """RSS of the server process and its children, every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()

    def rss(self) -> int:
        import psutil

        total = 0
        for proc in [self.process, *self.process.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.samples.append((time.time(), self.rss()))
            except Exception:  # noqa: BLE001 - the server went away: stop sampling
                return
            self.stopped.wait(self.interval)

    def peak_between(self, start: float, end: float) -> int:
        values = [rss for t, rss in self.samples if start <= t <= end]
        return max(values) if values else 0

    def at(self, moment: float) -> int:
        before = [rss for t, rss in self.samples if t <= moment]
        return before[-1] if before else (self.samples[0][1] if self.samples else 0)


# ---------------------------------------------------------------- one browser-like session


@dataclass
class PageLoad:
    page: str
    seconds: float
    exceptions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    images: int = 0


class Session:
    """One websocket session: asks for pages by script hash and reads until the script has finished."""

    def __init__(self, port: int, timeout: float) -> None:
        import websocket

        self.port = port
        self.timeout = timeout
        http_get(f"http://{HOST}:{port}/")  # the app's HTML, as a browser fetches first
        self.ws = websocket.create_connection(f"ws://{HOST}:{port}/_stcore/stream", subprotocols=["streamlit"],
                                              timeout=timeout)
        self.pages: dict[str, str] = {}  # page name (url pathname) -> script hash

    def close(self) -> None:
        self.ws.close()

    def load(self, page: str) -> PageLoad:
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        message = BackMsg()
        message.rerun_script.query_string = ""
        message.rerun_script.page_script_hash = self.pages.get(page, "")
        start = time.perf_counter()
        self.ws.send_binary(message.SerializeToString())
        result = PageLoad(page=page, seconds=0.0)
        media: list[str] = []
        deadline = time.time() + self.timeout
        while True:
            if time.time() > deadline:
                raise TimeoutError(f"{page}: no script_finished within {self.timeout:.0f} s")
            forward = ForwardMsg.FromString(self.ws.recv())
            kind = forward.WhichOneof("type")
            if kind == "navigation":  # the app's current page list (replaces any earlier one)
                self.pages = {p.url_pathname or p.page_name: p.page_script_hash for p in forward.navigation.app_pages}
            elif kind == "delta" and forward.delta.WhichOneof("type") == "new_element":
                element = forward.delta.new_element
                which = element.WhichOneof("type")
                if which == "exception":
                    result.exceptions.append(f"{element.exception.type}: {element.exception.message}")
                elif which == "alert" and element.alert.format == 1:  # Alert.Format.ERROR
                    result.errors.append(element.alert.body)
                elif which == "imgs":
                    media += [img.url for img in element.imgs.imgs if img.url.startswith("/media/")]
            elif kind == "page_not_found":
                result.errors.append(f"page not found: {page}")
            elif kind == "script_finished" and forward.script_finished != ForwardMsg.FINISHED_EARLY_FOR_RERUN:
                break
        for url in media:  # as a browser would, before the page looks done
            http_get(f"http://{HOST}:{self.port}{url}")
        result.images = len(media)
        result.seconds = time.perf_counter() - start
        return result


def session_worker(port: int, pages: list[str], stop_at: float, max_loads: int, timeout: float, seed: int,
                   loads: list[PageLoad], failures: list[str]) -> None:
    rng = random.Random(seed)
    try:
        session = Session(port, timeout)
    except Exception as err:  # noqa: BLE001 - reported as a failure of this session
        failures.append(f"session {seed}: connect failed ({type(err).__name__}: {err})")
        return
    try:
        loads.append(session.load(""))  # the default page, as opening the app's URL does
        order = pages[:]
        rng.shuffle(order)
        count = 1
        while time.time() < stop_at and count < max_loads:
            loads.append(session.load(order[count % len(order)]))
            count += 1
    except Exception as err:  # noqa: BLE001
        failures.append(f"session {seed}: {type(err).__name__}: {err}")
    finally:
        session.close()


# ---------------------------------------------------------------- the test


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (rank - low), 3)


def summarize(loads: list[PageLoad]) -> dict:
    by_page: dict[str, list[float]] = {}
    for load in loads:
        by_page.setdefault(load.page or "(default)", []).append(load.seconds)
    every = [load.seconds for load in loads]
    return {
        "page_loads": len(loads), "images_fetched": sum(load.images for load in loads),
        "p50_seconds": percentile(every, 50), "p95_seconds": percentile(every, 95),
        "max_seconds": round(max(every), 3) if every else None,
        "pages": {page: {"loads": len(v), "p50_seconds": percentile(v, 50), "p95_seconds": percentile(v, 95)}
                  for page, v in sorted(by_page.items())},
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


WARM_SETTLE_SECONDS = 5  # after the captioner load starts: its weights read and placed (~0.5 s here)


def wait_for_event(log_path: Path, name: str, timeout: float) -> bool:
    """Wait until the server has logged the expensive load `name` (see `serve`); False after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if re.search(rf"^{EVENT} {name} ", log_path.read_text(errors="replace"), flags=re.MULTILINE):
            return True
        time.sleep(0.5)
    return False


def run_load_test(sessions: int = 20, seconds: float = 60, max_loads: int = 200, timeout: float = 600,
                  max_rss_gb: float = 4.0, max_growth_per_session_mb: float = 50, max_late_growth_mb: float = 150,
                  port: int | None = None,
                  data_dir: str | None = None) -> dict:
    """Start a server, warm every page once, then `sessions` concurrent sessions for `seconds`; return a summary."""
    sessions, seconds, max_loads = min(sessions, 50), min(seconds, 600), min(max_loads, 1000)  # hard bounds
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="load-dashboard-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if data_dir:
        env["RIS_DATA_DIR"] = data_dir
    log_path = workdir / "server.log"
    server = start_server(port, log_path, env)
    sampler = MemorySampler(server.pid)
    sampler.start()
    try:
        warm = Session(port, timeout)  # one session visits every page: fills the caches, gives cold times
        cold = [warm.load("")]
        pages = [p for p in warm.pages if p]
        cold += [warm.load(p) for p in pages]
        warm.close()
        # the search demo loads the captioner in the background after its first answer: a one-time load that
        # belongs to the warm-up (as when the page loaded it itself), not to the sessions' growth or times
        if wait_for_event(log_path, "captioner", timeout=90):
            time.sleep(WARM_SETTLE_SECONDS)
        warm_done = time.time()

        loads: list[PageLoad] = []
        failures: list[str] = []
        stop_at = time.time() + seconds
        threads = [threading.Thread(target=session_worker,
                                    args=(port, pages, stop_at, max_loads, timeout, i, loads, failures))
                   for i in range(sessions)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + timeout + 60)
        ended = time.time()
        hung = sum(thread.is_alive() for thread in threads)
        time.sleep(10)  # sessions closed: what the server gives back
        after_close = sampler.rss()
    finally:
        sampler.stopped.set()
        stop_server(server)
    events = re.findall(rf"^{EVENT} (\w+) ", log_path.read_text(errors="replace"), flags=re.MULTILINE)
    counts = {name: events.count(name) for name in ("captioner", "catalog_index", "catalog")}
    peak = sampler.peak_between(0, float("inf"))
    growth = sampler.peak_between(warm_done, ended) - sampler.at(warm_done)
    middle = warm_done + (ended - warm_done) / 2
    late_growth = sampler.at(ended) - sampler.at(middle)
    profile_mb = {f"{round(f * 100)}%": round(sampler.at(warm_done + f * (ended - warm_done)) / 1024**2)
                  for f in (0, 0.25, 0.5, 0.75, 1)}
    problems = [*failures, *(f"{load.page or '(default)'}: exception {e}" for load in loads for e in load.exceptions),
                *(f"{load.page or '(default)'}: error alert {e[:160]}" for load in loads for e in load.errors)]
    if hung:
        problems.append(f"{hung} session threads still running after the time limit")
    checks = {
        "no_errors": not problems,
        "captioner_loaded_once": counts["captioner"] == 1,
        "peak_rss_under_limit": peak < max_rss_gb * 1024**3,
        "rss_growth_per_session_under_limit": growth / max(sessions, 1) < max_growth_per_session_mb * 1024**2,
        "rss_flat_in_second_half": late_growth < max_late_growth_mb * 1024**2,
    }
    return {
        "sessions": sessions, "seconds": seconds, "server_log": str(log_path),
        "cold_page_seconds": {load.page or "(default)": round(load.seconds, 3) for load in cold},
        "cold_problems": [*(e for load in cold for e in load.exceptions),
                          *(e[:160] for load in cold for e in load.errors)],
        "concurrent": summarize(loads),
        "loads_counted_in_server": counts,
        "server_rss_peak_mb": round(peak / 1024**2), "server_rss_growth_mb": round(growth / 1024**2),
        "server_rss_second_half_growth_mb": round(late_growth / 1024**2),
        "server_rss_mb_through_concurrent_phase": profile_mb,
        "server_rss_10s_after_close_mb": round(after_close / 1024**2),
        "problems": problems[:20], "problem_count": len(problems),
        "checks": checks, "passed": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20, help="concurrent sessions (at most 50)")
    parser.add_argument("--seconds", type=float, default=60, help="length of the concurrent phase (at most 600)")
    parser.add_argument("--max_loads", type=int, default=200, help="page loads per session at most")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one page may take (cold search demo)")
    parser.add_argument("--max_rss_gb", type=float, default=4.0, help="fail above this server peak RSS")
    parser.add_argument("--max_growth_per_session_mb", type=float, default=50,
                        help="fail above this RSS growth per concurrent session")
    parser.add_argument("--max_late_growth_mb", type=float, default=150,
                        help="fail above this RSS growth in the second half of the concurrent phase (a leak)")
    parser.add_argument("--data_dir", default=None, help="RIS_DATA_DIR for the server (default: its own default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.port)
        return 0
    summary = run_load_test(args.sessions, args.seconds, args.max_loads, args.timeout, args.max_rss_gb,
                            args.max_growth_per_session_mb, args.max_late_growth_mb, data_dir=args.data_dir)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
