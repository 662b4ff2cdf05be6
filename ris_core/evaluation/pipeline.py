"""Evaluate a run on its held-out products: caption metrics and query-strategy retrieval.

    from ris_core.evaluation.pipeline import EvalConfig, evaluate_run
    evaluate_run(Run("results/runs/reference-cpu"), data_dir, EvalConfig(refine_queries=0), progress=hook)

Computes into <run>/eval.partial/ and swaps the finished set in as <run>/eval/ (`files.publish`), so readers see
the old evaluation or the new one, never a mix; one evaluation of a run at a time (`<run>/.eval.lock`, else
`Busy`). Names of the files in `ris_core.evaluation.files`. Captions, embeddings, reranked
captions and the captions of refined results already computed for the same model and products are reused
unless `config.force`. `progress(stage, done, total)` is called as each stage advances (a CLI passes None and
gets tqdm bars; the dashboard passes a Streamlit progress bar).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ris_core.captioner import ImageCaptioner, ProgressHook, load_any_captioner
from ris_core.data import DEFAULT_DATA_DIR, Catalog, load_catalog
from ris_core.errors import DataError, ImageError, RunError
from ris_core.evaluation import files
from ris_core.files import digest, file_sha256, load_npy, save_npy_atomic, write_csv_atomic, write_json_atomic
from ris_core.images import open_image
from ris_core.jobs import exclusive
from ris_core.metrics import caption_metrics, exact_match, last_words_match, sentence_bleu
from ris_core.refine import CaptionCache, refine
from ris_core.rerank import RerankConfig, rerank
from ris_core.retrieval import judge_rankings, paired_difference, summarize
from ris_core.runs import Run
from ris_core.schema import problems
from ris_core.search import SearchResult, search_safely
from ris_core.search.catalog import CatalogIndex
from ris_core.search.image_knn import ImageKnnIndex
from ris_core.strategies import STRATEGIES

logger = logging.getLogger(__name__)
PAIRED = ("last_two_words", "full_caption")  # the paper's claim, measured
EVAL_LOCK = ".eval.lock"  # inside the run folder: held while an evaluation of that run is running
ATTRIBUTES = ["masterCategory", "articleType", "baseColour", "gender"]  # copied into captions.csv
T = TypeVar("T")


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate; every field but the last two changes what is computed (and keys the reuse)."""

    k: int = 10  # results judged per query
    batch_size: int = 64  # images per captioning batch
    num_beams: int = 1  # 1 = greedy (deterministic)
    max_products: int | None = None  # evaluate only the first N held-out products
    n_boot: int = 1000  # bootstrap resamples for the 95% intervals
    refine_queries: int = 500  # held-out products whose results are also refined (+refine rows; 0 = none)
    rerank: RerankConfig = field(default_factory=RerankConfig)  # k = 0: no reranked captions
    force: bool = False  # recompute captions, embeddings, reranking and refinement captions
    progress_bars: bool = True  # tqdm bars on stderr


@dataclass
class _Context:
    """What every step of one evaluation reads: the run, its products, the config and the reuse state."""

    run: Run
    work_dir: Path  # eval.partial/: everything is written here, then swapped in as eval/
    data_dir: Path
    catalog: Catalog
    config: EvalConfig
    captioner: ImageCaptioner
    model_key: str
    progress: ProgressHook | None
    state: dict = field(default_factory=dict)

    @property
    def products(self) -> pd.DataFrame:
        return self.catalog.products

    def path(self, name: str) -> Path:
        return self.work_dir / name

    def save_state(self) -> None:
        write_json_atomic(self.path(files.STATE), self.state)

    def steps(self, items: Iterable[T], desc: str, total: int, unit: str = "it") -> Iterator[T]:
        """Iterate with a tqdm bar (CLI) and the progress hook (pages)."""
        bar = tqdm(items, desc=desc, total=total, unit=unit, disable=not self.config.progress_bars, mininterval=2)
        for done, item in enumerate(bar, start=1):
            yield item
            if self.progress is not None:
                self.progress(desc, done, total)


def resolve_data_dir(run: Run, data_dir: Path | None) -> Path:
    """The data folder to evaluate on: the one given, else the run's own, else the bundled demo catalog."""
    if data_dir is not None:
        return Path(data_dir)
    trained_on = run.info().get("data", {}).get("data_dir")
    if trained_on and Path(trained_on).is_dir():
        return Path(trained_on)
    return DEFAULT_DATA_DIR


