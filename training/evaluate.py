"""Evaluate a run on its held-out products: caption metrics and query-strategy retrieval.

    python -m training.evaluate --run results/runs/reference-cpu --data_dir ../shared/data/fashion-product-images-small
    python -m training.evaluate --run results/runs/reference-cpu          # the data folder the run was trained on

A thin CLI over `ris_core.evaluation.evaluate_run`, which writes <run>/eval/ and reuses what the same model
already computed for the same products unless --force.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ris_core.captioner import load_any_captioner
from ris_core.dataset_sources import SourceColumns
from ris_core.errors import RisError
from ris_core.evaluation.pipeline import EvalConfig, evaluate_run
from ris_core.rerank import RerankConfig
from ris_core.runs import Run
from ris_core.sharding import process_count, release, serve


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults, rerank = EvalConfig(), RerankConfig()
    parser.add_argument("--run", type=Path, required=True, help="run folder (results/runs/<name>)")
    parser.add_argument("--data_dir", type=Path, default=None,
                        help="the products: a Kaggle-layout folder, or a parquet file or folder, Arrow dataset, "
                             "imagefolder or Hub dataset id (default: the run's own)")
    parser.add_argument("--image_column", default=None, help="non-Kaggle sources: the image column")
    parser.add_argument("--text_column", default=None, help="non-Kaggle sources: the caption column")
    parser.add_argument("--id_column", default=None, help="non-Kaggle sources: the numeric product id column")
    parser.add_argument("--rename_column", nargs="*", default=None,
                        help="non-Kaggle sources: source=kaggle pairs for attribute columns (category=articleType)")
    parser.add_argument("--k", type=int, default=defaults.k, help="results judged per query")
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size, help="images per captioning batch")
    parser.add_argument("--num_beams", type=int, default=defaults.num_beams, help="1 = greedy (deterministic)")
    parser.add_argument("--max_products", type=int, default=None, help="evaluate only the first N held-out products")
    parser.add_argument("--n_boot", type=int, default=defaults.n_boot,
                        help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--refine_queries", type=int, default=defaults.refine_queries,
                        help="held-out products whose results are also refined (+refine rows; 0 = none)")
    parser.add_argument("--rerank_k", type=int, default=rerank.k,
                        help="also rerank the model's captions and the names of the k visually nearest training "
                             "products (a 'reranked' column and metrics; 0 = off)")
    parser.add_argument("--rerank_beams", type=int, default=rerank.num_beams,
                        help="beam-search hypotheses added to the reranking pool (0 = the greedy caption only)")
    parser.add_argument("--rerank_visual_weight", type=float, default=rerank.visual_weight,
                        help="weight of a candidate's visual similarity against the model's log-likelihood")
    parser.add_argument("--rerank_length_weight", type=float, default=rerank.length_weight,
                        help="score bonus per word (likelihood alone prefers short captions)")
    parser.add_argument("--no_rerank_mirror", action="store_true",
                        help="score candidates on the image only, not also on its mirror image")
    parser.add_argument("--force", action="store_true",
                        help="recompute captions, embeddings, reranking and the refinement captions")
    parser.add_argument("--encoder_cache_mb", type=int, default=defaults.encoder_cache_mb,
                        help="memory for the encoder outputs of images met twice (a catalog photo embedded, then "
                             "captioned for refinement; a held-out photo captioned, then reranked); default: a "
                             "quarter of the free memory, at most 4096; 0 = none")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    rerank = RerankConfig(k=args.rerank_k, num_beams=args.rerank_beams, visual_weight=args.rerank_visual_weight,
                          length_weight=args.rerank_length_weight, mirror=not args.no_rerank_mirror)
    return EvalConfig(k=args.k, batch_size=args.batch_size, num_beams=args.num_beams, max_products=args.max_products,
                      n_boot=args.n_boot, refine_queries=args.refine_queries, rerank=rerank, force=args.force,
                      progress_bars=not args.quiet, encoder_cache_mb=args.encoder_cache_mb)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    given = (args.image_column, args.text_column, args.id_column, args.rename_column)
    columns = SourceColumns.parse(*given) if any(given) else None  # None: the columns the run was trained with
    rank, processes = process_count()
    if rank > 0:  # under accelerate launch / torchrun: caption and embed the main process's orders, write nothing
        serve(load_any_captioner(args.run))
        return Run(args.run).eval_dir
    try:
        return evaluate_run(Run(args.run), args.data_dir, config_from_args(args), columns=columns)
    finally:
        release()


def cli() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        main(sys.argv[1:])
    except RisError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
