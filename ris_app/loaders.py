"""Cached loaders: models and indexes with `st.cache_resource`, tables with `st.cache_data`.

Every loader is keyed by the path it reads plus a stamp (file modification times), so a retrained model or
a new evaluation is picked up on the next rerun while switching pages never reloads anything. Errors
(`RunError`, `DataError`, `CheckpointError`, `ImageError`) are not cached; pages turn them into messages.
Heavy imports (torch, transformers) happen inside the loaders, so pages that need no model start fast.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from ris_core.data import Catalog, DataError, load_catalog
from ris_core.images import ImageError, open_image, square
from ris_core.runs import Run, RunError
from ris_core.search import one_line

THUMB_SIDE = 160  # px: grids and cards show images at ~120-160 px
WEB_IMAGE_TTL = 600  # seconds a fetched web thumbnail (or its failure) is reused by refinement
KNN_CACHE_DIR = Path(".cache") / "knn"  # image-kNN indexes of catalogs, under the working directory


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


# ---------------------------------------------------------------- tables


@st.cache_data(show_spinner=False, max_entries=64)
def _history(path: str, version: tuple[int, ...]) -> pd.DataFrame:
    frame = Run(Path(path)).history()
    # A hand-edited or half-written history may hold text in numeric columns: show it as gaps, not a crash.
    frame = frame.apply(lambda column: pd.to_numeric(column, errors="coerce"))
    return frame.dropna(subset=["epoch"]).sort_values("epoch").reset_index(drop=True)


def history(run: Run) -> pd.DataFrame:
    """The run's history.csv (RunError when missing or unreadable)."""
    return _history(str(run.path), stamp(run.path / "history.csv"))


@st.cache_resource(show_spinner="Reading the product catalog...", max_entries=4)
def _catalog(data_dir: str, version: tuple[int, ...]) -> Catalog:
    return load_catalog(data_dir)


def catalog(data_dir: Path) -> Catalog:
    """The data folder's products (DataError with what to do when the folder is unusable)."""
    data_dir = Path(data_dir)
    return _catalog(str(data_dir.resolve()), stamp(data_dir / "styles.csv", data_dir / "images"))


@dataclass
class Evaluation:
    """What `python -m training.evaluate` wrote into <run>/eval/; any part may be missing (None)."""

    captions: pd.DataFrame | None
    caption_metrics: dict | None
    retrieval: pd.DataFrame | None
    retrieval_summary: dict | None
    problems: list[str]

    @property
    def exists(self) -> bool:
        return self.captions is not None and self.caption_metrics is not None


@st.cache_data(show_spinner=False, max_entries=32)
def _evaluation(eval_dir: str, version: tuple[int, ...]) -> Evaluation:
    root = Path(eval_dir)
    problems: list[str] = []

    def read_csv(name: str, required: set[str]) -> pd.DataFrame | None:
        path = root / name
        if not path.is_file():
            return None
        try:
            frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
        except (OSError, ValueError, pd.errors.ParserError) as err:
            problems.append(f"{name} is unreadable ({type(err).__name__}); re-run the evaluation")
            return None
        lacking = required - set(frame.columns)
        if lacking:
            problems.append(f"{name} lacks the columns {sorted(lacking)}; re-run the evaluation")
            return None
        return frame

    captions = read_csv("captions.csv", {"id", "reference", "generated"})
    if captions is not None:
        for column in ("reference", "generated", "nn_caption"):
            if column in captions:
                captions[column] = captions[column].fillna("").astype(str)
    retrieval = read_csv("retrieval.csv", {"id", "strategy", "source"})
    return Evaluation(
        captions=captions,
        caption_metrics=_read_json_object(root / "caption_metrics.json", problems),
        retrieval=retrieval,
        retrieval_summary=_read_json_object(root / "retrieval.json", problems),
        problems=problems,
    )


def _read_json_object(path: Path, problems: list[str]) -> dict | None:
    """The JSON object in `path`; None if absent, or unreadable with the reason added to `problems`."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        problems.append(f"{path.name} is unreadable ({type(err).__name__}); re-run the evaluation")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} does not hold a JSON object; re-run the evaluation")
        return None
    return data


@st.cache_data(show_spinner=False, max_entries=32)
def _summaries(eval_dir: str, version: tuple[int, ...]) -> tuple[dict | None, dict | None, list[str]]:
    problems: list[str] = []
    root = Path(eval_dir)
    metrics = _read_json_object(root / "caption_metrics.json", problems)
    return metrics, _read_json_object(root / "retrieval.json", problems), problems


EVAL_FILES = ("captions.csv", "caption_metrics.json", "retrieval.csv", "retrieval.json")


def evaluation(run: Run) -> Evaluation:
    return _evaluation(str(run.eval_dir), stamp(*(run.eval_dir / f for f in EVAL_FILES)))


def summaries(run: Run) -> tuple[dict | None, dict | None, list[str]]:
    """(caption_metrics.json, retrieval.json, problems) of a run's evaluation, without its large tables."""
    names = ("caption_metrics.json", "retrieval.json")
    return _summaries(str(run.eval_dir), stamp(*(run.eval_dir / n for n in names)))


