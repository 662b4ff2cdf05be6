"""Any copy of the data through `datasets`: a parquet and an imagefolder written here from the demo data read as
the Kaggle folder does, train, evaluate and open the dashboard; a run trained on one copy evaluates on another."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import datasets
import pandas as pd
import pytest
from PIL import Image

from ris_core.data import load_catalog
from ris_core.dataset_sources import SourceColumns, kaggle_layout, to_dataset
from ris_core.errors import DataError
from tests.conftest import tiny_train_args


def kaggle_rows(catalog_dir: Path) -> pd.DataFrame:
    return load_catalog(catalog_dir).products.reset_index()


def write_parquet(catalog_dir: Path, dest: Path, rename: dict[str, str] | None = None,
                  broken: set[int] = frozenset()) -> Path:
    """The catalog as a parquet with the image bytes inside (as the Hub copies of this dataset are)."""
    data = to_dataset(load_catalog(catalog_dir))
    if broken:
        data = data.cast_column("image", datasets.Image(decode=False)).map(
            lambda row: {"image": {"bytes": b"not an image", "path": None}} if row["id"] in broken else {})
    data.rename_columns(rename or {}).to_parquet(str(dest))
    return dest


def write_imagefolder(catalog_dir: Path, dest: Path) -> Path:
    """An imagefolder: image files (PNG here) and a metadata.csv; the id is the file's stem."""
    rows = kaggle_rows(catalog_dir)
    dest.mkdir(parents=True)
    for pid in rows["id"]:
        Image.open(catalog_dir / "images" / f"{pid}.jpg").save(dest / f"{pid}.png")
    meta = rows.drop(columns="id").assign(file_name=[f"{pid}.png" for pid in rows["id"]])
    meta.rename(columns={"productDisplayName": "text"}).to_csv(dest / "metadata.csv", index=False)
    return dest