def model_digest(run: Run) -> str:
    """Names, sizes and modification times of the run's weights: changes when the model does."""
    weights = sorted([*run.model_dir.glob("*.safetensors"), *(run.path / "notebook").glob("*.safetensors")])
    return digest([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights])


def evaluate_run(run: Run | str | Path, data_dir: Path | None = None, config: EvalConfig | None = None,
                 progress: ProgressHook | None = None) -> Path:
    """Evaluate `run` on its held-out products found in `data_dir`; returns the eval/ folder."""
    run = run if isinstance(run, Run) else Run(Path(run))
    config = config or EvalConfig()
    # 1. The run, its held-out products, and the data folder holding their images
    if not run.path.is_dir():
        raise RunError(f"{run.path} does not exist: pass a folder under results/runs/")
    if not run.has_checkpoint:
        raise RunError(f"{run.path} has no checkpoint (model/config.json): train it first, or pick another run")
    why = run.problem()  # a malformed run.json, history.csv or split.json: one clear line, nothing written
    if why:
        raise RunError(why)
    split = run.split()
    data_dir = resolve_data_dir(run, data_dir)
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
    val_ids = val_ids[: config.max_products]
    train_ids = [i for i in split.train_ids if i in products.index]
    captioner = load_any_captioner(run.path)  # before touching eval/: a corrupt checkpoint leaves no trace
    with exclusive(run.path / EVAL_LOCK, f"an evaluation of {run.name}"):
        work = files.open_workspace(run.eval_dir)
        ctx = _Context(run=run, work_dir=work, data_dir=data_dir, catalog=catalog, config=config,
                       captioner=captioner, model_key=model_digest(run), progress=progress)
        if config.force:
            ctx.path(files.REFINE_CACHE).unlink(missing_ok=True)
        ctx.state = _read_state(ctx.path(files.STATE))
        metrics = _evaluate(ctx, val_ids, train_ids, missing)
        files.publish(work, run.eval_dir)
    for name in ("model", "reranked"):
        if name in metrics:
            logger.info("%s: BLEU-4 %.1f, last-two match %.3f", "greedy" if name == "model" else name,
                        metrics[name]["bleu_4"], metrics[name]["last_two_match"])
    logger.info("wrote %s", run.eval_dir)
    return run.eval_dir


def _read_state(path: Path) -> dict:
    """What an earlier evaluation computed (its keys); a missing, torn or foreign state.json means nothing."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError):
        logger.warning("ignoring the unreadable %s: everything is computed again", path.name)
        return {}
    wanted = {"captions_key": str, "knn_key": str, "rerank_key": str, "skipped": list, "loss_sum": float,
              "tokens": int, "images_per_second": float}
    if problems(state, wanted) or not {"captions_key", "skipped", "loss_sum", "tokens"} <= set(state):
        logger.warning("ignoring the malformed %s: everything is computed again", path.name)
        return {}
    return state


def _evaluate(ctx: _Context, val_ids: list[int], train_ids: list[int], missing: int) -> dict:
    """Steps 2-6 into the workspace; returns caption_metrics.json's content."""
    config, products, catalog = ctx.config, ctx.products, ctx.catalog
    # 2. Caption every held-out image (reused when the same model already captioned the same products)
    captions, val_emb, val_key = _caption_held_out(ctx, val_ids)
    # 3. The visual index over training products (image kNN baseline and nearest-neighbour captions)
    knn, knn_key = _catalog_knn(ctx, train_ids)
    neighbours = [knn.search_vector(vec, k=config.k) for vec in val_emb]
    # 3b. Reranked captions: the best of the model's captions and the names of the visually nearest training
    # products (retrieval-augmented decoding, ris_core/rerank.py), scored beside greedy, never instead
    captions = _rerank_held_out(ctx, captions, val_emb, knn, rerank_key=digest(
        val_key, knn_key, sorted(asdict(config.rerank).items())))
    # 4. Caption metrics, beside the nearest-neighbour-caption baseline
    captions, metrics = _caption_metrics(ctx, captions, neighbours, missing, catalog_size=len(knn.ids))
    write_json_atomic(ctx.path(files.CAPTION_METRICS), metrics)
    # 5. Every strategy's query against the catalog of training products; oracle and image kNN beside them
    train_products = products.loc[knn.ids.tolist()]
    index = CatalogIndex.build(train_products, catalog.image_dir)
    frames, hits_of = _search_strategies(ctx, captions, index, train_products)
    hits_of["image_knn"] = [[r.product_id for r in resp.results] for resp in neighbours]
    query_ids = captions["id"].tolist()
    frames.append(_per_query("visual", "image_knn", [""] * len(query_ids), hits_of["image_knn"], query_ids,
                             products, train_products))
    # 6. Result refinement (paper IV-B) on a seeded subset: re-rank each strategy's hits by agreement
    if config.refine_queries > 0:
        frames += _refined(ctx, captions, val_emb, hits_of, train_products)
    per_query = pd.concat(frames, ignore_index=True)
    write_csv_atomic(ctx.path(files.RETRIEVAL), per_query.round(4))
    summary = _retrieval_summary(ctx, per_query, n_queries=len(captions), catalog_size=len(index),
                                 reranked="reranked" in captions)
    write_json_atomic(ctx.path(files.RETRIEVAL_SUMMARY), summary)
    return metrics


