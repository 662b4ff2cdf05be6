"""Reading styles.csv tolerantly, seeded splits, fingerprints, and the GPT-2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from ris_core.data import DataError, Split, fingerprint, load_catalog, make_split, read_styles, verbatim_overlap
from ris_core.tokenizer import EOS_TOKEN_ID, encode_captions, gpt2_tokenizer
from tests.conftest import copy_catalog

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName\n"


def write_catalog(root: Path, body: str, images: list[int], encoding: str = "utf-8") -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "styles.csv").write_bytes((HEADER + body).encode(encoding))
    for pid in images:
        Image.new("RGB", (6, 8), "white").save(root / "images" / f"{pid}.jpg")
    return root


def test_unquoted_commas_in_names_are_rejoined_not_dropped(tmp_path):
    body = (
        "1,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt\n"
        "2,Men,Personal Care,Fragrance,Perfume and Body Mist,Blue,Spring,2017,Casual,"
        "Boss Men Perfume, After Shave Balm and Shower Gel Set\n"
        "3,Men,Accessories,Ties,Ties,Red,Fall,2011,Formal,Turtle Tie, Cufflink and Pocket Square Combo Set\n"
    )
    catalog = load_catalog(write_catalog(tmp_path, body, [1, 2, 3]))
    assert catalog.report.repaired_names == 2
    assert catalog.products.loc[2, "productDisplayName"] == "Boss Men Perfume, After Shave Balm and Shower Gel Set"
    assert catalog.products.loc[3, "articleType"] == "Ties"
    assert len(catalog) == 3


def test_rows_without_image_name_or_unique_id_are_skipped_and_counted(tmp_path):
    body = (
        "1,Men,Apparel,Topwear,Shirts,Blue,Fall,2011,Casual,Blue Shirt\n"
        "2,Men,Apparel,Topwear,Shirts,Blue,Fall,2011,Casual,No Image Shirt\n"
        "3,Women,Accessories,Bags,Clutches,Red,Fall,2011,Casual,NA\n"
        "1,Men,Apparel,Topwear,Shirts,Blue,Fall,2011,Casual,Duplicate Of One\n"
        "x9,Men,Apparel,Topwear,Shirts,Blue,Fall,2011,Casual,Bad Id\n"
    )
    catalog = load_catalog(write_catalog(tmp_path, body, [1, 3]))
    report = catalog.report
    assert (report.rows_read, report.kept) == (5, 1)
    assert (report.skipped_no_image, report.skipped_no_name, report.skipped_duplicate_id, report.skipped_bad_id) == (
        1, 1, 1, 1)
    assert report.skipped_ids["no_image"] == [2]
    assert "1 without image" in report.summary()
    assert catalog.products.loc[1, "productDisplayName"] == "Blue Shirt"


def test_the_kaggle_folder_is_read_through_datasets_cached_by_content(tmp_path, caplog):
    """styles.csv becomes a cached Arrow table (`datasets`); an edited file, even of the same size and time, is
    read anew; a cache that cannot be written falls back to memory with one warning."""
    import os

    body = "1,Men,Apparel,Topwear,Shirts,Blue,Fall,2011,Casual,Blue Shirt, Slim Fit\n"
    root = write_catalog(tmp_path / "c", body, [1])
    frame, report = read_styles(root / "styles.csv", cache_dir=tmp_path / "cache")
    assert frame.loc[0, "productDisplayName"] == "Blue Shirt, Slim Fit" and report.repaired_names == 1
    assert list((tmp_path / "cache").rglob("*.arrow"))  # built by datasets, on disk
    stat = (root / "styles.csv").stat()
    (root / "styles.csv").write_text(HEADER + body.replace("Blue Shirt", "Grey Shirt"))
    os.utime(root / "styles.csv", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    frame, report = read_styles(root / "styles.csv", cache_dir=tmp_path / "cache")
    assert frame.loc[0, "productDisplayName"] == "Grey Shirt, Slim Fit" and report.repaired_names == 1

    (tmp_path / "not_a_folder").write_text("x")
    frame, report = read_styles(root / "styles.csv", cache_dir=tmp_path / "not_a_folder" / "cache")
    assert frame.loc[0, "productDisplayName"] == "Grey Shirt, Slim Fit" and report.rows_read == 1
    assert "reading it in memory" in caplog.text


def test_cp1252_csv_is_read(tmp_path):
    body = "1,Women,Apparel,Topwear,Tops,Pink,Fall,2011,Casual,Caf\u00e9 Women Pink Top\n"
    catalog = load_catalog(write_catalog(tmp_path, body, [1], encoding="cp1252"))
    assert catalog.products.loc[1, "productDisplayName"] == "Caf\u00e9 Women Pink Top"


@pytest.mark.parametrize("case", ["no_folder", "no_columns", "no_images"])
def test_bad_data_folders_raise_one_clear_error(tmp_path, case):
    if case == "no_folder":
        target, hint = tmp_path / "missing", "does not exist"
    elif case == "no_columns":
        (tmp_path / "images").mkdir()
        (tmp_path / "styles.csv").write_text("id,name\n1,x\n")
        target, hint = tmp_path, "lacks the columns"
    else:
        (tmp_path / "styles.csv").write_text(HEADER)
        target, hint = tmp_path, "images"
    with pytest.raises(DataError, match=hint):
        load_catalog(target)


def test_styles_cache_follows_the_environment(tmp_path, monkeypatch):
    """The Arrow cache goes where $RIS_DATASETS_CACHE says at the time of the call (tests and servers move it)."""
    root = copy_catalog(tmp_path / "catalog", 5)
    monkeypatch.setenv("RIS_DATASETS_CACHE", str(tmp_path / "elsewhere"))
    frame, _ = read_styles(root / "styles.csv")
    assert len(frame) == 5
    assert list((tmp_path / "elsewhere").rglob("*.arrow"))


def test_demo_catalog_is_clean():
    frame, report = read_styles(Path(__file__).resolve().parent.parent / "data" / "demo" / "styles.csv")
    catalog = load_catalog(Path(__file__).resolve().parent.parent / "data" / "demo")
    assert len(catalog) == len(frame) >= 1000
    assert report.rows_read == len(frame)


def test_split_is_seeded_deterministic_and_disjoint(tmp_path):
    ids = list(range(1000, 3000, 3))
    a, b = make_split(ids, 0.1, seed=7), make_split(list(reversed(ids)), 0.1, seed=7)
    assert a == b
    assert set(a.train_ids).isdisjoint(a.val_ids)
    assert sorted(a.train_ids + a.val_ids) == sorted(ids)
    assert len(a.val_ids) == round(len(ids) * 0.1)
    assert make_split(ids, 0.1, seed=8).val_ids != a.val_ids
    a.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json") == a
    with pytest.raises(ValueError):
        make_split(ids, 1.5)


def test_fingerprint_and_overlap():
    assert fingerprint([3, 1, 2]) == fingerprint([1, 2, 3])
    assert fingerprint([1, 2, 3]) != fingerprint([1, 2, 4])
    assert verbatim_overlap(["Blue Shirt", "Red Shoes"], ["blue shirt ", "Green Cap"]) == 0.5


def test_gpt2_tokenizer_round_trip_and_eos():
    tokenizer = gpt2_tokenizer()
    assert tokenizer.vocab_size == 50257
    text = "Turtle Check Men Navy Blue Shirt"
    (ids,) = encode_captions([text])
    assert ids[-1] == EOS_TOKEN_ID
    assert ids[:-1] == [51, 17964, 6822, 6065, 8565, 4518, 45180]  # GPT-2's own BPE ids
    assert tokenizer.decode(ids[:-1]) == text
    assert len(encode_captions(["word " * 200], max_length=16)[0]) == 16
