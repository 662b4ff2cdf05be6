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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ris_core.captioner import ImageCaptioner, ProgressHook, load_any_captioner
from ris_core.contrastive import ContrastiveConfig, load_contrastive, save_contrastive, train_contrastive
from ris_core.data import DEFAULT_DATA_DIR, Catalog, load_catalog
from ris_core.dataset_sources import HUB_ID, SourceColumns
from ris_core.encoding_cache import EncodingCache, default_budget_mb
from ris_core.errors import DataError, ImageError, RunError
from ris_core.evaluation import baselines, files, shared, verdict
from ris_core.evaluation.rankings_cache import RankingsCache
from ris_core.files import digest, file_sha256, load_npy, save_npy_atomic, write_csv_atomic, write_json_atomic
from ris_core.images import SHRINK_NAME, open_image
from ris_core.jobs import exclusive
from ris_core.metrics import caption_metrics, cider_d, exact_match, last_words_match, rouge_l, sentence_bleu
from ris_core.refine import CaptionCache, refine
from ris_core.rerank import RerankConfig, rerank
from ris_core.retrieval import judge_rankings, paired_difference
from ris_core.runs import Run
from ris_core.schema import problems
from ris_core.search import SearchResult, bm25
from ris_core.search.catalog import FIELDS, CatalogIndex
from ris_core.search.image_knn import ImageKnnIndex
from ris_core.sentence_encoder import EncoderUnavailable, SentenceEncoder, cosine_rows, text_vectors
from ris_core.sharding import ShardedCaptioner, process_count
from ris_core.strategies import STRATEGIES

logger = logging.getLogger(__name__)
PAIRED = ("last_two_words", "full_caption")  # the paper's claim, measured
VISUAL = "image_knn:encoder"  # the captioner encoder's own features (called `image_knn` before the verdict rows)
EVAL_LOCK = ".eval.lock"  # inside the run folder: held while an evaluation of that run is running
ATTRIBUTES = ["masterCategory", "articleType", "baseColour", "gender"]  # copied into captions.csv
T = TypeVar("T")


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate; every field but `force`, `progress_bars`, `encoder_cache_mb` and `shared_dir` changes what
    is computed (and keys the reuse)."""

    k: int = 10  # results judged per query
    batch_size: int = 64  # images per captioning batch
    num_beams: int = 1  # 1 = greedy (deterministic)
    max_products: int | None = None  # evaluate only the first N held-out products
    n_boot: int = 1000  # bootstrap resamples for the 95% intervals
    refine_queries: int = 500  # held-out products whose results are also refined (+refine rows; 0 = none)
    rerank: RerankConfig = field(default_factory=RerankConfig)  # k = 0: no reranked captions
    force: bool = False  # recompute captions, embeddings, reranking and refinement captions
    progress_bars: bool = True  # tqdm bars on stderr
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)  # the CLIP-style visual baseline
    hybrids: bool = True  # caption + image fusion rows (rrf: and hybrid:)
    # encoder outputs kept for images met again (ris_core/encoding_cache.py): a quarter of the free memory, at most
    # 4 GB; 0 = none
    encoder_cache_mb: int = field(default_factory=default_budget_mb)
    # where files that other runs' evaluations can reuse are kept (ris_core/evaluation/shared.py); None = nowhere
    shared_dir: Path | None = field(default_factory=shared.default_folder)


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
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, written to timings.json
    rankings: RankingsCache | None = None  # rankings of earlier runs, by what they were computed from

    def ranked(self, key: str, compute) -> tuple[list[list[int]], list[list[float]] | None]:
        """(rankings, scores or None) of `key`: read back when an earlier evaluation computed them, else computed."""
        found = None if self.config.force or self.rankings is None else self.rankings.get(key)
        if found is None:
            found = compute()
            if self.rankings is not None:
                self.rankings.put(key, *found)
        return found

    @property
    def products(self) -> pd.DataFrame:
        return self.catalog.products

    def path(self, name: str) -> Path:
        return self.work_dir / name

    def save_state(self) -> None:
        write_json_atomic(self.path(files.STATE), self.state)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - started, 2)

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
    if trained_on and (Path(trained_on).exists() or HUB_ID.match(trained_on)):  # a folder, a parquet, a Hub id
        return Path(trained_on)
    return DEFAULT_DATA_DIR


def model_digest(run: Run) -> str:
    """Names, sizes and modification times of the run's weights: changes when the model does."""
    weights = sorted([*run.model_dir.glob("*.safetensors"), *(run.path / "notebook").glob("*.safetensors")])
    return digest([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights])