def _caption_held_out(ctx: _Context, val_ids: list[int]) -> tuple[pd.DataFrame, np.ndarray, str]:
    """(captions: id, reference, generated[, reranked]; pooled embeddings; the key they were computed under)."""
    config, state = ctx.config, ctx.state
    captions_path, embeddings_path = ctx.path(files.CAPTIONS), ctx.path(files.VAL_EMBEDDINGS)
    val_key = digest(ctx.model_key, str(ctx.data_dir.resolve()), val_ids, config.num_beams)
    if (not config.force and state.get("captions_key") == val_key and captions_path.is_file()
            and load_npy(embeddings_path) is not None):
        logger.info("reusing %s", captions_path)
        kept_columns = ["id", "reference", "generated", "reranked"]  # the rest is recomputed below
        captions = pd.read_csv(captions_path, keep_default_na=False)
        return captions[[c for c in kept_columns if c in captions]], load_npy(embeddings_path), val_key
    names = ctx.products["productDisplayName"].to_dict()
    kept, generated, chunks, skipped, loss_sum, tokens = [], [], [], [], 0.0, 0
    started = time.perf_counter()
    for ids, batch, bad in ctx.captioner.caption_paths(
        [(i, ctx.catalog.image_path(i)) for i in val_ids], batch_size=config.batch_size, num_beams=config.num_beams,
        references={i: names[i] for i in val_ids}, progress=config.progress_bars, desc="captioning held-out",
        hook=ctx.progress,
    ):
        kept += ids
        generated += batch.captions
        if ids:
            chunks.append(batch.embeddings)
        skipped += [pid for pid, _ in bad]
        loss_sum, tokens = loss_sum + batch.loss_sum, tokens + batch.tokens
    rate = len(kept) / max(time.perf_counter() - started, 1e-9)
    if not kept:
        raise DataError(f"no held-out image in {ctx.data_dir} could be decoded ({len(skipped)} skipped)")
    val_emb = np.concatenate(chunks).astype(np.float32)
    captions = pd.DataFrame({"id": kept, "reference": [names[i] for i in kept], "generated": generated})
    save_npy_atomic(embeddings_path, val_emb)
    write_csv_atomic(captions_path, captions)
    ctx.state = {"captions_key": val_key, "skipped": skipped, "loss_sum": loss_sum, "tokens": tokens,
                 "images_per_second": rate}
    ctx.save_state()
    ctx.state = json.loads(ctx.path(files.STATE).read_text())  # exactly what a re-run will read
    return captions, val_emb, val_key


def _catalog_knn(ctx: _Context, train_ids: list[int]) -> tuple[ImageKnnIndex, str]:
    knn_path = ctx.path(files.CATALOG_KNN)
    knn_key = digest(ctx.model_key, str(ctx.data_dir.resolve()), train_ids)
    if not ctx.config.force and ctx.state.get("knn_key") == knn_key and knn_path.with_suffix(".npz").is_file():
        return ImageKnnIndex.load(knn_path), knn_key
    ids, matrix, _ = ctx.captioner.embed_paths([(i, ctx.catalog.image_path(i)) for i in train_ids],
                                               progress=ctx.config.progress_bars,
                                               desc="embedding the training catalog", hook=ctx.progress)
    knn = ImageKnnIndex(ids=np.asarray(ids), vectors=matrix,
                        image_paths=[str(ctx.catalog.image_path(i)) for i in ids],
                        names=ctx.products.loc[ids, "productDisplayName"].tolist())
    knn.save(knn_path)
    ctx.state["knn_key"] = knn_key
    ctx.save_state()
    return knn, knn_key