def held_out_ids(run: Run, products: pd.DataFrame) -> list[int]:
    """The run's held-out product ids that are in the data folder (RunError without split.json)."""
    try:
        split = run.split()
    except (OSError, ValueError, TypeError) as err:
        raise RunError(f"{run.path / 'split.json'} is unreadable ({type(err).__name__}); re-run training") from err
    return [int(i) for i in split.val_ids if int(i) in products.index]


def training_ids(run: Run, products: pd.DataFrame) -> list[int]:
    """The data folder's products the run trained on: the searchable catalog (never a held-out product)."""
    split = run.split()
    held_out = set(int(i) for i in split.val_ids)
    ids = [int(i) for i in split.train_ids if int(i) in products.index]
    # A data folder the run never saw (no overlap with its split) is searched whole, minus held-out ids.
    return ids or [int(i) for i in products.index if int(i) not in held_out]


# ---------------------------------------------------------------- models and indexes


@st.cache_resource(show_spinner="Loading the captioner (once per run)...", max_entries=3)
def _captioner(run_path: str, version: tuple[int, ...]):
    from ris_core.paper_notebook import load_any_captioner  # our model/ folder, or an imported notebook/

    return load_any_captioner(run_path)


def captioner(run: Run):
    """The run's captioner, loaded once (CheckpointError when the checkpoint is missing or corrupt)."""
    return _captioner(str(run.path), model_stamp(run))


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
    return _caption_file(str(run.path), model_stamp(run), str(image_path))


@st.cache_data(show_spinner=False, max_entries=256)
def _query_features(run_path: str, version: tuple[int, ...], image_path: str,
                    image_version: tuple[int, ...]) -> tuple[str, np.ndarray]:
    batch = _captioner(run_path, version).run_batch([open_image(image_path)])
    return batch.captions[0], np.asarray(batch.embeddings[0], dtype=np.float32)


def query_features(run: Run, image_path: Path) -> tuple[str, np.ndarray]:
    """(caption, embedding) of one image file from `run_batch`: the query side of result refinement."""
    return _query_features(str(run.path), model_stamp(run), str(image_path), stamp(image_path))


@st.cache_resource(show_spinner=False, max_entries=3)
def _caption_cache(run_path: str, version: tuple[int, ...]):
    from ris_core.refine import CaptionCache

    # In memory: the dashboard only reads run folders. Keyed by weights, so a retrained model starts afresh.
    return CaptionCache(model_key=f"{run_path}@{'.'.join(map(str, version))}")


def caption_cache(run: Run):
    """Captions and embeddings of result images for refinement, one cache per run and model version."""
    return _caption_cache(str(run.path), model_stamp(run))


@dataclass
class WebImages:
    """Web thumbnails for refinement, fetched by refine's own fetcher (5 s timeout, 2 MB cap), several at a
    time. Each answer, bytes or the error, is kept for `ttl` seconds: reruns neither fetch again nor wait
    again on a host that just timed out. Thread-safe: one instance serves every session."""

    ttl: float = WEB_IMAGE_TTL
    max_items: int = 500  # ~50 kB per thumbnail: at most ~25 MB
    workers: int = 8
    _items: OrderedDict = field(default_factory=OrderedDict, repr=False)  # url -> (when, bytes | None, error)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _fresh(self, url: str) -> tuple | None:
        with self._lock:
            item = self._items.get(url)
        return item if item is not None and time.monotonic() - item[0] < self.ttl else None

    def _fetch(self, url: str) -> tuple:
        from ris_core import refine  # looked up at call time, so tests can patch refine.fetch_url

        try:
            data, error = refine.fetch_url(url), ""
        except Exception as err:  # noqa: BLE001 - any failure costs this one result (refine counts it)
            data, error = None, one_line(f"{type(err).__name__}: {err}")
        item = (time.monotonic(), data, error)
        with self._lock:
            self._items[url] = item
            self._items.move_to_end(url)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return item

    def prefetch(self, urls: list[str]) -> None:
        missing = [u for u in dict.fromkeys(urls) if self._fresh(u) is None]
        if missing:
            with ThreadPoolExecutor(min(self.workers, len(missing))) as pool:
                list(pool.map(self._fetch, missing))

    def __call__(self, url: str) -> bytes:
        from ris_core.refine import FetchError

        _, data, error = self._fresh(url) or self._fetch(url)
        if data is None:
            raise FetchError(error)
        return data


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


