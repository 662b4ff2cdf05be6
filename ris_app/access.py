"""What a dashboard visitor may open and start, as fixed by whoever starts the server (environment variables).

    RIS_RUNS_DIRS      more folders whose runs the sidebar lists, besides the repo's results/ (os.pathsep-separated)
    RIS_DATA_DIR       the default data folder (default: the bundled data/demo)
    RIS_DATA_DIRS      more data folders a visitor may pick: Kaggle-layout folders, or folders holding some
    RIS_OPEN_FOLDERS   1: the visitor may type any folder in the sidebar (a local, single-user `make run`)
    RIS_MAX_PRODUCTS   largest catalog a visitor may have embedded or evaluated (default 50,000)
    RIS_MAX_JOBS       background jobs (evaluations, catalog embeddings) running at once (default 1)

Everything a visitor types is resolved (symlinks followed) and must lie under an allowed root; otherwise one
message that names no server path, the same whether the folder exists or not. Messages shown to visitors
go through `public`, which replaces server paths by their place under a root, or by "…".
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ris_core.data import DEFAULT_DATA_DIR
from ris_core.runs import REPO_ROOT, RESULTS_DIR

NOT_ALLOWED = "That folder is not one this server offers; pick one of the listed folders."
PATH_PATTERN = re.compile(r"(?<![\w.:/])/(?:[^\s/'\"`:,;()\[\]]+/)*[^\s/'\"`:,;()\[\]]*")


def _dirs(text: str | None) -> list[Path]:
    parts = (text or "").replace("\n", os.pathsep).split(os.pathsep)
    return [Path(p.strip()).expanduser() for p in parts if p.strip()]


def _int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


@dataclass(frozen=True)
class Access:
    """The operator's settings, read from the environment once per script run."""

    runs_roots: tuple[Path, ...]
    data_roots: tuple[Path, ...]
    default_data: Path
    open_folders: bool = False
    max_products: int = 50_000
    max_jobs: int = 1
    labels: dict[Path, str] = field(default_factory=dict, compare=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Access:
        env = os.environ if env is None else env
        default_data = Path(env.get("RIS_DATA_DIR", "").strip() or DEFAULT_DATA_DIR).expanduser()
        runs = (RESULTS_DIR, *_dirs(env.get("RIS_RUNS_DIRS")))
        data = (default_data, *_dirs(env.get("RIS_DATA_DIRS")))
        resolved = {p.resolve(): p for p in (*runs, *data, REPO_ROOT)}
        labels = {r: _label(p) for r, p in resolved.items()}
        return cls(runs_roots=tuple(dict.fromkeys(p.resolve() for p in runs)),
                   data_roots=tuple(dict.fromkeys(p.resolve() for p in data)), default_data=default_data,
                   open_folders=env.get("RIS_OPEN_FOLDERS", "").strip().lower() in {"1", "true", "yes"},
                   max_products=_int("RIS_MAX_PRODUCTS", 50_000), max_jobs=_int("RIS_MAX_JOBS", 1), labels=labels)

    def allows(self, path: Path, roots: tuple[Path, ...]) -> bool:
        if self.open_folders:
            return True
        try:
            resolved = Path(path).expanduser().resolve()
        except (OSError, RuntimeError):  # a symlink loop
            return False
        return any(resolved == root or resolved.is_relative_to(root) for root in roots)

    def data_folder(self, text: str | None) -> Path | None:
        """The data folder a visitor chose, or None when it is not allowed (whether it exists or not)."""
        path = Path(text.strip()).expanduser() if text and text.strip() else self.default_data
        return path if self.allows(path, self.data_roots) else None

    def data_choices(self) -> list[Path]:
        """Allowed data folders to offer: each root holding styles.csv, and its subfolders that do."""
        found: list[Path] = []
        for root in self.data_roots:
            candidates = [root] + (sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])
            found += [p for p in candidates if (p / "styles.csv").is_file()]
        return list(dict.fromkeys(found)) or [self.default_data]

    def label(self, path: Path) -> str:
        """A folder as a visitor sees it: its place under a root (e.g. `data/demo`), never the server's path."""
        resolved = Path(path).resolve()
        for root, name in sorted(self.labels.items(), key=lambda item: -len(str(item[0]))):
            if resolved == root or resolved.is_relative_to(root):
                rest = resolved.relative_to(root)
                return name if str(rest) == "." else f"{name}/{rest}"
        return str(path) if self.open_folders else "…"

    def public(self, message: object) -> str:
        """A message with server paths replaced by their labels (or "…"); unchanged with open folders."""
        text = str(message)
        if self.open_folders:
            return text
        return PATH_PATTERN.sub(lambda m: self.label(Path(m.group(0))) if len(m.group(0)) > 1 else m.group(0), text)


def _label(path: Path) -> str:
    resolved = path.resolve()
    if resolved.is_relative_to(REPO_ROOT):
        rel = resolved.relative_to(REPO_ROOT)
        return "." if str(rel) == "." else str(rel)
    return path.name or "…"