def _rerank_held_out(ctx: _Context, captions: pd.DataFrame, val_emb: np.ndarray, knn: ImageKnnIndex,
                     rerank_key: str) -> pd.DataFrame:
    """Captions with a `reranked` column when the config and the captioner allow it, else without one."""
    config = ctx.config.rerank
    if config.k <= 0 or not ctx.captioner.can_rerank:
        return captions.drop(columns="reranked", errors="ignore")
    if ctx.config.force or ctx.state.get("rerank_key") != rerank_key or "reranked" not in captions:
        captions["reranked"] = _reranked(ctx, captions, val_emb, knn)
        write_csv_atomic(ctx.path(files.CAPTIONS), captions)
        ctx.state["rerank_key"] = rerank_key
        ctx.save_state()
    return captions


def _reranked(ctx: _Context, captions: pd.DataFrame, val_emb: np.ndarray, knn: ImageKnnIndex,
              batch_size: int = 16) -> list[str]:
    """Per held-out product, the best-scored candidate (the greedy caption if its image fails to decode)."""
    config = ctx.config.rerank
    out: list[str] = []
    starts = range(0, len(captions), batch_size)
    for start in ctx.steps(starts, "reranking captions", total=len(starts), unit="batch"):
        rows = list(range(start, min(start + batch_size, len(captions))))
        images, readable = [], []
        for row in rows:
            try:
                images.append(open_image(ctx.catalog.image_path(int(captions["id"].iloc[row]))))
                readable.append(row)
            except ImageError:
                continue
        greedy = [captions["generated"].iloc[row] for row in readable]
        neighbours = [[(hit.title, hit.score) for hit in knn.search_vector(val_emb[row], k=config.k).results]
                      for row in readable]
        ranked = rerank(ctx.captioner, images, greedy, neighbours, config) if images else []
        best = {row: pool[0].text for row, pool in zip(readable, ranked) if pool}
        out += [best.get(row, captions["generated"].iloc[row]) for row in rows]
    return out


def _caption_metrics(ctx: _Context, captions: pd.DataFrame, neighbours: list, missing: int,
                     catalog_size: int) -> tuple[pd.DataFrame, dict]:
    """captions.csv with per-caption scores and attributes (written), and caption_metrics.json's content."""
    state, config = ctx.state, ctx.config
    nn_caption = [r.results[0].title if r.results else "" for r in neighbours]
    captions["nn_caption"] = nn_caption
    captions["sentence_bleu"] = [sentence_bleu(g, r) for g, r in zip(captions["generated"], captions["reference"])]
    pairs = list(zip(captions["generated"], captions["reference"]))
    captions["last_two_match"] = [last_words_match(g, r, 2) for g, r in pairs]
    captions["last_word_match"] = [last_words_match(g, r, 1) for g, r in pairs]
    captions["exact_match"] = [exact_match(g, r) for g, r in pairs]
    attrs = ctx.products.loc[captions["id"], ATTRIBUTES].reset_index(drop=True)
    captions = pd.concat([captions.reset_index(drop=True), attrs], axis=1)
    write_csv_atomic(ctx.path(files.CAPTIONS), captions.round(4))
    references = captions["reference"].tolist()
    loss = state["loss_sum"] / max(state["tokens"], 1)
    metrics = {
        "run": ctx.run.name, "data_dir": str(ctx.data_dir), "n_scored": len(captions),
        "n_skipped": len(state["skipped"]), "n_missing_from_data_dir": missing, "num_beams": config.num_beams,
        "images_per_second": state["images_per_second"],
        "model": {**caption_metrics(captions["generated"].tolist(), references), "loss": loss,
                  "perplexity": math.exp(loss)},
        "nn_caption_baseline": caption_metrics(nn_caption, references),
        **({"reranked": {**caption_metrics(captions["reranked"].tolist(), references), **asdict(config.rerank)}}
           if "reranked" in captions else {}),
        "catalog_size": catalog_size,
    }
    return captions, metrics


