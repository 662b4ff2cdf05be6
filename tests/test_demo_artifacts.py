"""Precomputed demo files (ris_core/demo_artifacts.py): compact, checked against the run and the catalog, never
trusted when they do not match."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ris_core import demo_artifacts
from ris_core.demo_artifacts import GalleryPhoto
from ris_core.search.image_knn import ImageKnnIndex


def unit_rows(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    vectors = np.abs(np.random.default_rng(seed).normal(size=(n, dim))).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_int8_keeps_the_image_search_nearly_exact() -> None:
    vectors = unit_rows(2000)
    codes, scales = demo_artifacts.quantize(vectors)
    assert codes.dtype == np.int8 and codes.nbytes == vectors.nbytes // 4
    assert np.abs(demo_artifacts.dequantize(codes, scales) - vectors).max() <= scales.max() / 2 + 1e-7
    names = [str(i) for i in range(2000)]
    exact = ImageKnnIndex(np.arange(2000), vectors, names, names)
    compact = ImageKnnIndex(np.arange(2000), demo_artifacts.dequantize(codes, scales), names, names)
    assert demo_artifacts.recall_at_k(exact, compact, unit_rows(50, seed=1)) >= 0.9


@pytest.fixture()
def shipped(tmp_path: Path) -> tuple[Path, Path, list[int], pd.DataFrame]:
    run = tmp_path / "runs" / "demo-run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.safetensors").write_bytes(b"weights v1")
    data = tmp_path / "data"
    products = pd.DataFrame({"productDisplayName": ["Red Shirt", "Blue Jeans", "Black Watch"]},
                            index=pd.Index([11, 12, 13], name="id"))
    ids = [11, 12]
    vectors = unit_rows(2)
    knn = ImageKnnIndex(ids, vectors, ["a", "b"], ["Red Shirt", "Blue Jeans"])
    photo = GalleryPhoto(13, "Black Watch", unit_rows(1)[0], "Titan Black Watch", "catalog name")
    demo_artifacts.save(data, run.name, weights=demo_artifacts.weights_sha256(run),
                        catalog=demo_artifacts.catalog_key(ids, products), knn=knn, photos=[photo],
                        photo_sha=["abc"], recall=0.99)
    return data, run, ids, products


def test_artifacts_load_for_their_run_and_catalog(shipped) -> None:
    data, run, ids, products = shipped
    loaded = demo_artifacts.load(data, run, ids, products)
    assert loaded is not None and loaded.recall_at_10 == 0.99
    assert loaded.photos["abc"].reranked == "Titan Black Watch" and loaded.photos["abc"].product_id == 13
    knn = loaded.knn(products, lambda i: Path(f"/images/{i}.jpg"))
    assert knn.names == ["Red Shirt", "Blue Jeans"] and knn.image_paths[0] == "/images/11.jpg"


@pytest.mark.parametrize("change", ["weights", "catalog", "names", "torn", "arrays", "shrink", "no shrink"])
def test_artifacts_that_do_not_match_are_ignored_with_one_line(shipped, change, caplog) -> None:
    data, run, ids, products = shipped
    npz, meta = demo_artifacts.paths(data, run.name)
    if change == "weights":
        (run / "model" / "model.safetensors").write_bytes(b"weights v2")
    elif change == "catalog":
        ids = [11, 13]
    elif change == "names":
        products.loc[11, "productDisplayName"] = "Green Shirt"
    elif change == "torn":
        npz.write_bytes(npz.read_bytes()[:40])
    elif change in ("shrink", "no shrink"):  # captions made from photos shrunk another way (files before the change)
        info = json.loads(meta.read_text())
        info["shrink"] = "lanczos"
        if change == "no shrink":
            del info["shrink"]
        meta.write_text(json.dumps(info))
    elif change == "arrays":
        meta.write_text(meta.read_text().replace('"photos": [', '"photos": [{"sha256": "x", "product_id": 1, '
                                                  '"greedy": "", "reranked": null, "reranked_origin": ""}, '))
    with caplog.at_level(logging.WARNING, logger="ris_core.demo_artifacts"):
        assert demo_artifacts.load(data, run, ids, products) is None
    assert len(caplog.records) == 1 and "computing live instead" in caplog.records[0].getMessage()


def test_no_artifacts_is_not_a_warning(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert demo_artifacts.load(tmp_path, tmp_path / "run", [1], pd.DataFrame()) is None
    assert not caplog.records