def evaluate_run(run: Run | str | Path, data_dir: Path | None = None, config: EvalConfig | None = None,
                 progress: ProgressHook | None = None, columns: SourceColumns | None = None) -> Path:
    """Evaluate `run` on its held-out products found in `data_dir` (any source `load_catalog` reads, with
    `columns` saying which column is which: default, those the run was trained with); returns the eval/ folder."""
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
    if columns is None and isinstance(recorded := run.info().get("data", {}).get("columns"), dict):
        columns = SourceColumns(**{k: v for k, v in recorded.items() if k in SourceColumns.__dataclass_fields__})
    catalog = load_catalog(data_dir, columns=columns)
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
    with exclusive(run.path / EVAL_LOCK, f"an evaluation of {run.name}"):
        captioner = load_any_captioner(run.path)  # before touching eval/: a corrupt checkpoint leaves no trace
        if process_count()[1] > 1:  # under a launcher: image batches shared with the other processes
            captioner = ShardedCaptioner(captioner)
        elif hasattr(captioner, "encodings") and config.encoder_cache_mb > 0:
            # a catalog photo embedded for the visual index is captioned again when refined, a held-out photo
            # captioned is encoded again when reranked: the second time costs no encoder pass
            captioner.encodings = EncodingCache(config.encoder_cache_mb << 20)
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
              "tokens": int, "images_per_second": float, "other_losses": dict}
    if problems(state, wanted) or not {"captions_key", "skipped", "loss_sum", "tokens"} <= set(state):
        logger.warning("ignoring the malformed %s: everything is computed again", path.name)
        return {}
    return state


