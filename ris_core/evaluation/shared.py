"""Files an evaluation computes without the run's own weights, kept for the evaluations of other runs.

Runs that share a frozen backbone and data embed the same catalog photos into the same vectors, embed the same
catalog names and so train the same contrastive baseline: minutes of each evaluation (`timings.json`). Each such
file is stored once under its key in a shared folder (`default_folder()`) and hard-linked into the
workspace (copied where links fail). Files are only ever replaced whole, never written in place, so a link never
sees a change made through the other name.

    if not shared.fetch(folder, key, [path]):  # a file another evaluation computed under the same key
        compute_and_write(path)
        shared.share(folder, key, [path])
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ris_core.files import atomic_path

logger = logging.getLogger(__name__)
FOLDER_VARIABLE = "RIS_SHARED_EVAL_DIR"  # another folder; empty: share nothing


def default_folder() -> Path | None:
    """`.cache/evaluation/` under the working folder, or where RIS_SHARED_EVAL_DIR says (empty: none)."""
    folder = os.environ.get(FOLDER_VARIABLE)
    if folder is None:
        return Path(".cache") / "evaluation"
    return Path(folder) if folder.strip() else None


def fetch(folder: Path | None, key: str, paths: list[Path]) -> bool:
    """Put the files shared under `key` at `paths` (all or none); False when there are none to put."""
    if folder is None:
        return False
    sources = [Path(folder) / f"{key}-{path.name}" for path in paths]
    if not all(source.is_file() for source in sources):
        return False
    try:
        for source, path in zip(sources, paths, strict=True):
            _link(source, path)
    except OSError as err:
        logger.warning("could not reuse %s (%s): computing it again", sources[0].name, err)
        return False
    logger.info("reusing %s, computed by an earlier evaluation", ", ".join(s.name for s in sources))
    return True


def share(folder: Path | None, key: str, paths: list[Path]) -> None:
    """Offer the files at `paths` to later evaluations under `key`; a folder that cannot take them is skipped."""
    if folder is None:
        return
    try:
        for path in paths:
            _link(path, Path(folder) / f"{key}-{path.name}")
    except OSError as err:
        logger.warning("not sharing %s with later evaluations: %s", paths[0].name, err)


def _link(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or one without links
            shutil.copyfile(source, tmp)