@st.cache_resource(show_spinner="Indexing the catalog for text search...", max_entries=4)
def _catalog_index(data_dir: str, data_version: tuple[int, ...], ids: tuple[int, ...]):
    from ris_core.search.catalog import CatalogIndex

    cat = _catalog(data_dir, data_version)
    return CatalogIndex.build(cat.products.loc[list(ids)], cat.image_dir)


def catalog_index(data_dir: Path, ids: list[int]):
    """An in-memory FTS5 index over the given products of the data folder, built once."""
    data_dir = Path(data_dir)
    return _catalog_index(str(data_dir.resolve()), stamp(data_dir / "styles.csv", data_dir / "images"),
                          tuple(int(i) for i in ids))


@st.cache_resource(show_spinner="Embedding the catalog images for the visual baseline (one time)...", max_entries=3)
def _knn_index(run_path: str, model_version: tuple[int, ...], data_dir: str, data_version: tuple[int, ...],
               ids: tuple[int, ...]):
    from ris_core.captioner import embed_paths
    from ris_core.search.image_knn import ImageKnnIndex

    cat = _catalog(data_dir, data_version)
    names = cat.products["productDisplayName"]
    wanted = list(ids)
    saved = Path(run_path) / "eval" / "catalog_knn.npz"
    if saved.is_file():  # the evaluation already embedded the training catalog with this model
        try:
            stored = ImageKnnIndex.load(saved)
            rows = [i for i, pid in enumerate(stored.ids) if int(pid) in cat.products.index]
            if len(rows) >= 0.9 * len(wanted):
                kept = stored.ids[rows]
                return ImageKnnIndex(kept, stored.vectors[rows], [str(cat.image_path(i)) for i in kept],
                                     names.loc[kept].tolist())
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # unreadable, torn or foreign: embed afresh below
    # Embedding a catalog takes a minute on 2 cores: keep the result on disk for the next server start.
    key = json.dumps([run_path, model_version, data_dir, data_version, wanted]).encode()
    cached = Path.cwd() / KNN_CACHE_DIR / f"{hashlib.sha256(key).hexdigest()[:24]}.npz"
    try:
        return ImageKnnIndex.load(cached)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # absent, torn or unreadable: embed afresh
    model = _captioner(run_path, model_version)
    kept, matrix, _ = embed_paths(model, [(i, cat.image_path(i)) for i in wanted], progress=False)
    index = ImageKnnIndex(np.asarray(kept), matrix, [str(cat.image_path(i)) for i in kept], names.loc[kept].tolist())
    try:
        index.save(cached)
    except OSError:
        pass  # a read-only checkout still works, it just embeds again next time
    return index


def knn_index(run: Run, data_dir: Path, ids: list[int]):
    """The image-kNN baseline over the given catalog products, embedded with the run's encoder."""
    data_dir = Path(data_dir)
    return _knn_index(str(run.path), model_stamp(run), str(data_dir.resolve()),
                      stamp(data_dir / "styles.csv", data_dir / "images"), tuple(int(i) for i in ids))


@st.cache_data(show_spinner=False, max_entries=256)
def _photo_caption(run_path: str, version: tuple[int, ...], digest: str, _image) -> tuple[str, np.ndarray, float]:
    started = time.perf_counter()
    with inference_lock():
        batch = _captioner(run_path, version).run_batch([_image])
    return batch.captions[0], np.asarray(batch.embeddings[0], dtype=np.float32), (time.perf_counter() - started) * 1000


def photo_caption(run: Run, digest: str, image) -> tuple[str, np.ndarray, float]:
    """(caption, embedding, milliseconds) of a photo, computed once for all sessions (keyed by its bytes' sha256)."""
    return _photo_caption(str(run.path), model_stamp(run), digest, image)


@st.cache_data(show_spinner=False, max_entries=256)
def _photo_rerank(run_path: str, version: tuple[int, ...], digest: str, greedy: str, exclude: int | None,
                  data_dir: str, data_version: tuple[int, ...], ids: tuple[int, ...], _image,
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
    data_dir = Path(data_dir)
    return _photo_rerank(str(run.path), model_stamp(run), digest, greedy, exclude, str(data_dir.resolve()),
                         stamp(data_dir / "styles.csv", data_dir / "images"), tuple(int(i) for i in ids), image,
                         embedding)


@st.cache_resource(show_spinner=False)
def duckduckgo():
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


def decode_upload(data: bytes):
    """Bytes of an uploaded file -> RGB image; ImageError with a clear message for anything unusable."""
    if not data:
        raise ImageError("the uploaded file is empty")
    return open_image(data)


__all__ = [
    "DataError", "Evaluation", "ImageError", "RunError", "WebImages", "caption_cache", "caption_product",
    "captioner", "catalog", "catalog_index", "decode_upload", "duckduckgo", "evaluation", "held_out_ids", "history",
    "knn_index", "model_stamp", "query_features", "refine_results", "stamp", "thumb", "thumb_uri", "training_ids",
    "web_images",
]