def _evaluate(ctx: _Context, val_ids: list[int], train_ids: list[int], missing: int) -> dict:
    """Steps 2-6 into the workspace; returns caption_metrics.json's content."""
    config, products, catalog = ctx.config, ctx.products, ctx.catalog
    started = time.perf_counter()
    ctx.rankings = RankingsCache.open(ctx.path(files.RANKINGS_CACHE))
    # 2. Caption every held-out image (reused when the same model already captioned the same products)
    with ctx.timed("captioning held-out"):
        captions, val_emb, val_key = _caption_held_out(ctx, val_ids)
    # 3. The visual index over training products (image kNN baseline and nearest-neighbour captions)
    with ctx.timed("embedding the training catalog"):
        knn, knn_key = _catalog_knn(ctx, train_ids)
        nn_captions = _nearest_names(ctx, knn, val_emb, digest("neighbours", knn_key, val_key, config.k))
    # 3b. Reranked captions: the best of the model's captions and the names of the visually nearest training
    # products (retrieval-augmented decoding, ris_core/rerank.py), scored beside greedy, never instead
    with ctx.timed("reranking"):
        captions = _rerank_held_out(ctx, captions, val_emb, knn, rerank_key=digest(
            val_key, knn_key, sorted(asdict(config.rerank).items())))
    # 4. Caption metrics, beside the nearest-neighbour-caption baseline, for all, seen and novel products
    with ctx.timed("caption metrics"):
        train_names = products.loc[knn.ids, "productDisplayName"].tolist()
        captions["seen"] = verdict.seen_flags(captions["reference"], train_names)
        encoder = _sentence_encoder()
        # the catalog names' embeddings, which the contrastive baseline needs too, first: most captions are names
        name_vectors = _name_embeddings(ctx, train_names, encoder) if _contrastive_on(ctx, encoder) else None
        known = dict(zip(train_names, name_vectors)) if name_vectors is not None else None
        captions, metrics = _scored_captions(ctx, captions, nn_captions, missing, catalog_size=len(knn.ids),
                                             encoder=encoder, known_vectors=known)
    # 5. Every strategy's query against the catalog of training products; oracle and image kNN beside them
    with ctx.timed("searching the strategies"):
        train_products = products.loc[knn.ids.tolist()]
        index = CatalogIndex.build(train_products, catalog.image_dir)
        frames, hits_of = _search_strategies(ctx, captions, index, train_products)
        query_ids = captions["id"].tolist()
    # 5b. Visual baselines (the encoder's features; a contrastive image-text model trained on the training names)
    with ctx.timed("visual baselines"):
        spaces = baselines.spaces(val_emb, knn.vectors, knn.ids, *_contrastive(ctx, knn, train_names, encoder))
        spaces_key = digest(ctx.state.get("captions_key"), ctx.state.get("knn_key"), ctx.state.get("names_key"),
                            asdict(config.contrastive))
        for space in ctx.steps(spaces, "visual baselines", total=len(spaces), unit="baseline"):
            hits_of[space.name] = ctx.ranked(digest("space", spaces_key, space.name, config.k),
                                             lambda space=space: (space.top(config.k), None))[0]
            frames.append(_per_query("visual", space.name, [""] * len(query_ids), hits_of[space.name], query_ids,
                                     products, train_products))
    # 5c. Hybrids: the best caption strategy's text results fused with the best visual baseline's neighbours
    if config.hybrids:
        with ctx.timed("hybrids"):
            frames += _hybrids(ctx, captions, frames, index, spaces, spaces_key, train_products)
    # 6. Result refinement (paper IV-B) on a seeded subset: re-rank each strategy's hits by agreement
    if config.refine_queries > 0:
        with ctx.timed("refinement"):
            frames += _refined(ctx, captions, val_emb, hits_of, train_products)
    with ctx.timed("summaries and intervals"):
        per_query = pd.concat(frames, ignore_index=True)
        per_query.insert(1, "seen", per_query["id"].map(dict(zip(captions["id"], captions["seen"]))).astype(bool))
        write_csv_atomic(ctx.path(files.RETRIEVAL), per_query.round(4))
        summary = _retrieval_summary(ctx, per_query, n_queries=len(captions), catalog_size=len(index),
                                     reranked="reranked" in captions)
        write_json_atomic(ctx.path(files.RETRIEVAL_SUMMARY), summary)
    ctx.rankings.save()
    timings = {"stages": ctx.seconds, "total_seconds": round(time.perf_counter() - started, 1)}
    if (kept := getattr(ctx.captioner, "encodings", None)) is not None:
        timings["encoder_cache"] = {"images_encoded": kept.misses, "images_reused": kept.hits,
                                    "megabytes": round(kept.bytes / 2**20, 1)}
    write_json_atomic(ctx.path(files.TIMINGS), timings)
    return metrics


def _sentence_encoder() -> SentenceEncoder | None:
    try:
        return SentenceEncoder.load()
    except EncoderUnavailable as err:  # the rest of the evaluation runs without it
        logger.warning("skipping semantic similarity and the contrastive baseline: %s", err)
        return None