def _search_strategies(ctx: _Context, captions: pd.DataFrame, index: CatalogIndex,
                       train_products: pd.DataFrame) -> tuple[list[pd.DataFrame], dict[str, list[list[int]]]]:
    jobs = [("caption", name, fn, captions["generated"]) for name, fn in STRATEGIES.items()]
    jobs += [("oracle", f"oracle:{name}", fn, captions["reference"]) for name, fn in STRATEGIES.items()]
    if "reranked" in captions:
        jobs += [("reranked", f"reranked:{name}", fn, captions["reranked"]) for name, fn in STRATEGIES.items()]
    frames, hits_of = [], {}
    query_ids = captions["id"].tolist()
    for source, name, fn, texts in ctx.steps(jobs, "searching", total=len(jobs), unit="strategy"):
        queries = [fn(t) for t in texts]
        hits = [[r.product_id for r in search_safely(index, q, k=ctx.config.k).results] for q in queries]
        frames.append(_per_query(source, name, queries, hits, query_ids, ctx.products, train_products))
        hits_of[name] = hits
    return frames, hits_of


def _refined(ctx: _Context, captions: pd.DataFrame, val_emb: np.ndarray, hits_of: dict[str, list[list[int]]],
             train_products: pd.DataFrame) -> list[pd.DataFrame]:
    """`<strategy>+refine` rows for a seeded subset of queries; every result image is captioned once."""
    rng = np.random.default_rng(0)
    rows = np.sort(rng.permutation(len(captions))[: ctx.config.refine_queries])
    strategies = [name for name in hits_of if not name.startswith(("oracle:", "reranked:"))]
    needed = sorted({pid for name in strategies for row in rows for pid in hits_of[name][row]})
    digests = {pid: file_sha256(ctx.catalog.image_path(pid)) for pid in needed}
    cache = CaptionCache(ctx.path(files.REFINE_CACHE), model_key=ctx.model_key)  # a re-run captions what is new
    missing = [(pid, ctx.catalog.image_path(pid)) for pid in needed if cache.get(digests[pid]) is None]
    batches = ctx.captioner.caption_paths(missing, batch_size=ctx.config.batch_size,
                                          progress=ctx.config.progress_bars,
                                          desc="captioning results for refinement", hook=ctx.progress
                                          ) if missing else []
    for ids, batch, _ in batches:
        cache.put_many([(digests[pid], caption, embedding)
                        for pid, caption, embedding in zip(ids, batch.captions, batch.embeddings)])
    frames = []
    query_ids = [int(captions["id"].iloc[r]) for r in rows]
    for name in ctx.steps(strategies, "refining", total=len(strategies), unit="strategy"):
        refined = []
        for row in rows:
            results = [SearchResult(rank=rank, title="", image=str(ctx.catalog.image_path(pid)), product_id=pid)
                       for rank, pid in enumerate(hits_of[name][row], start=1)]
            outcome = refine(ctx.captioner, captions["generated"].iloc[row], val_emb[row], results, cache=cache)
            refined.append([r.result.product_id for r in outcome.ranked])
        frames.append(_per_query("refine", f"{name}+refine", [""] * len(rows), refined, query_ids, ctx.products,
                                 train_products))
    return frames


def _retrieval_summary(ctx: _Context, per_query: pd.DataFrame, n_queries: int, catalog_size: int,
                       reranked: bool) -> dict:
    n_boot = ctx.config.n_boot
    refined = [name for name in per_query["strategy"].unique() if name.endswith("+refine")]
    return {
        "run": ctx.run.name, "k": ctx.config.k, "n_queries": n_queries,
        "catalog": "training products of " + str(ctx.data_dir), "catalog_size": catalog_size, "n_boot": n_boot,
        "rows": summarize(per_query, n_boot=n_boot),
        "paired": [paired_difference(per_query, *PAIRED, n_boot=n_boot),
                   paired_difference(per_query, "last_two_words", "image_knn", n_boot=n_boot)]
        + [paired_difference(per_query, name, name.removesuffix("+refine"), n_boot=n_boot) for name in refined]
        + ([paired_difference(per_query, "reranked:last_two_words", "last_two_words", n_boot=n_boot)]
           if reranked else []),
    }


def _per_query(source: str, strategy: str, queries: list[str], hits: list[list[int]], ids: list[int],
               products: pd.DataFrame, catalog: pd.DataFrame) -> pd.DataFrame:
    judged = judge_rankings(hits, ids, products, catalog).reset_index()
    judged.insert(1, "source", source)
    judged.insert(2, "strategy", strategy)
    judged.insert(3, "query", queries)
    judged.insert(4, "hits", [" ".join(map(str, h)) for h in hits])
    return judged
