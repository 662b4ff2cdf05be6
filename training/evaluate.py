"""Evaluate a run on its held-out products: caption metrics and query-strategy retrieval.

    python -m training.evaluate --run results/runs/reference-cpu --data_dir ../shared/data/fashion-product-images-small
    python -m training.evaluate --run results/runs/reference-cpu          # the data folder the run was trained on

Writes into <run>/eval/ (atomically): captions.csv, caption_metrics.json, retrieval.csv, retrieval.json.
Captions, embeddings, reranked captions and the captions of refined results already computed for the same
model and products are reused unless --force.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ris_core.captioner import embed_paths
from ris_core.data import DEFAULT_DATA_DIR, DataError, load_catalog
from ris_core.images import ImageError, open_image
from ris_core.metrics import caption_metrics, exact_match, last_words_match, sentence_bleu
from ris_core.modeling import CheckpointError
from ris_core.paper_notebook import load_any_captioner
from ris_core.refine import CaptionCache, refine
from ris_core.rerank import RerankConfig, rerank
from ris_core.retrieval import judge_rankings, paired_difference, summarize
from ris_core.runs import Run, RunError, write_csv_atomic, write_json_atomic
from ris_core.search import SearchResult, search_safely
from ris_core.search.catalog import CatalogIndex
from ris_core.search.image_knn import ImageKnnIndex
from ris_core.strategies import STRATEGIES

logger = logging.getLogger("training.evaluate")
PAIRED = ("last_two_words", "full_caption")  # the paper's claim, measured


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run folder (results/runs/<name>)")
    parser.add_argument("--data_dir", type=Path, default=None,
                        help="Kaggle-layout folder holding the held-out products (default: the run's own)")
    parser.add_argument("--k", type=int, default=10, help="results judged per query")
    parser.add_argument("--batch_size", type=int, default=64, help="images per captioning batch")
    parser.add_argument("--num_beams", type=int, default=1, help="1 = greedy (deterministic)")
    parser.add_argument("--max_products", type=int, default=None, help="evaluate only the first N held-out products")
    parser.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--refine_queries", type=int, default=500,
                        help="held-out products whose results are also refined (+refine rows; 0 = none)")
    defaults = RerankConfig()
    parser.add_argument("--rerank_k", type=int, default=defaults.k,
                        help="also rerank the model's captions and the names of the k visually nearest training "
                             "products (a 'reranked' column and metrics; 0 = off)")
    parser.add_argument("--rerank_beams", type=int, default=defaults.num_beams,
                        help="beam-search hypotheses added to the reranking pool (0 = the greedy caption only)")
    parser.add_argument("--rerank_visual_weight", type=float, default=defaults.visual_weight,
                        help="weight of a candidate's visual similarity against the model's log-likelihood")
    parser.add_argument("--rerank_length_weight", type=float, default=defaults.length_weight,
                        help="score bonus per word (likelihood alone prefers short captions)")
    parser.add_argument("--no_rerank_mirror", action="store_true",
                        help="score candidates on the image only, not also on its mirror image")
    parser.add_argument("--force", action="store_true",
                        help="recompute captions, embeddings, reranking and the refinement captions")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def _load_npy(path: Path) -> np.ndarray | None:
    """The array, or None when missing or torn (then it is recomputed)."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_digest(run: Run) -> str:
    weights = sorted([*run.model_dir.glob("*.safetensors"), *(run.path / "notebook").glob("*.safetensors")])
    return _digest([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights])


def resolve_data_dir(run: Run, data_dir: Path | None) -> Path:
    if data_dir is not None:
        return data_dir
    trained_on = run.info().get("data", {}).get("data_dir")
    if trained_on and Path(trained_on).is_dir():
        return Path(trained_on)
    return DEFAULT_DATA_DIR