def _name_embeddings(ctx: _Context, names: list[str], encoder: SentenceEncoder) -> np.ndarray:
    """MiniLM embeddings of the catalog's names, cached in the workspace per list of names."""
    key = digest(encoder.name, names)
    path = ctx.path(files.NAME_EMBEDDINGS)
    if ((ctx.state.get("names_key") == key or shared.fetch(ctx.config.shared_dir, key, [path]))
            and (cached := load_npy(path)) is not None and len(cached) == len(names)):
        ctx.state["names_key"] = key
        ctx.save_state()
        return cached
    bar = tqdm(total=len(names), desc="embedding catalog names", unit="name", disable=not ctx.config.progress_bars)

    def progress(done: int, total: int) -> None:
        bar.total = total  # distinct names: a repeated one is embedded once
        bar.update(done - bar.n)
        if ctx.progress is not None:
            ctx.progress("embedding catalog names", done, total)

    vectors = encoder.encode(names, progress=progress)
    bar.close()
    save_npy_atomic(path, vectors)
    shared.share(ctx.config.shared_dir, key, [path])
    ctx.state["names_key"] = key
    ctx.save_state()
    return vectors


def _contrastive_on(ctx: _Context, encoder: SentenceEncoder | None) -> bool:
    return encoder is not None and ctx.config.contrastive.epochs > 0


def _contrastive(ctx: _Context, knn: ImageKnnIndex, names: list[str], encoder: SentenceEncoder | None):
    """(the catalog names' MiniLM embeddings, the contrastive model trained on them), or (None, None)."""
    if not _contrastive_on(ctx, encoder):
        return None, None
    name_vectors = _name_embeddings(ctx, names, encoder)
    key = digest(ctx.state.get("knn_key"), ctx.state.get("names_key"), asdict(ctx.config.contrastive))
    path = ctx.path(files.CONTRASTIVE)
    model = None
    if not ctx.config.force:
        model = load_contrastive(path, key)
        if model is None and shared.fetch(ctx.config.shared_dir, key, [path]):
            model = load_contrastive(path, key)
    if model is None:
        steps = ctx.progress and (lambda done, total: ctx.progress("training the contrastive baseline", done, total))
        model = train_contrastive(knn.vectors, name_vectors, ctx.config.contrastive, progress=steps or None)
        save_contrastive(model, ctx.config.contrastive, path, key)
        shared.share(ctx.config.shared_dir, key, [path])
    return name_vectors, model


def _hybrids(ctx: _Context, captions: pd.DataFrame, frames: list[pd.DataFrame], index: CatalogIndex,
             spaces: list, spaces_key: str, train_products: pd.DataFrame) -> list[pd.DataFrame]:
    """`rrf:<strategy>+<baseline>` and `hybrid:<strategy>+<baseline>` (a blend weighted by cross-fitting)."""
    so_far = pd.concat(frames, ignore_index=True)
    means = so_far.groupby(["strategy", "source"])["R1_p_at_10"].mean().reset_index()
    text = means[means["source"].isin(["caption", "reranked"])].sort_values("R1_p_at_10", ascending=False)
    visual = means[means["source"] == "visual"].sort_values("R1_p_at_10", ascending=False)
    if text.empty or visual.empty:
        return []
    strategy, source = text.iloc[0]["strategy"], text.iloc[0]["source"]
    space = next(s for s in spaces if s.name == visual.iloc[0]["strategy"])
    column = {"caption": "generated", "reranked": "reranked"}[source]
    function = STRATEGIES[strategy.split(":", 1)[-1]]
    text_hits, text_scores = _text_rankings(ctx, index, [function(c) for c in captions[column]], baselines.DEPTH)
    visual_hits = ctx.ranked(digest("space", spaces_key, space.name, baselines.DEPTH),
                             lambda: (space.top(baselines.DEPTH), None))[0]
    articles = ctx.products.loc[captions["id"], "articleType"].to_numpy()
    quality = baselines.r1_quality(articles, train_products["articleType"].to_dict())
    fused = baselines.hybrids(text_hits, text_scores, space, visual_hits, quality, k=ctx.config.k)
    ctx.state["hybrid"] = {"strategy": strategy, "baseline": space.name, **fused["blend"][1]}
    query_ids = captions["id"].tolist()
    kinds = (("rrf", "rrf"), ("hybrid", "blend"))
    return [_per_query("hybrid", f"{prefix}:{strategy}+{space.name}", [""] * len(query_ids), fused[kind][0],
                       query_ids, ctx.products, train_products) for prefix, kind in kinds]


