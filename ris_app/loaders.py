"""Cached loaders: models, indexes and evaluations with `st.cache_resource`, other tables with `st.cache_data`.

Every loader is keyed by the path it reads plus a stamp (file modification times), so a retrained model or
a new evaluation is picked up on the next rerun while switching pages never reloads anything. Errors
(`RunError`, `DataError`, `CheckpointError`, `ImageError`) are not cached; pages turn them into messages.
Heavy imports (torch, transformers) happen inside the loaders, so pages that need no model start fast.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import streamlit as st

from ris_app.history_io import flag_implausible
from ris_core.data import Catalog, load_catalog
from ris_core.errors import DataError, ImageError, RunError
from ris_core.evaluation import files as eval_files
from ris_core.evaluation.files import Evaluation, read_evaluation, read_summaries
from ris_core.files import digest
from ris_core.images import open_image, square
from ris_core.runs import Run
from ris_core.search.web import WebImages

if TYPE_CHECKING:  # heavy modules: imported inside the loaders that need them
    from PIL import Image

    from ris_core.captioner import ImageCaptioner
    from ris_core.demo_artifacts import DemoArtifacts, GalleryPhoto
    from ris_core.jobs import Jobs
    from ris_core.refine import CaptionCache
    from ris_core.search.catalog import CatalogIndex
    from ris_core.search.duckduckgo import DuckDuckGoImages
    from ris_core.search.image_knn import ImageKnnIndex

THUMB_SIDE = 160  # px: grids and cards show images at ~120-160 px
KNN_CACHE_DIR = Path(".cache") / "knn"  # image-kNN indexes of catalogs, under the working directory
Key = tuple[str, tuple[int, ...]]  # (resolved path, modification stamp): what every cached loader is keyed by


@dataclass(frozen=True, eq=False)
class CatalogIds:
    """Catalog product ids with a fingerprint computed once: the caches below hash the fingerprint, not every id
    (hashing the 2,600 demo ids at each cached call was 0.47 of an upload's 2.7 s rerun, on a loaded machine)."""

    ids: tuple[int, ...]
    key: str

    @classmethod
    def of(cls, ids) -> CatalogIds:
        array = np.asarray(list(ids), dtype=np.int64)
        return cls(tuple(array.tolist()), hashlib.sha256(array.tobytes()).hexdigest())


BY_KEY = {CatalogIds: lambda ids: ids.key}  # hash_funcs of every cached loader taking catalog ids


def stamp(*paths: Path) -> tuple[int, ...]:
    """Modification times (ns) of the paths, 0 for a missing one: the part of a cache key that changes."""
    out = []
    for path in paths:
        try:
            out.append(Path(path).stat().st_mtime_ns)
        except OSError:
            out.append(0)
    return tuple(out)


def model_stamp(run: Run) -> tuple[int, ...]:
    """Our model/ folder's or an imported paper notebook's (notebook/) config and weights."""
    notebook = run.path / "notebook"
    return stamp(run.model_dir / "config.json", *sorted(run.model_dir.glob("*.safetensors")),
                 notebook / "config.json", *sorted(notebook.glob("*.safetensors")))


def run_key(run: Run) -> Key:
    """The key of everything computed with a run's model: changes when its weights do."""
    return str(run.path), model_stamp(run)


def data_key(data_dir: Path) -> Key:
    """The key of everything read from a data folder: changes when styles.csv or images/ does."""
    data_dir = Path(data_dir)
    return str(data_dir.resolve()), stamp(data_dir / "styles.csv", data_dir / "images")


def eval_key(run: Run, names: tuple[str, ...] = eval_files.OUTPUTS) -> Key:
    return str(run.eval_dir), stamp(*(run.eval_dir / n for n in names))


# ---------------------------------------------------------------- tables


@st.cache_data(show_spinner=False, max_entries=64)
def _history(path: str, version: tuple[int, ...]) -> pd.DataFrame:
    frame = Run(Path(path)).history()
    # A hand-edited or half-written history may hold text in numeric columns: show it as gaps, not a crash.
    frame = frame.apply(lambda column: pd.to_numeric(column, errors="coerce"))
    frame = frame[np.isfinite(frame["epoch"].to_numpy(dtype=float, na_value=np.nan))]
    return flag_implausible(frame.sort_values("epoch").reset_index(drop=True))


def history(run: Run) -> pd.DataFrame:
    """The run's history.csv (RunError when missing or unreadable)."""
    return _history(str(run.path), stamp(run.path / "history.csv"))


@st.cache_resource(show_spinner="Reading the product catalog...", max_entries=4)
def _catalog(data_dir: str, version: tuple[int, ...]) -> Catalog:
    return load_catalog(data_dir)


def catalog(data_dir: Path) -> Catalog:
    """The data folder's products (DataError with what to do when the folder is unusable)."""
    return _catalog(*data_key(data_dir))


# one shared copy per server, not a copy per page view: unpickling its tables (the per-query rankings run to
# hundreds of thousands of rows) took a tenth of a busy server's time. Read-only: pages filter into new frames.
@st.cache_resource(show_spinner=False, max_entries=32)
def _evaluation(eval_dir: str, version: tuple[int, ...]) -> Evaluation:
    return read_evaluation(Path(eval_dir))


@st.cache_data(show_spinner=False, max_entries=32)
def _summaries(eval_dir: str, version: tuple[int, ...]) -> tuple[dict | None, dict | None, list[str]]:
    return read_summaries(Path(eval_dir))


def evaluation(run: Run) -> Evaluation:
    """Everything the run's evaluation wrote (parts may be None, with `problems` saying why)."""
    return _evaluation(*eval_key(run))


def summaries(run: Run) -> tuple[dict | None, dict | None, list[str]]:
    """(caption_metrics.json, retrieval.json, problems) of a run's evaluation, without its large tables."""
    return _summaries(*eval_key(run, eval_files.SUMMARIES))


@st.cache_data(show_spinner="Computing precision at every k…", max_entries=16)
def _precision_curves(eval_dir: str, version: tuple[int, ...], data_dir: str, data_version: tuple[int, ...],
                      level: str, subset: str, strategies: tuple[str, ...]) -> pd.DataFrame:
    from ris_core.evaluation.precision_curves import precision_curves

    retrieval = _evaluation(eval_dir, version).retrieval  # parsed once per evaluation, shared with the page
    if subset != "all" and "seen" in retrieval:
        retrieval = retrieval[retrieval["seen"].astype(str).str.lower().eq(str(subset == "seen").lower())]
    return precision_curves(retrieval, _catalog(data_dir, data_version).products, level,
                            strategies=list(strategies))


def precision_curves(run: Run, data_dir: Path, level: str, subset: str, strategies: tuple[str, ...]) -> pd.DataFrame:
    """P@k for k = 1..10 with 95% bands of the chosen strategies (`ris_core.evaluation.precision_curves`)."""
    return _precision_curves(*eval_key(run), *data_key(data_dir), level, subset, strategies)


@st.cache_data(show_spinner=False, max_entries=32)
def _first_word_rates(eval_dir: str, version: tuple[int, ...], subset: str,
                      columns: tuple[str, ...]) -> dict[str, float | None]:
    from ris_core.evaluation.verdict import subset as subset_of
    from ris_core.metrics import first_word_rate

    rows = subset_of(_evaluation(eval_dir, version).captions, subset)
    references = rows["reference"].fillna("").astype(str).tolist()
    return {column: first_word_rate(rows[column].fillna("").astype(str).tolist(), references)
            if column in rows and len(rows) else None for column in columns}


def first_word_rates(run: Run, subset: str, columns: tuple[str, ...]) -> dict[str, float | None]:
    """How often each captions.csv column's first word (mostly the brand) is the reference's, for all, seen or
    novel products (None: no such column or no products). Once per evaluation: 0.3 s for 4,443 products."""
    return _first_word_rates(*eval_key(run), subset, columns)


@st.cache_data(show_spinner="Scoring each category…", max_entries=16)
def _categories(eval_dir: str, version: tuple[int, ...], by: str, column: str) -> pd.DataFrame:
    from ris_core.evaluation.categories import per_category

    evaluation = _evaluation(eval_dir, version)
    retrieval, strategy = evaluation.retrieval, None
    if retrieval is not None and "R1_p_at_10" in retrieval:
        captions_only = retrieval[retrieval["source"] == "caption"]
        strategy = captions_only.groupby("strategy")["R1_p_at_10"].mean().idxmax() if len(captions_only) else None
    return per_category(evaluation.captions, by, column, retrieval, strategy)


def categories(run: Run, by: str, column: str) -> pd.DataFrame:
    """Per-category BLEU-4, last-two match and the best caption strategy's P@10 (KeyError: no such column)."""
    return _categories(*eval_key(run), by, column)


@st.cache_data(show_spinner=False, max_entries=16)
def _article_confusions(eval_dir: str, version: tuple[int, ...], data_dir: str, data_version: tuple[int, ...],
                        column: str) -> pd.DataFrame:
    from ris_core.evaluation.categories import article_confusions, article_words

    products = _catalog(data_dir, data_version).products
    return article_confusions(_evaluation(eval_dir, version).captions,
                              article_words(products["productDisplayName"], products["articleType"]), column)


def article_confusions(run: Run, data_dir: Path, column: str) -> pd.DataFrame | None:
    """The most frequent wrong articles the captions name; None when the data folder cannot be read."""
    try:
        return _article_confusions(*eval_key(run), *data_key(data_dir), column)
    except (DataError, KeyError):
        return None


def held_out_ids(run: Run, products: pd.DataFrame) -> list[int]:
    """The run's held-out product ids that are in the data folder (RunError without split.json)."""
    try:
        split = run.split()
    except (OSError, ValueError, TypeError) as err:
        raise RunError(f"{run.path / 'split.json'} is unreadable ({type(err).__name__}); re-run training") from err
    return [int(i) for i in split.val_ids if int(i) in products.index]


def training_ids(run: Run, products: pd.DataFrame) -> list[int]:
    """The data folder's products the run trained on: the searchable catalog (never a held-out product)."""
    return run.split().searchable_ids(products)


# ---------------------------------------------------------------- models and indexes


@st.cache_resource(show_spinner="Loading the captioner (once per run)...", max_entries=3)
def _captioner(run_path: str, version: tuple[int, ...]) -> ImageCaptioner:
    from ris_core.captioner import load_any_captioner  # torch: only pages that caption pay for it

    return load_any_captioner(run_path)


def captioner(run: Run) -> ImageCaptioner:
    """The run's `ImageCaptioner`, loaded once (CheckpointError when the checkpoint is missing or corrupt)."""
    return _captioner(*run_key(run))


WARM_DELAY_SECONDS = 3.0  # importing torch holds the GIL: let the server send the painted page first
PRELOADED_WARM_DELAY_SECONDS = 0.5  # torch already imported (`python -m ris_app.serve`): only the weights remain
_warming: set[Key] = set()
_warming_lock = threading.Lock()


def warm_captioner(run: Run) -> None:
    """Load the run's captioner in a background thread, once per process, if nothing has yet: a page that
    answered from precomputed files calls this after painting, so the first upload does not wait for torch and
    the weights (seconds on a cold server). Errors are left for the page that needs the model to report."""
    key = run_key(run)
    with _warming_lock:
        if key in _warming:
            return
        _warming.add(key)

    delay = PRELOADED_WARM_DELAY_SECONDS if "ris_core.captioner" in sys.modules else WARM_DELAY_SECONDS

    def load() -> None:
        time.sleep(delay)
        try:
            _captioner(*key)
        except Exception:  # a broken checkpoint: the upload's own call shows the message
            pass

    threading.Thread(target=load, name="job-warm-captioner", daemon=True).start()  # tests wait for "job-" threads


@st.cache_resource
def inference_lock() -> threading.Lock:
    """One live model call at a time across sessions: on 2 cores concurrent calls add no speed (torch already
    uses both), only memory (each holds its own activations and allocator arenas)."""
    return threading.Lock()


@st.cache_data(show_spinner=False, max_entries=2048)
def _caption_file(run_path: str, version: tuple[int, ...], image_path: str) -> str:
    image = open_image(image_path)
    return _captioner(run_path, version).caption([image])[0]


def caption_product(run: Run, image_path: Path) -> str:
    """A live caption of one catalog image (for products the evaluation did not caption)."""
    return _caption_file(*run_key(run), str(image_path))


@st.cache_data(show_spinner=False, max_entries=256)
def _query_features(run_path: str, version: tuple[int, ...], image_path: str,
                    image_version: tuple[int, ...]) -> tuple[str, np.ndarray]:
    batch = _captioner(run_path, version).run_batch([open_image(image_path)])
    return batch.captions[0], np.asarray(batch.embeddings[0], dtype=np.float32)


def query_features(run: Run, image_path: Path) -> tuple[str, np.ndarray]:
    """(caption, embedding) of one image file from `run_batch`: the query side of result refinement."""
    return _query_features(*run_key(run), str(image_path), stamp(image_path))


@st.cache_resource(show_spinner=False, max_entries=3)
def _caption_cache(run_path: str, version: tuple[int, ...]) -> CaptionCache:
    from ris_core.refine import CaptionCache

    # In memory: the dashboard only reads run folders. Keyed by weights, so a retrained model starts afresh.
    return CaptionCache(model_key=f"{run_path}@{'.'.join(map(str, version))}")


def caption_cache(run: Run) -> CaptionCache:
    """Captions and embeddings of result images for refinement, one cache per run and model version."""
    return _caption_cache(*run_key(run))


@st.cache_resource(show_spinner=False)
def web_images() -> WebImages:
    return WebImages()


def refine_results(run: Run, caption: str, embedding: np.ndarray, results: list,
                   threshold: float | None = None):
    """`ris_core.refine.refine` with the run's cached captioner and caption cache; web thumbnails are fetched
    in parallel first. Returns (RefineOutcome, milliseconds). CheckpointError when the model cannot load."""
    from ris_core.refine import image_source, refine

    model = captioner(run)
    started = time.perf_counter()
    fetch = web_images()
    fetch.prefetch([s for s in map(image_source, results) if "://" in s])
    outcome = refine(model, caption, embedding, results, threshold, fetch, cache=caption_cache(run))
    return outcome, (time.perf_counter() - started) * 1000


@st.cache_resource(show_spinner="Indexing the catalog for text search...", max_entries=4, hash_funcs=BY_KEY)
def _catalog_index(data_dir: str, data_version: tuple[int, ...], ids: CatalogIds) -> CatalogIndex:
    from ris_core.search.catalog import CatalogIndex

    cat = _catalog(data_dir, data_version)
    return CatalogIndex.build(cat.products.loc[list(ids.ids)], cat.image_dir)


def catalog_index(data_dir: Path, ids: list[int]) -> CatalogIndex:
    """An in-memory FTS5 index over the given products of the data folder, built once."""
    return _catalog_index(*data_key(data_dir), CatalogIds.of(ids))


def _knn_sources(run_path: str, model_version: tuple[int, ...], data_dir: str, data_version: tuple[int, ...],
                 ids: CatalogIds) -> tuple[Path, Path]:
    """(the run's evaluation index, this catalog's own cache file under .cache/knn/)."""
    cached = Path.cwd() / KNN_CACHE_DIR / f"{digest(run_path, model_version, data_dir, data_version, ids.ids)}.npz"
    return Path(run_path) / "eval" / f"{eval_files.CATALOG_KNN}.npz", cached


@st.cache_resource(show_spinner=False, max_entries=3, hash_funcs=BY_KEY)
def _demo_artifacts(run_path: str, model_version: tuple[int, ...], data_dir: str, data_version: tuple[int, ...],
                    ids: CatalogIds) -> DemoArtifacts | None:
    from ris_core import demo_artifacts

    cat = _catalog(data_dir, data_version)
    return demo_artifacts.load(Path(data_dir), Path(run_path), list(ids.ids), cat.products)


def shipped_photo(run: Run, data_dir: Path, ids: list[int], digest: str) -> GalleryPhoto | None:
    """A gallery photo's captions and embedding precomputed for this run and catalog (data/demo/precomputed/)."""
    shipped = _demo_artifacts(*run_key(run), *data_key(data_dir), CatalogIds.of(ids))
    return shipped.photos.get(digest) if shipped is not None else None


@st.cache_resource(show_spinner="Reading the catalog's image index...", max_entries=3, hash_funcs=BY_KEY)
def _knn_index(run_path: str, model_version: tuple[int, ...], data_dir: str, data_version: tuple[int, ...],
               ids: CatalogIds) -> ImageKnnIndex:
    from ris_core.search.image_knn import index_for_catalog

    cat = _catalog(data_dir, data_version)
    shipped = _demo_artifacts(run_path, model_version, data_dir, data_version, ids)
    if shipped is not None:  # int8, precomputed for the demo: no embedding pass on a cold server
        return shipped.knn(cat.products, cat.image_path)
    evaluation_index, cached = _knn_sources(run_path, model_version, data_dir, data_version, ids)
    # Never embeds here (that is a job's work: `build_knn_index`); IndexNotBuilt is raised, and not cached.
    return index_for_catalog(list(ids.ids), cat.products, cat.image_path, evaluation_index=evaluation_index,
                             cache_path=cached)


def knn_index(run: Run, data_dir: Path, ids: list[int]) -> ImageKnnIndex:
    """The image-kNN baseline over the given catalog products, embedded with the run's encoder; IndexNotBuilt
    when no stored index covers them yet (start `build_knn_index` as a job)."""
    return _knn_index(*run_key(run), *data_key(data_dir), CatalogIds.of(ids))


def build_knn_index(run: Run, data_dir: Path, ids: list[int], progress=None) -> None:
    """Embed the catalog images with the run's encoder and store the index where `knn_index` reads it."""
    from ris_core.search.image_knn import index_for_catalog

    catalog_ids = CatalogIds.of(ids)
    cat, model = _catalog(*data_key(data_dir)), captioner(run)
    evaluation_index, cached = _knn_sources(*run_key(run), *data_key(data_dir), catalog_ids)
    index_for_catalog(list(catalog_ids.ids), cat.products, cat.image_path,
                      lambda items: model.embed_paths(items, progress=False, desc="embedding the catalog images",
                                                      hook=progress),
                      evaluation_index=evaluation_index, cache_path=cached)


@st.cache_resource(show_spinner=False)
def jobs() -> Jobs:
    """The server's background jobs (evaluations, catalog embeddings): at most RIS_MAX_JOBS at once."""
    from ris_app.access import Access
    from ris_core.jobs import Jobs

    return Jobs(Path.cwd() / ".cache" / "jobs", max_jobs=Access.from_env().max_jobs)


@st.cache_resource(show_spinner=False, max_entries=3, hash_funcs=BY_KEY)
def _names_draft(run_path: str, version: tuple[int, ...], data_dir: str, data_version: tuple[int, ...],
                 ids: CatalogIds):
    """The catalog products' names as guesses that let one photo's greedy caption take fewer decoder steps
    (`ris_core.draft`; the same caption); None for a captioner that cannot use them."""
    captioner = _captioner(run_path, version)
    if not hasattr(captioner, "draft_from"):
        return None
    names = _catalog(data_dir, data_version).products.loc[list(ids.ids), "productDisplayName"]
    return captioner.draft_from(names.astype(str).tolist())


@st.cache_data(show_spinner=False, max_entries=256, hash_funcs=BY_KEY)
def _photo_caption(run_path: str, version: tuple[int, ...], digest: str, data_dir: str,
                   data_version: tuple[int, ...], ids: CatalogIds, _image) -> tuple[str, np.ndarray, float]:
    draft = _names_draft(run_path, version, data_dir, data_version, ids)
    started = time.perf_counter()
    with inference_lock():
        captioner = _captioner(run_path, version)
        if draft is not None:
            captioner.draft = draft
        batch = captioner.run_batch([_image])
    return batch.captions[0], np.asarray(batch.embeddings[0], dtype=np.float32), (time.perf_counter() - started) * 1000


def photo_caption(run: Run, digest: str, image, data_dir: Path, ids: list[int]) -> tuple[str, np.ndarray, float]:
    """(caption, embedding, milliseconds) of a photo, computed once for all sessions (keyed by its bytes' sha256);
    the names of the catalog products `ids` guide the decoding, not the caption."""
    return _photo_caption(*run_key(run), digest, *data_key(data_dir), CatalogIds.of(ids), image)


@st.cache_data(show_spinner=False, max_entries=256, hash_funcs=BY_KEY)
def _photo_rerank(run_path: str, version: tuple[int, ...], digest: str, greedy: str, exclude: int | None,
                  data_dir: str, data_version: tuple[int, ...], ids: CatalogIds, _image,
                  _embedding: np.ndarray) -> tuple[object, float]:
    from ris_core.rerank import RerankConfig, rerank

    started = time.perf_counter()
    knn = _knn_index(run_path, version, data_dir, data_version, ids)
    hits = knn.search_vector(_embedding, k=RerankConfig().k, exclude_id=exclude).results
    with inference_lock():
        [ranked] = rerank(_captioner(run_path, version), [_image], [greedy], [[(h.title, h.score) for h in hits]])
    return (ranked[0] if ranked else None), (time.perf_counter() - started) * 1000


def photo_rerank(run: Run, digest: str, image, greedy: str, embedding: np.ndarray, data_dir: Path, ids: list[int],
                 exclude: int | None = None):
    """(best Candidate or None, milliseconds): the reranked caption of a photo against the catalog products
    `ids` (`exclude`: a catalog product that must not lend its own name), once for all sessions."""
    return _photo_rerank(*run_key(run), digest, greedy, exclude, *data_key(data_dir), CatalogIds.of(ids),
                         image, embedding)


@st.cache_resource(show_spinner=False)
def duckduckgo() -> DuckDuckGoImages:
    """The web backend, one per process (it keeps its own SQLite result cache under .cache/)."""
    from ris_core.search.duckduckgo import DuckDuckGoImages

    return DuckDuckGoImages(timeout=6, max_retries=1)


# ---------------------------------------------------------------- images


@st.cache_data(show_spinner=False, max_entries=20_000)
def thumb(path: str, side: int = THUMB_SIDE) -> bytes | None:
    """A small square JPEG (padded with white, like the model's input) of an image file, or None when it is
    missing or not an image. Square thumbnails keep grids of portrait and landscape photos aligned."""
    try:
        image = square(open_image(path), side)
    except ImageError:
        return None
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def thumb_uri(path: str | Path, side: int = 96) -> str | None:
    """A data URI (for st.column_config.ImageColumn) of a small JPEG thumbnail."""
    data = thumb(str(path), side)
    return None if data is None else "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


@st.cache_resource(show_spinner=False, max_entries=32)
def _decoded(digest: str, _data: bytes) -> Image.Image:
    return open_image(_data)


def decode_upload(data: bytes) -> Image.Image:
    """Bytes of an uploaded file -> RGB image, decoded once per distinct file (keyed by its sha256; the image
    is shared, so callers must not modify it); ImageError with a clear message for anything unusable."""
    if not data:
        raise ImageError("the uploaded file is empty")
    return _decoded(hashlib.sha256(data).hexdigest(), data)


__all__ = [
    "article_confusions", "caption_cache", "caption_product", "captioner", "catalog", "catalog_index", "categories",
    "data_key", "decode_upload", "duckduckgo", "evaluation", "held_out_ids", "history", "knn_index", "model_stamp",
    "photo_caption", "photo_rerank", "precision_curves", "query_features", "refine_results", "run_key", "stamp",
    "summaries", "thumb", "thumb_uri", "training_ids", "web_images",
]
