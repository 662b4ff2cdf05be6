"""End-to-end evaluation of the reference run: `ris_core.evaluation.evaluate_run` on a copy, wall time and the
seconds of each stage (the evaluation's own timings.json).

The copy (in a temp folder, without checkpoints/ and eval/) keeps the real run untouched; --force recomputes
captions and embeddings. Full: every held-out product of data/demo. --quick: a 64-product cut of data/demo.
`another_run_*`: a second copy evaluated afresh, as another checkpoint on the same frozen backbone would be,
reusing the catalog embeddings, name embeddings and contrastive model the first one shared
(`ris_core/evaluation/shared.py`, in a temp folder here); `encoder_cache`: images encoded and reused.
`semantic_texts`: the caption metrics' MiniLM work on the first evaluation's captions, each text column encoded on
its own (the path before `ris_core.sentence_encoder.text_vectors`) against every distinct text once with the catalog
names' vectors reused, side by side; `python -m bench.evaluation <eval dir>` measures it on any evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

from bench.common import reference_run, run_sample
from ris_core.data import DEFAULT_DATA_DIR
from ris_core.evaluation.shared import FOLDER_VARIABLE


def bench_evaluation(quick: bool = False) -> dict:
    from training.evaluate import main as evaluate_main

    run, source = reference_run()
    if run is None:
        return {"skipped": source}
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp, \
            mock.patch.dict(os.environ, {FOLDER_VARIABLE: str(Path(tmp) / "shared")}):
        copy = shutil.copytree(run.path, Path(tmp) / run.name, ignore=shutil.ignore_patterns("checkpoints", "eval"))
        data_dir = DEFAULT_DATA_DIR
        args = ["--run", str(copy), "--force", "--quiet"]
        if quick:  # 16 held-out and 48 training products of the demo catalog: seconds, not minutes
            data_dir = run_sample(run, Path(tmp) / "data", 16, 48)
            args += ["--max_products", "16", "--n_boot", "50"]
        # its "N of M held-out products missing" warning is expected here
        logging.getLogger("ris_core.evaluation.pipeline").setLevel(logging.ERROR)
        start = time.perf_counter()
        eval_dir = evaluate_main([*args, "--data_dir", str(data_dir)])
        seconds = time.perf_counter() - start
        metrics = json.loads((eval_dir / "caption_metrics.json").read_text())
        retrieval = json.loads((eval_dir / "retrieval.json").read_text())
        timings = json.loads((eval_dir / "timings.json").read_text())
        semantic = semantic_texts(eval_dir)
        reruns = rerun_seconds([a for a in args if a != "--force"] + ["--data_dir", str(data_dir)])
        other = shutil.copytree(run.path, Path(tmp) / "another" / run.name,
                                ignore=shutil.ignore_patterns("checkpoints", "eval"))
        start = time.perf_counter()
        other_dir = evaluate_main([*[a for a in args if a != "--force"], "--run", str(other), "--data_dir",
                                   str(data_dir)])
        linked = [path.name for path in eval_dir.iterdir()  # the same file on disk: reused, not computed again
                  if (other_dir / path.name).is_file() and (other_dir / path.name).stat().st_ino == path.stat().st_ino]
        another = {"another_run_seconds": round(time.perf_counter() - start, 1),
                   "another_run_stage_seconds": json.loads((other_dir / "timings.json").read_text())["stages"],
                   "another_run_reused": sorted(linked)}
    return {
        "model": source, "data_dir": str(data_dir if not quick else f"{DEFAULT_DATA_DIR} (64-product cut)"),
        "held_out_scored": metrics["n_scored"], "catalog_products": retrieval["catalog_size"],
        "wall_seconds": round(seconds, 1), "captioning_images_per_second": round(metrics["images_per_second"], 1),
        "bleu_4": round(metrics["model"]["bleu_4"], 2), "stage_seconds": timings["stages"],
        "encoder_cache": timings.get("encoder_cache"), "semantic_texts": semantic, **reruns, **another,
    }


def semantic_texts(eval_dir: Path) -> dict:
    """Seconds and texts encoded for the semantic scores of an evaluation's captions, both ways (module docstring)."""
    import numpy as np
    import pandas as pd

    from ris_core.evaluation import files
    from ris_core.sentence_encoder import SentenceEncoder, text_vectors

    captions = pd.read_csv(eval_dir / files.CAPTIONS, keep_default_na=False)
    columns = [c for c in ("reference", "generated", "nn_caption", "reranked") if c in captions]
    names = json.loads((eval_dir / f"{files.CATALOG_KNN}.json").read_text())["names"]
    known = dict(zip(names, np.load(eval_dir / files.NAME_EMBEDDINGS, allow_pickle=False)))
    encoder = SentenceEncoder.load()
    start = time.perf_counter()
    for column in columns:
        encoder.encode(captions[column].tolist())
    per_column = time.perf_counter() - start
    start = time.perf_counter()
    text_vectors(encoder, [t for column in columns for t in captions[column]], known)
    once = time.perf_counter() - start
    distinct = {str(t) for column in columns for t in captions[column]}
    return {"per_column_seconds": round(per_column, 2), "per_column_texts": int(sum(captions[c].nunique()
                                                                                     for c in columns)),
            "once_seconds": round(once, 2), "once_texts": len(distinct - known.keys()),
            "speedup": round(per_column / max(once, 1e-9), 2)}


def rerun_seconds(args: list[str]) -> dict:
    """The same evaluation again, unchanged, then with one strategy changed (the paper's last two words become
    the last three): what an engineer waits for after editing a strategy. Captions, embeddings, rankings of
    unchanged strategies and caption metrics are read back (`ris_core.evaluation.rankings_cache`)."""
    from ris_core.strategies import STRATEGIES
    from training.evaluate import main as evaluate_main

    def timed() -> tuple[float, dict]:
        start = time.perf_counter()
        eval_dir = evaluate_main(args)
        return round(time.perf_counter() - start, 1), json.loads((eval_dir / "timings.json").read_text())["stages"]

    unchanged, _ = timed()
    with mock.patch.dict(STRATEGIES, {"last_two_words": lambda caption: " ".join(caption.split()[-3:])}):
        changed, stages = timed()
    return {"rerun_unchanged_seconds": unchanged, "rerun_one_strategy_changed_seconds": changed,
            "rerun_one_strategy_changed_stage_seconds": stages}


if __name__ == "__main__":
    import sys

    print(json.dumps(semantic_texts(Path(sys.argv[1])), indent=2))