def _caption_held_out(ctx: _Context, val_ids: list[int]) -> tuple[pd.DataFrame, np.ndarray, str]:
    """(captions: id, reference, generated[, reranked]; pooled embeddings; the key they were computed under)."""
    config, state = ctx.config, ctx.state
    captions_path, embeddings_path = ctx.path(files.CAPTIONS), ctx.path(files.VAL_EMBEDDINGS)
    val_key = digest(ctx.model_key, str(ctx.data_dir.resolve()), val_ids, config.num_beams, SHRINK_NAME)
    if (not config.force and state.get("captions_key") == val_key and captions_path.is_file()
            and load_npy(embeddings_path) is not None):
        logger.info("reusing %s", captions_path)
        kept_columns = ["id", "reference", "generated", "reranked"]  # the rest is recomputed below
        captions = pd.read_csv(captions_path, keep_default_na=False)
        return captions[[c for c in kept_columns if c in captions]], load_npy(embeddings_path), val_key
    names = ctx.products["productDisplayName"].to_dict()
    kept, generated, chunks, skipped, loss_sum, tokens = [], [], [], [], 0.0, 0
    other_losses: dict[str, list] = {}  # loss definitions besides ours (the paper notebook's), [sum, tokens]
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
        for definition, (part_sum, part_tokens) in batch.other_losses.items():
            total = other_losses.setdefault(definition, [0.0, 0])
            total[0], total[1] = total[0] + part_sum, total[1] + part_tokens
    rate = len(kept) / max(time.perf_counter() - started, 1e-9)
    if not kept:
        raise DataError(f"no held-out image in {ctx.data_dir} could be decoded ({len(skipped)} skipped)")
    val_emb = np.concatenate(chunks).astype(np.float32)
    captions = pd.DataFrame({"id": kept, "reference": [names[i] for i in kept], "generated": generated})
    save_npy_atomic(embeddings_path, val_emb)
    write_csv_atomic(captions_path, captions)
    ctx.state = {"captions_key": val_key, "skipped": skipped, "loss_sum": loss_sum, "tokens": tokens,
                 "images_per_second": rate, "other_losses": other_losses}
    ctx.save_state()
    ctx.state = json.loads(ctx.path(files.STATE).read_text())  # exactly what a re-run will read
    return captions, val_emb, val_key


def _catalog_knn(ctx: _Context, train_ids: list[int]) -> tuple[ImageKnnIndex, str]:
    """The visual index of the training catalog, and its key: the run's own, or one shared by every run whose
    image embedding is its frozen backbone's alone (`embedding_key`), so those runs embed the catalog once."""
    knn_path = ctx.path(files.CATALOG_KNN)
    embedding_key = getattr(ctx.captioner, "embedding_key", lambda: None)() or ctx.model_key
    knn_key = digest(embedding_key, str(ctx.data_dir.resolve()), train_ids)
    parts = [knn_path.with_suffix(".npz"), knn_path.with_suffix(".json")]
    knn = None
    if not ctx.config.force and (ctx.state.get("knn_key") == knn_key and parts[0].is_file()
                                 or shared.fetch(ctx.config.shared_dir, knn_key, parts)):
        knn = _read_knn(knn_path)
    if knn is None:
        ids, matrix, _ = ctx.captioner.embed_paths([(i, ctx.catalog.image_path(i)) for i in train_ids],
                                                   progress=ctx.config.progress_bars,
                                                   desc="embedding the training catalog", hook=ctx.progress)
        knn = ImageKnnIndex(ids=np.asarray(ids), vectors=matrix,
                            image_paths=[str(ctx.catalog.image_path(i)) for i in ids],
                            names=ctx.products.loc[ids, "productDisplayName"].tolist())
        knn.save(knn_path)
        shared.share(ctx.config.shared_dir, knn_key, parts)
    ctx.state["knn_key"] = knn_key
    ctx.save_state()
    return knn, knn_key


