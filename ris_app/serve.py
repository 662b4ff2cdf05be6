"""`python -m ris_app.serve [streamlit options]`: `streamlit run dashboard.py` with the captioning stack (torch,
transformers, the model classes) imported before the server listens.

Importing it takes ~4 s on 2 cores and holds the GIL: done in a session, it delays that session's first upload
(and every page served meanwhile). A server pays it once here, at start, as model servers load before they
report ready; `streamlit run dashboard.py` still works and imports it on the first page that captions.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboard.py"
logger = logging.getLogger("ris_app.serve")


def preload() -> float:
    """Import what loading a captioner imports; returns the seconds it took."""
    started = time.perf_counter()
    import transformers

    import ris_core.captioner  # noqa: F401  torch, transformers and the library's model code

    # transformers imports model classes on first access: touch the ones our checkpoints are built from
    for name in ("VisionEncoderDecoderModel", "GPT2LMHeadModel", "GPT2Config", "VisionEncoderDecoderConfig"):
        getattr(transformers, name)
    return time.perf_counter() - started


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("importing torch and transformers before serving: %.1f s", preload())
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", str(DASHBOARD), *argv]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
