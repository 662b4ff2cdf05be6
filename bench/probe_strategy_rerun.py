"""How long a re-evaluation takes when only the query strategies changed (#16: at most 1 minute).

    python -m bench.probe_strategy_rerun --run /tmp/copy/runs/reference-cpu --data_dir <its data>

Run it on an evaluated copy of a run (its caches in eval/ from a full evaluation on this machine: the captions,
embeddings, reranking and refinement are reused as after any evaluation). It registers one new strategy, as a
user adding one to `ris_core/strategies.py` would (`first_three_words`), evaluates again without --force, and
prints the wall time, the evaluation's stage seconds (timings.json) and the new strategy's retrieval row.
The copy's eval/ then holds the new strategy's rows: use a throwaway copy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from ris_core.strategies import strategy, words

NEW = "first_three_words"


@strategy(NEW, "The caption's first three words (a strategy added after the evaluation)")
def first_three_words(caption: str) -> str:
    return " ".join(words(caption)[:3])


def main(argv: list[str] | None = None) -> None:
    from training.evaluate import main as evaluate_main

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    eval_dir = evaluate_main(["--run", str(args.run), "--data_dir", str(args.data_dir), "--quiet"])
    seconds = time.perf_counter() - started
    timings = json.loads((eval_dir / "timings.json").read_text())
    rows = pd.read_csv(eval_dir / "retrieval.csv")
    new_rows = rows[rows["strategy"].astype(str).str.endswith(NEW)]
    print(json.dumps({"wall_seconds": round(seconds, 1), "timings": timings,
                      "new_strategy_rows": len(new_rows)}, indent=1))


if __name__ == "__main__":
    main()