def _read_knn(path: Path) -> ImageKnnIndex | None:
    try:
        return ImageKnnIndex.load(path)
    except (OSError, ValueError, KeyError) as err:
        logger.warning("ignoring the unreadable %s (%s): embedding the catalog again", path.name, err)
        return None


def _nearest_names(ctx: _Context, knn: ImageKnnIndex, val_emb: np.ndarray, key: str) -> list[str]:
    """The name of each held-out photo's visually nearest training product (the nearest-neighbour caption)."""
    def search() -> tuple[list[list[int]], None]:
        responses = knn.search_vectors(val_emb, k=ctx.config.k)
        return [[r.product_id for r in response.results] for response in responses], None

    nearest = ctx.ranked(key, search)[0]
    return [ctx.products.at[hits[0], "productDisplayName"] if hits else "" for hits in nearest]


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
              batch_size: int = 64) -> list[str]:
    """Per held-out product, the best-scored candidate (the greedy caption if its image fails to decode).

    64 images a batch: on two cores the reference evaluation's reranking took 202 s instead of 229-239 s in batches
    of 16, with the same picks (larger decoder matmuls; bench/HISTORY.md, seventh session)."""
    config = ctx.config.rerank
    # every photo's visual neighbours at once (a query at a time reads the whole catalog matrix: ~7 ms each)
    nearest = knn.search_vectors(val_emb, k=config.k)
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
        neighbours = [[(hit.title, hit.score) for hit in nearest[row].results] for row in readable]
        ranked = rerank(ctx.captioner, images, greedy, neighbours, config) if images else []
        best = {row: pool[0].text for row, pool in zip(readable, ranked) if pool}
        out += [best.get(row, captions["generated"].iloc[row]) for row in rows]
    return out


PERPLEXITY_DEFINITION = ("exp(mean cross-entropy per token of the captioner's tokenizer, EOS included, the first "
                         "token predicted from the decoder's start token)")
METRIC_CODE = [Path(__file__).with_name("verdict.py"), Path(__file__).parents[1] / "metrics.py",
               Path(__file__).parents[1] / "sentence_encoder.py"]


def _scored_captions(ctx: _Context, captions: pd.DataFrame, nn_captions: list[str], missing: int, catalog_size: int,
                     encoder: SentenceEncoder | None, known_vectors: dict[str, np.ndarray] | None = None,
                     ) -> tuple[pd.DataFrame, dict]:
    """`_caption_metrics`, written; read back when the same captions were scored by the same code before."""
    texts = captions[[c for c in ("id", "reference", "generated", "reranked", "seen") if c in captions]]
    key = digest(texts.astype(str).values.tolist(), nn_captions, encoder.name if encoder else None, missing,
                 catalog_size, ctx.run.name, str(ctx.data_dir), asdict(ctx.config.rerank), ctx.config.num_beams,
                 {k: ctx.state.get(k) for k in ("skipped", "loss_sum", "tokens", "images_per_second", "other_losses")},
                 [file_sha256(path) for path in METRIC_CODE])
    if not ctx.config.force and ctx.state.get("metrics_key") == key:
        scored = _read_scored(ctx, captions["id"].tolist())
        if scored is not None:
            logger.info("reusing the caption metrics of the same captions")
            return scored
    captions, metrics = _caption_metrics(ctx, captions, nn_captions, missing, catalog_size, encoder, known_vectors)
    write_json_atomic(ctx.path(files.CAPTION_METRICS), metrics)
    ctx.state["metrics_key"] = key
    ctx.save_state()
    return captions, metrics


def _read_scored(ctx: _Context, ids: list[int]) -> tuple[pd.DataFrame, dict] | None:
    """The scored captions.csv and caption_metrics.json of an earlier run, if both are there for these ids."""
    try:
        captions = pd.read_csv(ctx.path(files.CAPTIONS), keep_default_na=False)
        metrics = json.loads(ctx.path(files.CAPTION_METRICS).read_text())
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    if "seen" not in captions or captions["id"].tolist() != ids or not isinstance(metrics, dict):
        return None
    captions["seen"] = captions["seen"].astype(str).str.lower().eq("true")
    return captions, metrics


