"""Bounded background jobs for a shared server: one job per key, at most `max_jobs` at once, progress on disk.

A running job holds an exclusive `flock` on `<root>/<key>.lock` and on one of `max_jobs` slot files. The
kernel drops both when the process dies, so a killed server leaves no stale "running" job behind. Progress
is a small JSON file replaced atomically beside the lock, so every session (of any process) can show it.

    jobs = Jobs(Path(".cache/jobs"), max_jobs=1)
    jobs.start("evaluate:results/runs/x", lambda progress: evaluate_run(run, progress=progress))
    jobs.status("evaluate:results/runs/x")  # JobStatus(state="running", stage="captioning", done=64, total=400)
"""

from __future__ import annotations

import fcntl
import json
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO

from ris_core.errors import RisError
from ris_core.files import digest, write_json_atomic
from ris_core.search import one_line

ProgressHook = Callable[[str, int, int], None]


class Busy(RisError):
    """The work is already running (or every job slot is taken); the message says which."""


@dataclass
class JobStatus:
    """What a job is doing: `state` is idle (never run here), running, done or failed."""

    key: str
    state: str = "idle"
    stage: str = ""
    done: int = 0
    total: int = 0
    message: str = ""  # the error of a failed job, one line
    started: float = 0.0
    updated: float = 0.0

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total > 0 else 0.0

    @property
    def running(self) -> bool:
        return self.state == "running"


def _try_lock(path: Path) -> IO | None:
    """An open file holding an exclusive flock on `path`, or None when another holder has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - the lock lives as long as the handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def is_locked(path: Path) -> bool:
    """Whether some process or thread holds the lock at `path` (checked without waiting)."""
    if not path.exists():
        return False
    handle = _try_lock(path)
    if handle is None:
        return True
    handle.close()
    return False


@contextmanager
def exclusive(path: Path, what: str):
    """Hold the lock at `path` for the block, or raise Busy at once saying `what` is already running."""
    handle = _try_lock(path)
    if handle is None:
        raise Busy(f"{what} is already running; wait for it to finish")
    try:
        yield
    finally:
        handle.close()


class Jobs:
    """Run callables in background threads, one per key and at most `max_jobs` at a time."""

    def __init__(self, root: Path, max_jobs: int = 1) -> None:
        self.root = Path(root)
        self.max_jobs = max(1, int(max_jobs))

    def _paths(self, key: str) -> tuple[Path, Path]:
        stem = digest(key)
        return self.root / f"{stem}.lock", self.root / f"{stem}.json"

    def status(self, key: str) -> JobStatus:
        lock, progress = self._paths(key)
        try:
            saved = json.loads(progress.read_text())
            status = JobStatus(**{k: saved[k] for k in JobStatus.__dataclass_fields__ if k in saved})
        except (OSError, ValueError, TypeError):
            status = JobStatus(key=key)
        if status.state == "running" and not is_locked(lock):
            status.state, status.message = "failed", status.message or "stopped before it finished (server restart?)"
        return status

    def running(self) -> int:
        return sum(is_locked(self.root / f"slot-{i}.lock") for i in range(self.max_jobs))

    def start(self, key: str, work: Callable[[ProgressHook], object], label: str = "this job") -> JobStatus:
        """Start `work(progress)` in a thread; Busy when the key is running or every slot is taken."""
        lock_path, progress_path = self._paths(key)
        lock = _try_lock(lock_path)
        if lock is None:
            raise Busy(f"{label} is already running; its progress is shown below")
        slot = next((h for i in range(self.max_jobs) if (h := _try_lock(self.root / f"slot-{i}.lock"))), None)
        if slot is None:
            lock.close()
            raise Busy(f"{self.max_jobs} job(s) are already running on this server (the operator's limit); "
                       "try again when one has finished")
        status = JobStatus(key=key, state="running", started=time.time(), updated=time.time())
        write_json_atomic(progress_path, asdict(status))
        last_write = [0.0]

        def progress(stage: str, done: int, total: int) -> None:
            status.stage, status.done, status.total, status.updated = stage, done, total, time.time()
            if status.updated - last_write[0] > 0.5 or done >= total:  # a few small writes a second at most
                write_json_atomic(progress_path, asdict(status))
                last_write[0] = status.updated

        def body() -> None:
            try:
                work(progress)
                status.state = "done"
            except Exception as err:  # noqa: BLE001 - a failed job reports its error; the server keeps running
                status.state = "failed"
                status.message = one_line(err if isinstance(err, RisError) else f"{type(err).__name__}: {err}")
            finally:
                status.updated = time.time()
                write_json_atomic(progress_path, asdict(status))
                slot.close()
                lock.close()

        snapshot = replace(status)  # the thread mutates `status`; the caller gets the moment it started
        threading.Thread(target=body, name=f"job-{progress_path.stem}", daemon=True).start()
        return snapshot