@pytest.fixture(scope="module")
def sources(tiny_catalog: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {"parquet": write_parquet(tiny_catalog, root / "products.parquet"),
            "imagefolder": write_imagefolder(tiny_catalog, root / "photos")}


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Kaggle-layout copies land in .cache/datasets/ here


@pytest.mark.parametrize("kind", ["parquet", "imagefolder"])
def test_a_copy_reads_as_the_kaggle_folder_does(kind: str, sources, tiny_catalog: Path):
    expected, got = load_catalog(tiny_catalog), load_catalog(sources[kind])
    products = expected.products
    if kind == "imagefolder":  # its metadata.csv is read by pandas, for which Kaggle's literal "NA" is missing
        products = products.replace({"NA": None}).fillna(value=pd.NA).astype(products.dtypes)
    pd.testing.assert_frame_equal(got.products, products, check_exact=True)
    pid = int(expected.products.index[0])
    original = Image.open(expected.image_path(pid)).convert("RGB")
    copied = Image.open(got.image_path(pid)).convert("RGB")
    assert original.size == copied.size
    if kind == "parquet":  # JPEG bytes are kept as they are
        assert got.image_path(pid).read_bytes() == expected.image_path(pid).read_bytes()
    assert kaggle_layout(sources[kind]) == got.image_dir.parent  # written once, then reused


def test_columns_by_flag_and_renamed_attributes(tiny_catalog: Path, tmp_path: Path):
    source = write_parquet(tiny_catalog, tmp_path / "renamed.parquet",
                           rename={"id": "item_ID", "productDisplayName": "title", "articleType": "type",
                                   "image": "photo"})
    columns = SourceColumns.parse(image="photo", text="title", id="item_ID", rename=["type=articleType"])
    got = load_catalog(source, columns=columns).products
    pd.testing.assert_frame_equal(got[["productDisplayName", "articleType"]],
                                  load_catalog(tiny_catalog).products[["productDisplayName", "articleType"]])
    with pytest.raises(DataError, match=r"no text \(--text_column\) column; its columns are \[.*'label'"):
        load_catalog(write_parquet(tiny_catalog, tmp_path / "untitled.parquet",
                                   rename={"productDisplayName": "label"}))
    with pytest.raises(DataError, match="--rename_column 'type': expected source=target"):
        SourceColumns.parse(rename=["type"])


def test_undecodable_images_are_skipped_with_one_line(tiny_catalog: Path, tmp_path: Path, caplog):
    ids = kaggle_rows(tiny_catalog)["id"].tolist()
    source = write_parquet(tiny_catalog, tmp_path / "broken.parquet", broken={ids[0], ids[1]})
    with caplog.at_level(logging.WARNING, logger="ris_core.dataset_sources"):
        got = load_catalog(source).products
    assert len(got) == len(ids) - 2 and ids[0] not in got.index
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"2 of {len(ids)} images could not be decoded" in lines[0]
    with pytest.raises(DataError, match="no product with a decodable image"):
        load_catalog(write_parquet(tiny_catalog, tmp_path / "all-broken.parquet", broken=set(ids)))


def test_a_hub_dataset_id_loads_through_datasets_and_fails_soft_offline(tiny_catalog: Path, tmp_path: Path,
                                                                        monkeypatch):
    parquet = write_parquet(tiny_catalog, tmp_path / "hub.parquet")
    asked = []

    def fake_load(path, *args, split=None, **kwargs):
        asked.append(path)
        if path == "ashraq/fashion-product-images-small":
            return datasets.Dataset.from_parquet(str(parquet))
        raise ConnectionError("Couldn't reach 'Marqo/KAGL' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    got = load_catalog("ashraq/fashion-product-images-small").products
    assert asked == ["ashraq/fashion-product-images-small"] and len(got) == len(kaggle_rows(tiny_catalog))
    with pytest.raises(DataError, match="Marqo/KAGL is not a local folder or file, and as a Hub dataset id it "
                                        "could not be loaded .*to_parquet"):
        load_catalog("Marqo/KAGL")


def test_not_a_data_source_is_one_line(tmp_path: Path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataError):
        load_catalog(text)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="could not be read as a dataset"):
        load_catalog(corrupt)


@pytest.mark.slow
def test_train_evaluate_and_the_dashboard_on_each_copy(sources, tiny_catalog: Path, tmp_path: Path, monkeypatch):
    """A run trained on the parquet evaluates on the parquet and on the imagefolder (same held-out ids)."""
    from streamlit.testing.v1 import AppTest

    from training.evaluate import main as evaluate_main
    from training.train import main as train_main

    run = train_main(tiny_train_args(sources["parquet"], tmp_path / "runs", tmp_path / "cache", name="parquet",
                                     epochs=1))
    info = json.loads((run / "run.json").read_text())
    assert info["data"]["data_dir"] == str(sources["parquet"]) and info["data"]["train"] > 0
    evaluate_main(["--run", str(run), "--quiet", "--n_boot", "20", "--refine_queries", "4"])  # its own copy
    on_parquet = pd.read_csv(run / "eval" / "captions.csv", keep_default_na=False)
    other = shutil.copytree(run, tmp_path / "runs" / "parquet-on-imagefolder", ignore=shutil.ignore_patterns("eval"))
    evaluate_main(["--run", str(other), "--data_dir", str(sources["imagefolder"]), "--quiet", "--n_boot", "20",
                   "--refine_queries", "4"])
    on_folder = pd.read_csv(other / "eval" / "captions.csv", keep_default_na=False)
    assert on_parquet["id"].tolist() == on_folder["id"].tolist() == json.loads((run / "split.json").read_text())[
        "val_ids"]
    assert (on_parquet["reference"] == on_folder["reference"]).all()

    folder_run = train_main(tiny_train_args(sources["imagefolder"], tmp_path / "runs", tmp_path / "cache",
                                            name="imagefolder", epochs=1))
    assert json.loads((folder_run / "split.json").read_text()) == json.loads((run / "split.json").read_text())
    evaluate_main(["--run", str(folder_run), "--quiet", "--n_boot", "20", "--refine_queries", "4"])
    assert pd.read_csv(folder_run / "eval" / "captions.csv")["id"].tolist() == on_parquet["id"].tolist()

    monkeypatch.setenv("RIS_RUNS_DIRS", str(tmp_path / "runs"))
    for source in sources.values():
        monkeypatch.setenv("RIS_DATA_DIR", str(source))
        at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "dashboard.py"), default_timeout=120)
        at.session_state["_keep_sidebar_run"] = str(run.resolve())
        at.run()
        at.switch_page("pages/search_demo.py").run()
        assert not at.exception, [e.value for e in at.exception]
        assert "Caption:" in "\n".join(str(m.value) for m in at.markdown)


def test_image_bytes_written_as_jpeg(tmp_path: Path):
    from ris_core.dataset_sources import _write_image

    png = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(png, format="PNG")
    assert _write_image({"bytes": png.getvalue()}, tmp_path / "a.jpg")
    assert Image.open(tmp_path / "a.jpg").format == "JPEG" and Image.open(tmp_path / "a.jpg").size == (8, 6)
    assert not _write_image({"bytes": b"\x89PNG broken"}, tmp_path / "b.jpg")
    assert not _write_image({"bytes": None, "path": None}, tmp_path / "c.jpg")