def _caption_metrics(ctx: _Context, captions: pd.DataFrame, nn_caption: list[str], missing: int, catalog_size: int,
                     encoder: SentenceEncoder | None, known_vectors: dict[str, np.ndarray] | None = None,
                     ) -> tuple[pd.DataFrame, dict]:
    """captions.csv with per-caption scores and attributes (written), and caption_metrics.json's content.

    CIDEr-D's document frequencies come from the references of all held-out products scored here; the seen and
    novel figures are means of those per-caption scores (so all three use the same frequencies)."""
    state, config = ctx.state, ctx.config
    captions["nn_caption"] = nn_caption
    references = captions["reference"].tolist()
    captions["sentence_bleu"] = [sentence_bleu(g, r) for g, r in zip(captions["generated"], references)]
    pairs = list(zip(captions["generated"], references))
    captions["last_two_match"] = [last_words_match(g, r, 2) for g, r in pairs]
    captions["last_word_match"] = [last_words_match(g, r, 1) for g, r in pairs]
    captions["exact_match"] = [exact_match(g, r) for g, r in pairs]
    decodings = {"model": "generated", "nn_caption_baseline": "nn_caption",
                 **({"reranked": "reranked"} if "reranked" in captions else {})}
    prefix = {"model": "", "nn_caption_baseline": "nn_", "reranked": "reranked_"}
    if encoder is not None:  # every distinct text embedded once (most are catalog names, `known_vectors`)
        vectors = text_vectors(encoder, [*references, *(t for c in decodings.values() for t in captions[c])],
                               known_vectors)
        reference_vectors = np.stack([vectors[str(t or "")] for t in references])
    for decoding, column in decodings.items():
        texts = captions[column].tolist()
        captions[f"{prefix[decoding]}cider_d"] = cider_d(texts, references)[1]
        captions[f"{prefix[decoding]}rouge_l"] = rouge_l(texts, references)[1]
        if encoder is not None:
            captions[f"{prefix[decoding]}semantic"] = cosine_rows(np.stack([vectors[str(t or "")] for t in texts]),
                                                                  reference_vectors)
    attrs = ctx.products.loc[captions["id"], ATTRIBUTES].reset_index(drop=True)
    captions = pd.concat([captions.reset_index(drop=True), attrs], axis=1)
    write_csv_atomic(ctx.path(files.CAPTIONS), captions.round(4))

    def scored(frame: pd.DataFrame, decoding: str) -> dict:
        out = caption_metrics(frame[decodings[decoding]].tolist(), frame["reference"].tolist())
        for metric in ("cider_d", "rouge_l", "semantic"):
            if f"{prefix[decoding]}{metric}" in frame:
                out[metric] = float(frame[f"{prefix[decoding]}{metric}"].mean()) if len(frame) else math.nan
        return out

    loss = state["loss_sum"] / max(state["tokens"], 1)
    other = {}  # e.g. the paper notebook's definition, which never predicts the first token (its Table I's)
    for definition, pair in (state.get("other_losses") or {}).items():
        if isinstance(pair, list) and len(pair) == 2 and pair[1]:
            other[f"loss_{definition}_definition"] = pair[0] / pair[1]
            other[f"perplexity_{definition}_definition"] = math.exp(pair[0] / pair[1])
    metrics = {
        "run": ctx.run.name, "data_dir": str(ctx.data_dir), "n_scored": len(captions),
        "n_skipped": len(state["skipped"]), "n_missing_from_data_dir": missing, "num_beams": config.num_beams,
        "images_per_second": state["images_per_second"],
        # greedy captions that begin with a brand step's word (ris_core/brand_step.py): how many words it knows
        **({"brand_step_words": len(step.words)} if (step := getattr(ctx.captioner, "brand_step", None)) else {}),
        "model": {**scored(captions, "model"), "loss": loss, "perplexity": math.exp(loss), **other,
                  "perplexity_definition": PERPLEXITY_DEFINITION},
        "nn_caption_baseline": scored(captions, "nn_caption_baseline"),
        **({"reranked": {**scored(captions, "reranked"), **asdict(config.rerank)}} if "reranked" in captions else {}),
        "catalog_size": catalog_size,
        "n_seen": int(captions["seen"].sum()), "n_novel": int((~captions["seen"]).sum()),
        "subsets": {name: {decoding: scored(verdict.subset(captions, name), decoding) for decoding in decodings}
                    for name in ("seen", "novel")},
        "cider_document_frequencies": "the references of all held-out products scored",
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
        hits = _text_rankings(ctx, index, queries, ctx.config.k)[0]
        frames.append(_per_query(source, name, queries, hits, query_ids, ctx.products, train_products))
        hits_of[name] = hits
    return frames, hits_of


def _text_rankings(ctx: _Context, index: CatalogIndex, queries: list[str],
                   k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Each query's top `k` catalog ids and BM25 scores; read back when the same queries met the same index."""
    key = digest("bm25", index.fingerprint, FIELDS, bm25.K1, bm25.B, k, queries)

    def search() -> tuple[list[list[int]], list[list[float]]]:
        responses = index.search_many(queries, k=k)
        return ([[r.product_id for r in response.results] for response in responses],
                [[r.score or 0.0 for r in response.results] for response in responses])

    hits, scores = ctx.ranked(key, search)
    return hits, scores if scores is not None else [[0.0] * len(h) for h in hits]


def _refined(ctx: _Context, captions: pd.DataFrame, val_emb: np.ndarray, hits_of: dict[str, list[list[int]]],
             train_products: pd.DataFrame) -> list[pd.DataFrame]:
    """`<strategy>+refine` rows for a seeded subset of queries; every result image is captioned once."""
    rng = np.random.default_rng(0)
    rows = np.sort(rng.permutation(len(captions))[: ctx.config.refine_queries])
    # the caption strategies and the encoder's own visual baseline (as before the contrastive rows existed)
    strategies = [name for name in hits_of if not name.startswith(("oracle:", "reranked:"))
                  and (":" not in name or name == VISUAL)]
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
    rows = verdict.summarize_subsets(per_query, n_boot=n_boot)
    seen = per_query.drop_duplicates("id")["seen"]
    return {
        "run": ctx.run.name, "k": ctx.config.k, "n_queries": n_queries,
        "n_seen": int(seen.sum()), "n_novel": int((~seen).sum()),
        "catalog": "training products of " + str(ctx.data_dir), "catalog_size": catalog_size, "n_boot": n_boot,
        "rows": rows,
        "paired": [paired_difference(per_query, *PAIRED, n_boot=n_boot),
                   paired_difference(per_query, "last_two_words", VISUAL, n_boot=n_boot)]
        + [paired_difference(per_query, name, name.removesuffix("+refine"), n_boot=n_boot) for name in refined]
        + ([paired_difference(per_query, "reranked:last_two_words", "last_two_words", n_boot=n_boot)]
           if reranked else []),
        "verdict": verdict.verdict(per_query, rows, n_boot=n_boot),
        **({"hybrid": ctx.state["hybrid"]} if "hybrid" in ctx.state else {}),
    }


def _per_query(source: str, strategy: str, queries: list[str], hits: list[list[int]], ids: list[int],
               products: pd.DataFrame, catalog: pd.DataFrame) -> pd.DataFrame:
    judged = judge_rankings(hits, ids, products, catalog).reset_index()
    judged.insert(1, "source", source)
    judged.insert(2, "strategy", strategy)
    judged.insert(3, "query", queries)
    judged.insert(4, "hits", [" ".join(map(str, h)) for h in hits])
    return judged
