"""Batch retrieval on the evaluation's own work: every strategy's 4,443 queries over the 39,991 training products.

    python -m bench.probe_batch_retrieval --run results/runs/reference-cpu

The queries are each strategy applied to the run's greedy captions (eval/captions.csv), the catalog the run's
training products, as `training.evaluate` searches them (`CatalogIndex.search_many`, one sparse product per
chunk). Prints the seconds per strategy (best of `--repeats`), the matrix build apart, and the slowest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from bench.common import probe_parser
from ris_core.data import Split, load_catalog
from ris_core.search.catalog import CatalogIndex
from ris_core.strategies import STRATEGIES


def probe(run: Path, data_dir: Path, repeats: int = 3) -> dict:
    catalog = load_catalog(data_dir, require_images=False)
    train = Split.load(run / "split.json").searchable_ids(catalog.products)
    captions = pd.read_csv(run / "eval" / "captions.csv", keep_default_na=False)["generated"].astype(str).tolist()
    index = CatalogIndex.build(catalog.products.loc[train], catalog.image_dir)
    started = time.perf_counter()
    index.matrix  # noqa: B018 - built on first use: timed apart
    out: dict = {"products": len(train), "queries": len(captions),
                 "matrix_seconds": round(time.perf_counter() - started, 2), "seconds": {}}
    for name, fn in STRATEGIES.items():
        queries = [fn(c) for c in captions]
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            index.search_many(queries, k=10)
            times.append(time.perf_counter() - started)
        out["seconds"][name] = round(min(times), 2)
    out["slowest"] = max(out["seconds"].items(), key=lambda item: item[1])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = probe_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.run, args.data_dir, args.repeats), indent=1))


if __name__ == "__main__":
    main()
