"""What the search demo ships precomputed for one run over one catalog, so a cold server answers at once.

    data/demo/precomputed/<run>.npz   the catalog's image embeddings as int8 (+ one scale per row), and the
                                      gallery photos' embeddings as float16
    data/demo/precomputed/<run>.json  the weights' sha256, the catalog it was built for, and per gallery photo
                                      (by the sha256 of its bytes) its greedy and reranked captions, and how
                                      the photos were shrunk to the training images' size

Built by `python -m training.precompute_demo` with the same functions the demo calls live; int8 costs the image
search some recall, measured at build time and recorded (`recall_at_10`). Artefacts that do not match the run's
weights, the catalog or the shrink are ignored with one log line: the demo then computes everything as before.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ris_core.files import atomic_path, digest, file_sha256, write_json_atomic
from ris_core.images import SHRINK_NAME
from ris_core.search.image_knn import ImageKnnIndex

logger = logging.getLogger(__name__)
VERSION = 1
FOLDER = "precomputed"  # inside the data folder


@dataclass(frozen=True)
class GalleryPhoto:
    product_id: int
    greedy: str
    embedding: np.ndarray  # (D,) float32, as the captioner returned it (stored as float16)
    reranked: str | None  # None: the run's captioner cannot rerank
    reranked_origin: str  # "greedy", "beam" or "catalog name"


def weights_sha256(run_path: Path) -> str:
    """The content of the run's weights (not their mtimes: a fresh clone has new ones)."""
    files = sorted([*(run_path / "model").glob("*.safetensors"), *(run_path / "notebook").glob("*.safetensors")])
    return digest([(f.name, file_sha256(f)) for f in files])


def catalog_key(ids: list[int], products: pd.DataFrame) -> str:
    return digest([int(i) for i in ids], products.loc[ids, "productDisplayName"].astype(str).tolist())


def paths(data_dir: Path, run_name: str) -> tuple[Path, Path]:
    base = Path(data_dir) / FOLDER / run_name
    return base.with_suffix(".npz"), base.with_suffix(".json")


def quantize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: (codes, scales) with vectors ~= codes * scales[:, None]."""
    scales = np.abs(vectors).max(axis=1) / 127.0
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    return np.round(vectors / scales[:, None]).astype(np.int8), scales


def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scales[:, None]


def recall_at_k(exact: ImageKnnIndex, compact: ImageKnnIndex, queries: np.ndarray, k: int = 10) -> float:
    """Share of the exact top-k neighbours the compact index also returns in its top k."""
    found = [len({r.product_id for r in exact.search_vector(q, k).results}
                 & {r.product_id for r in compact.search_vector(q, k).results}) for q in queries]
    return float(np.mean(found) / k) if found else 1.0


def save(data_dir: Path, run_name: str, *, weights: str, catalog: str, knn: ImageKnnIndex,
         photos: list[GalleryPhoto], photo_sha: list[str], recall: float,
         arithmetic: str | None = None) -> tuple[Path, Path]:
    npz, meta = paths(data_dir, run_name)
    codes, scales = quantize(knn.vectors)
    embeddings = np.stack([p.embedding for p in photos]) if photos else np.zeros((0, knn.dim))
    with atomic_path(npz) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, knn_ids=knn.ids, knn_codes=codes, knn_scales=scales,
                            photo_embeddings=embeddings.astype(np.float16))
    write_json_atomic(meta, {
        "version": VERSION, "run": run_name, "weights_sha256": weights, "catalog_key": catalog,
        "shrink": SHRINK_NAME,  # the gallery photos are larger than the training images: captioned after a shrink
        "backbone_arithmetic": arithmetic,  # where bf16 was emulated, a few captions differ from native bf16's
        "knn_rows": len(knn), "recall_at_10": round(recall, 4),
        "photos": [{"sha256": sha, "product_id": p.product_id, "greedy": p.greedy, "reranked": p.reranked,
                    "reranked_origin": p.reranked_origin} for sha, p in zip(photo_sha, photos, strict=True)],
    })
    return npz, meta


@dataclass
class DemoArtifacts:
    knn_ids: np.ndarray
    knn_vectors: np.ndarray  # dequantized float32
    photos: dict[str, GalleryPhoto]  # by the sha256 of the photo's bytes
    recall_at_10: float

    def knn(self, products: pd.DataFrame, image_path) -> ImageKnnIndex:
        return ImageKnnIndex(self.knn_ids, self.knn_vectors, [str(image_path(int(i))) for i in self.knn_ids],
                             products.loc[self.knn_ids, "productDisplayName"].astype(str).tolist())


def load(data_dir: Path, run_path: Path, ids: list[int], products: pd.DataFrame) -> DemoArtifacts | None:
    """The artefacts for this run over these catalog products, or None (missing, foreign or stale: logged)."""
    npz, meta = paths(data_dir, Path(run_path).name)
    if not (npz.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        if info.get("version") != VERSION:
            raise ValueError(f"version {info.get('version')!r}, expected {VERSION}")
        if info.get("weights_sha256") != weights_sha256(Path(run_path)):
            raise ValueError("they were built with other weights")
        if info.get("catalog_key") != catalog_key(ids, products):
            raise ValueError("they were built for another catalog")
        if info.get("shrink", "bilinear") != SHRINK_NAME:
            raise ValueError(f"their captions saw photos shrunk {info.get('shrink', 'bilinear')}, not {SHRINK_NAME}")
        with np.load(npz, allow_pickle=False) as arrays:  # arrays only: never unpickle
            knn_ids, codes, scales = arrays["knn_ids"], arrays["knn_codes"], arrays["knn_scales"]
            embeddings = arrays["photo_embeddings"].astype(np.float32)
        if [int(i) for i in knn_ids] != [int(i) for i in ids] or len(embeddings) != len(info["photos"]):
            raise ValueError("their arrays do not match their description")
        photos = {p["sha256"]: GalleryPhoto(int(p["product_id"]), str(p["greedy"]), embeddings[row],
                                            p["reranked"], str(p["reranked_origin"]))
                  for row, p in enumerate(info["photos"])}
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        logger.warning("ignoring the precomputed demo files %s (%s): computing live instead", npz.name, err)
        return None
    return DemoArtifacts(knn_ids, dequantize(codes, scales), photos, float(info.get("recall_at_10", float("nan"))))