def main(argv: list[str] | None = None) -> Path:
    # 1. The run, its held-out products, and the data folder holding their images
    args = parse_args(argv)
    run = Run(args.run)
    if not run.path.is_dir():
        raise RunError(f"{run.path} does not exist: pass a folder under results/runs/")
    if not run.has_checkpoint:
        raise RunError(f"{run.path} has no checkpoint (model/config.json): train it first, or pick another run")
    split = run.split()
    data_dir = resolve_data_dir(run, args.data_dir)
    catalog = load_catalog(data_dir)
    products = catalog.products
    val_ids = [i for i in split.val_ids if i in products.index]
    missing = len(split.val_ids) - len(val_ids)
    if not val_ids:
        raise DataError(f"none of the run's {len(split.val_ids):,} held-out products are in {data_dir}: "
                        "pass --data_dir with the folder the run was trained on")
    if missing:
        logger.warning("%d of %d held-out products are not in %s; evaluating the %d present",
                       missing, len(split.val_ids), data_dir, len(val_ids))
    val_ids = val_ids[: args.max_products]
    train_ids = [i for i in split.train_ids if i in products.index]
    captioner = load_any_captioner(run.path)  # before touching eval/: a corrupt checkpoint leaves no trace
    eval_dir = run.eval_dir
    eval_dir.mkdir(exist_ok=True)
    if args.force:
        (eval_dir / "refine_cache.sqlite").unlink(missing_ok=True)
    model_key = _model_digest(run)

    # 2. Caption every held-out image (reused when the same model already captioned the same products)
    captions_path = eval_dir / "captions.csv"
    val_key = _digest(model_key, str(data_dir.resolve()), val_ids, args.num_beams)
    state_path = eval_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    embeddings_path = eval_dir / "val_embeddings.npy"  # not committed (large): recomputed on a fresh clone
    if (not args.force and state.get("captions_key") == val_key and captions_path.is_file()
            and _load_npy(embeddings_path) is not None):
        logger.info("reusing %s", captions_path)
        kept_columns = ["id", "reference", "generated", "reranked"]  # the rest is recomputed below
        captions = pd.read_csv(captions_path, keep_default_na=False)
        captions = captions[[c for c in kept_columns if c in captions]]
        val_emb = _load_npy(embeddings_path)
        kept, skipped, loss_sum, tokens, rate = (captions["id"].tolist(), state["skipped"], state["loss_sum"],
                                                 state["tokens"], state["images_per_second"])
    else:
        names = products["productDisplayName"].to_dict()
        kept, generated, chunks, skipped, loss_sum, tokens = [], [], [], [], 0.0, 0
        started = time.perf_counter()
        for ids, batch, bad in captioner.caption_paths(
            [(i, catalog.image_path(i)) for i in val_ids], batch_size=args.batch_size, num_beams=args.num_beams,
            references={i: names[i] for i in val_ids}, progress=not args.quiet, desc="captioning held-out"
        ):
            kept += ids
            generated += batch.captions
            if ids:
                chunks.append(batch.embeddings)
            skipped += [pid for pid, _ in bad]
            loss_sum, tokens = loss_sum + batch.loss_sum, tokens + batch.tokens
        rate = len(kept) / max(time.perf_counter() - started, 1e-9)
        if not kept:
            raise DataError(f"no held-out image in {data_dir} could be decoded ({len(skipped)} skipped)")
        val_emb = np.concatenate(chunks).astype(np.float32)
        captions = pd.DataFrame({"id": kept, "reference": [names[i] for i in kept], "generated": generated})
        _save_npy_atomic(embeddings_path, val_emb)
        write_csv_atomic(captions_path, captions)
        write_json_atomic(state_path, {"captions_key": val_key, "skipped": skipped, "loss_sum": loss_sum,
                                       "tokens": tokens, "images_per_second": rate})
        state = json.loads(state_path.read_text())

    # 3. The visual index over training products (image kNN baseline and nearest-neighbour captions)
    knn_path = eval_dir / "catalog_knn"  # .npz (arrays) + .json (names, paths)
    knn_key = _digest(model_key, str(data_dir.resolve()), train_ids)
    if not args.force and state.get("knn_key") == knn_key and knn_path.with_suffix(".npz").is_file():
        knn = ImageKnnIndex.load(knn_path)
    else:
        ids, matrix, _ = embed_paths(captioner, [(i, catalog.image_path(i)) for i in train_ids],
                                     progress=not args.quiet, desc="embedding the training catalog")
        knn = ImageKnnIndex(ids=np.asarray(ids), vectors=matrix,
                            image_paths=[str(catalog.image_path(i)) for i in ids],
                            names=products.loc[ids, "productDisplayName"].tolist())
        knn.save(knn_path)
        state["knn_key"] = knn_key
        write_json_atomic(state_path, state)
    neighbours = [knn.search_vector(vec, k=args.k) for vec in val_emb]

    # 3b. Reranked captions: the best of the model's captions and the names of the visually nearest training
    # products (retrieval-augmented decoding, ris_core/rerank.py), scored beside greedy, never instead
    rerank_config = RerankConfig(k=args.rerank_k, num_beams=args.rerank_beams,
                                 visual_weight=args.rerank_visual_weight, length_weight=args.rerank_length_weight,
                                 mirror=not args.no_rerank_mirror)
    rerank_key = _digest(val_key, knn_key, sorted(asdict(rerank_config).items()))
    if args.rerank_k > 0 and captioner.can_rerank:
        if args.force or state.get("rerank_key") != rerank_key or "reranked" not in captions:
            captions["reranked"] = _reranked(captioner, catalog, captions, val_emb, knn, rerank_config, args.quiet)
            write_csv_atomic(captions_path, captions)
            state["rerank_key"] = rerank_key
            write_json_atomic(state_path, state)
    else:
        captions = captions.drop(columns="reranked", errors="ignore")

    # 4. Caption metrics, beside the nearest-neighbour-caption baseline
    nn_caption = [r.results[0].title if r.results else "" for r in neighbours]
    captions["nn_caption"] = nn_caption
    captions["sentence_bleu"] = [sentence_bleu(g, r) for g, r in zip(captions["generated"], captions["reference"])]
    pairs = list(zip(captions["generated"], captions["reference"]))
    captions["last_two_match"] = [last_words_match(g, r, 2) for g, r in pairs]
    captions["last_word_match"] = [last_words_match(g, r, 1) for g, r in pairs]
    captions["exact_match"] = [exact_match(g, r) for g, r in pairs]
    attributes = ["masterCategory", "articleType", "baseColour", "gender"]
    attrs = products.loc[captions["id"], attributes].reset_index(drop=True)
    captions = pd.concat([captions.reset_index(drop=True), attrs], axis=1)
    write_csv_atomic(captions_path, captions.round(4))
    metrics = {
        "run": run.name, "data_dir": str(data_dir), "n_scored": len(captions), "n_skipped": len(state["skipped"]),
        "n_missing_from_data_dir": missing, "num_beams": args.num_beams,
        "images_per_second": state["images_per_second"],
        "model": {**caption_metrics(captions["generated"].tolist(), captions["reference"].tolist()),
                  "loss": state["loss_sum"] / max(state["tokens"], 1),
                  "perplexity": math.exp(state["loss_sum"] / max(state["tokens"], 1))},
        "nn_caption_baseline": caption_metrics(nn_caption, captions["reference"].tolist()),
        **({"reranked": {**caption_metrics(captions["reranked"].tolist(), captions["reference"].tolist()),
                         **asdict(rerank_config)}} if "reranked" in captions else {}),
        "catalog_size": len(knn.ids),
    }
    write_json_atomic(eval_dir / "caption_metrics.json", metrics)

    # 5. Every strategy's query against the catalog of training products; oracle and image kNN beside them
    train_products = products.loc[knn.ids.tolist()]
    index = CatalogIndex.build(train_products, catalog.image_dir)
    jobs = [("caption", name, fn, captions["generated"]) for name, fn in STRATEGIES.items()]
    jobs += [("oracle", f"oracle:{name}", fn, captions["reference"]) for name, fn in STRATEGIES.items()]
    if "reranked" in captions:
        jobs += [("reranked", f"reranked:{name}", fn, captions["reranked"]) for name, fn in STRATEGIES.items()]
    frames, hits_of = [], {}
    query_ids = captions["id"].tolist()
    for source, name, fn, texts in tqdm(jobs, desc="searching", unit="strategy", disable=args.quiet):
        queries = [fn(t) for t in texts]
        hits = [[r.product_id for r in search_safely(index, q, k=args.k).results] for q in queries]
        frames.append(_per_query(source, name, queries, hits, query_ids, products, train_products))
        hits_of[name] = hits
    hits_of["image_knn"] = [[r.product_id for r in resp.results] for resp in neighbours]
    frames.append(_per_query("visual", "image_knn", [""] * len(query_ids), hits_of["image_knn"], query_ids,
                             products, train_products))

    # 6. Result refinement (paper IV-B) on a seeded subset: re-rank each strategy's hits by agreement
    if args.refine_queries > 0:
        frames += _refined(captioner, catalog, captions, val_emb, hits_of, args, products, train_products,
                           eval_dir / "refine_cache.sqlite", model_key)
    per_query = pd.concat(frames, ignore_index=True)
    write_csv_atomic(eval_dir / "retrieval.csv", per_query.round(4))
    summary = {
        "run": run.name, "k": args.k, "n_queries": len(captions), "catalog": "training products of " + str(data_dir),
        "catalog_size": len(index), "n_boot": args.n_boot,
        "rows": summarize(per_query, n_boot=args.n_boot),
        "paired": [paired_difference(per_query, *PAIRED, n_boot=args.n_boot),
                   paired_difference(per_query, "last_two_words", "image_knn", n_boot=args.n_boot)]
        + [paired_difference(per_query, name, name.removesuffix("+refine"), n_boot=args.n_boot)
           for name in per_query["strategy"].unique() if name.endswith("+refine")]
        + ([paired_difference(per_query, "reranked:last_two_words", "last_two_words", n_boot=args.n_boot)]
           if "reranked" in captions else []),
    }
    write_json_atomic(eval_dir / "retrieval.json", summary)
    for name in ("model", "reranked"):
        if name in metrics:
            logger.info("%s: BLEU-4 %.1f, last-two match %.3f", "greedy" if name == "model" else name,
                        metrics[name]["bleu_4"], metrics[name]["last_two_match"])
    logger.info("wrote %s", eval_dir)
    return eval_dir


