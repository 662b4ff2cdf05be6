"""`python -m ris_app.serve [streamlit options]`: `streamlit run dashboard.py` with the captioning stack (torch,
transformers, the model classes) and the pages' libraries imported before the server listens, then frozen out of
the garbage collector's way.

Importing torch and transformers takes ~4 s on 2 cores and holds the GIL: done in a session, it delays that
session's first upload (and every page served meanwhile). A server pays it once here, at start, as model servers
load before they report ready.

The millions of objects those libraries create at import live as long as the server: `gc.freeze()` moves them
to a generation the garbage collector never scans, so its collections walk only what the pages made since (a full
collection after every script run, Streamlit's default, took over half of a busy server's CPU; it is off in
`.streamlit/config.toml`). `streamlit run dashboard.py` still works, without either.
"""

from __future__ import annotations

import gc
import importlib
import logging
import sys
import time
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboard.py"
logger = logging.getLogger("ris_app.serve")


# what loading a captioner imports, and the modules the pages import (their libraries with them)
PRELOADED = ("ris_core.captioner", "ris_app.loaders", "ris_app.charts", "ris_app.widgets", "ris_app.sidebar",
             "ris_app.share", "ris_app.guards", "ris_core.evaluation.verdict", "ris_core.caption_compare",
             "ris_core.hybrid", "ris_core.search.image_knn", "ris_core.search.web")


SERVER_FLAGS = ("--runner.postScriptGC", "false")  # see .streamlit/config.toml


def preload() -> float:
    """Import `PRELOADED`, then freeze every object alive out of the collector's scans; returns the seconds."""
    started = time.perf_counter()
    for module in PRELOADED:
        importlib.import_module(module)
    import transformers

    # transformers imports model classes on first access: touch the ones our checkpoints are built from
    for name in ("VisionEncoderDecoderModel", "GPT2LMHeadModel", "GPT2Config", "VisionEncoderDecoderConfig"):
        getattr(transformers, name)
    gc.collect()  # garbage left by the imports is freed, not frozen
    gc.freeze()
    return time.perf_counter() - started


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("imported torch, transformers and the pages' libraries before serving: %.1f s", preload())
    from streamlit.web import cli

    # also from another working directory (whose .streamlit/config.toml Streamlit reads); a later flag overrides it
    sys.argv = ["streamlit", "run", str(DASHBOARD), *SERVER_FLAGS, *argv]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