def _reranked(captioner, catalog, captions: pd.DataFrame, val_emb: np.ndarray, knn: ImageKnnIndex,
              config: RerankConfig, quiet: bool, batch_size: int = 16) -> list[str]:
    """Per held-out product, the best-scored candidate (the greedy caption if its image fails to decode)."""
    out: list[str] = []
    for start in tqdm(range(0, len(captions), batch_size), desc="reranking captions", unit="batch",
                      disable=quiet):
        rows = list(range(start, min(start + batch_size, len(captions))))
        images, readable = [], []
        for row in rows:
            try:
                images.append(open_image(catalog.image_path(int(captions["id"].iloc[row]))))
                readable.append(row)
            except ImageError:
                continue
        greedy = [captions["generated"].iloc[row] for row in readable]
        neighbours = [[(hit.title, hit.score) for hit in knn.search_vector(val_emb[row], k=config.k).results]
                      for row in readable]
        ranked = rerank(captioner, images, greedy, neighbours, config) if images else []
        best = {row: pool[0].text for row, pool in zip(readable, ranked) if pool}
        out += [best.get(row, captions["generated"].iloc[row]) for row in rows]
    return out


def _refined(captioner, catalog, captions: pd.DataFrame, val_emb: np.ndarray, hits_of: dict[str, list[list[int]]],
             args: argparse.Namespace, products: pd.DataFrame, train_products: pd.DataFrame,
             refine_cache_path: Path, model_key: str) -> list[pd.DataFrame]:
    """`<strategy>+refine` rows for a seeded subset of queries; every result image is captioned once."""
    rng = np.random.default_rng(0)
    rows = np.sort(rng.permutation(len(captions))[: args.refine_queries])
    strategies = [name for name in hits_of if not name.startswith(("oracle:", "reranked:"))]
    needed = sorted({pid for name in strategies for row in rows for pid in hits_of[name][row]})
    digests = {pid: hashlib.sha256(catalog.image_path(pid).read_bytes()).hexdigest() for pid in needed}
    cache = CaptionCache(refine_cache_path, model_key=model_key)  # a re-run captions only what is new
    missing = [(pid, catalog.image_path(pid)) for pid in needed if cache.get(digests[pid]) is None]
    batches = captioner.caption_paths(missing, batch_size=args.batch_size, progress=not args.quiet,
                                      desc="captioning results for refinement") if missing else []
    for ids, batch, _ in batches:
        cache.put_many([(digests[pid], caption, embedding)
                        for pid, caption, embedding in zip(ids, batch.captions, batch.embeddings)])
    frames = []
    query_ids = [int(captions["id"].iloc[r]) for r in rows]
    for name in strategies:
        refined = []
        for row in rows:
            results = [SearchResult(rank=rank, title="", image=str(catalog.image_path(pid)), product_id=pid)
                       for rank, pid in enumerate(hits_of[name][row], start=1)]
            outcome = refine(captioner, captions["generated"].iloc[row], val_emb[row], results, cache=cache)
            refined.append([r.result.product_id for r in outcome.ranked])
        frames.append(_per_query("refine", f"{name}+refine", [""] * len(rows), refined, query_ids, products,
                                 train_products))
    return frames


def _per_query(source: str, strategy: str, queries: list[str], hits: list[list[int]], ids: list[int],
               products: pd.DataFrame, catalog: pd.DataFrame) -> pd.DataFrame:
    judged = judge_rankings(hits, ids, products, catalog).reset_index()
    judged.insert(1, "source", source)
    judged.insert(2, "strategy", strategy)
    judged.insert(3, "query", queries)
    judged.insert(4, "hits", [" ".join(map(str, h)) for h in hits])
    return judged


def cli() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        main(sys.argv[1:])
    except (DataError, RunError, CheckpointError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
