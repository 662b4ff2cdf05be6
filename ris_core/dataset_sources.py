"""Any copy of the product data, read through `datasets`, as the Kaggle layout the rest of RIS Eval reads.

    folder = kaggle_layout("products.parquet")                 # or a folder of parquet files, an Arrow dataset
    folder = kaggle_layout("photos/")                           # an imagefolder (images + metadata.csv)
    folder = kaggle_layout("ashraq/fashion-product-images-small")   # a Hub dataset id (needs the Hub)
    catalog = load_catalog(folder)                              # ris_core.data; load_catalog calls this itself

A source holds one row per product: an image column (a `datasets.Image` feature, or for an imagefolder the image
file, whose stem is the id when no id column is given), a text column (the name the captioner learns), a numeric
id column (the split is keyed by it, so a run trained on one copy evaluates on another) and, where present, the
attribute columns the relevance levels use (articleType, gender, baseColour, ... under their Kaggle names, or
renamed with `SourceColumns.rename`). It is written once as `styles.csv` + `images/<id>.jpg` under
`.cache/datasets/<name>-<fingerprint>/` (`$RIS_DATASETS_CACHE` moves it; atomically; reused while the source is
unchanged); undecodable images are skipped with one warning line, and a source without the needed columns is one
`DataError` naming them.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from ris_core.errors import DataError
from ris_core.files import digest
from ris_core.kaggle_layout import COLUMNS

logger = logging.getLogger(__name__)
CACHE_DIR = Path(".cache") / "datasets"  # under the working directory, unless $RIS_DATASETS_CACHE says elsewhere
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TEXT_COLUMNS = ("productDisplayName", "text", "caption", "title", "name")
ID_COLUMNS = ("id", "item_ID", "product_id", "productId")


@dataclass(frozen=True)
class SourceColumns:
    """Which columns hold what; None = found by name (the first of the usual names present)."""

    image: str | None = None
    text: str | None = None
    id: str | None = None
    rename: dict[str, str] = field(default_factory=dict)  # source column -> Kaggle column (e.g. "type": "articleType")

    @classmethod
    def parse(cls, image: str | None = None, text: str | None = None, id: str | None = None,
              rename: list[str] | None = None) -> SourceColumns:
        """From CLI flags; `rename` items are "source=kaggle" (e.g. "category=articleType")."""
        pairs = {}
        for item in rename or []:
            source, sep, target = item.partition("=")
            if not sep or not source or target not in COLUMNS:
                raise DataError(f"--rename_column {item!r}: expected source=target with target one of {COLUMNS}")
            pairs[source] = target
        return cls(image=image, text=text, id=id, rename=pairs)


def datasets_cache_dir() -> Path:
    """Where Arrow caches and Kaggle-layout copies go, read at each call so a test session or a server can move it."""
    return Path(os.environ.get("RIS_DATASETS_CACHE") or CACHE_DIR)


def is_kaggle_folder(source: str | Path) -> bool:
    return (Path(source) / "styles.csv").is_file()


def kaggle_layout(source: str | Path, columns: SourceColumns | None = None, cache_dir: Path | None = None) -> Path:
    """`source` itself when it is a Kaggle folder, else its Kaggle-layout copy (written on first use)."""
    if is_kaggle_folder(source):
        return Path(source)
    cache_dir = cache_dir or datasets_cache_dir()
    columns = columns or SourceColumns()
    dataset = open_dataset(str(source))
    name = re.sub(r"[^\w.-]+", "-", Path(str(source)).stem if Path(str(source)).exists() else str(source))[:60]
    out = Path(cache_dir) / f"{name}-{digest(dataset._fingerprint, asdict(columns))}"
    if is_kaggle_folder(out):
        return out
    _write_kaggle_layout(dataset, columns, out, source=str(source))
    return out


def to_dataset(catalog):  # a ris_core.data.Catalog (not imported: data imports this module)
    """A catalog (any source `load_catalog` reads) as a `datasets.Dataset`: id, the Kaggle columns and the image
    bytes in an `Image` column, e.g. `.to_parquet(path)` or `.push_to_hub(repo)`; reads back as the same catalog."""
    import datasets

    rows = catalog.products.reset_index()
    columns = {c: [None if pd.isna(v) else str(v) for v in rows[c]] for c in COLUMNS if c not in ("id", "year")}
    images = [{"bytes": catalog.image_path(int(pid)).read_bytes(), "path": None} for pid in rows["id"]]
    data = datasets.Dataset.from_dict({"id": rows["id"].astype(int).tolist(), **columns,
                                       "year": [None if pd.isna(v) else int(v) for v in rows["year"]],
                                       "image": images})
    return data.cast_column("image", datasets.Image())


def open_dataset(source: str):
    """The source as one `datasets.Dataset`: parquet (file or folder), a saved Arrow dataset, an imagefolder,
    or a Hub id. DataError (one line) when it is none of them or cannot be reached."""
    import datasets

    path = Path(source)
    try:
        if path.is_file() and path.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        if path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        if path.is_dir() and any(path.glob("*.parquet")):
            return datasets.load_dataset("parquet", data_files=str(path / "*.parquet"), split="train")
        if path.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
    except DataError:
        raise
    except Exception as err:  # datasets raises many types for unreadable files
        raise DataError(f"{source} could not be read as a dataset ({type(err).__name__}: {err})") from err
    if path.exists() or not HUB_ID.match(source):
        raise DataError(f"{source} is not a data source: pass a Kaggle folder (styles.csv + images/), a parquet "
                        "file or folder, a saved Arrow dataset, an imagefolder, or a Hub dataset id")
    try:
        return datasets.load_dataset(source, split="train")
    except Exception as err:  # offline, unknown or gated repo: the hub client raises many types
        raise DataError(f"{source} is not a local folder or file, and as a Hub dataset id it could not be loaded "
                        f"({type(err).__name__}): on a machine with the Hub, save it with datasets.load_dataset("
                        f"'{source}', split='train').to_parquet('products.parquet') and pass that file") from err


def _resolve(dataset, columns: SourceColumns, source: str) -> tuple[str, str, str | None]:
    """(image column, text column, id column or None for file stems), or DataError naming what is missing."""
    import datasets

    names = list(dataset.column_names)
    images = [c for c, f in dataset.features.items() if isinstance(f, datasets.Image)]
    image = columns.image or (images[0] if images else None)
    text = columns.text or next((c for c in TEXT_COLUMNS if c in names), None)
    pid = columns.id or next((c for c in ID_COLUMNS if c in names), None)
    missing = [f"{what} (--{what}_column)" for what, value in (("image", image), ("text", text))
               if value is None or value not in names]
    if columns.id and columns.id not in names:
        missing.append("id (--id_column)")
    if missing:
        raise DataError(f"{source} has no {' and no '.join(missing)} column; its columns are {names}")
    return image, text, pid


def _write_kaggle_layout(dataset, columns: SourceColumns, out: Path, source: str) -> None:
    import datasets

    image_column, text_column, id_column = _resolve(dataset, columns, source)
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))  # the stored bytes, as they are
    kaggle_of = {**{c: c for c in COLUMNS if c in dataset.column_names}, **columns.rename, text_column:
                 "productDisplayName"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    (tmp / "images").mkdir()
    lines, bad, seen = [",".join(COLUMNS)], [], set()
    try:
        for row in dataset:
            stored = row[image_column] or {}
            pid = row.get(id_column) if id_column else Path(stored.get("path") or "").stem
            try:
                pid = int(str(pid).strip())
            except ValueError:
                raise DataError(f"{source}: product id {pid!r} is not a number; the split is keyed by numeric ids "
                                "(pass --id_column)") from None
            if pid in seen:
                continue  # as load_catalog does with a repeated id: the first row wins
            seen.add(pid)
            if not _write_image(stored, tmp / "images" / f"{pid}.jpg"):
                bad.append(pid)
                continue
            values = {kaggle_of.get(c, c): row[c] for c in row if kaggle_of.get(c) in COLUMNS}
            values["id"] = pid
            # Kaggle's own format: unquoted fields, the name last (load_catalog rejoins a name's commas)
            name = re.sub(r"[\r\n]+", " ", str(values.get("productDisplayName") or ""))  # as given, on one line
            fields = [_field(values.get(c)) for c in COLUMNS[:-1]] + [name]
            lines.append(",".join(fields))
        if bad:
            logger.warning("%s: %d of %d images could not be decoded and were skipped (ids %s%s)", source, len(bad),
                           len(seen), ", ".join(map(str, bad[:5])), ", ..." if len(bad) > 5 else "")
        if len(lines) == 1:
            raise DataError(f"{source}: no product with a decodable image ({len(bad)} undecodable)")
        (tmp / "styles.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, out)
        except OSError:  # another process wrote the same copy first: keep theirs
            if not is_kaggle_folder(out):
                raise
        logger.info("%s: %d products written as the Kaggle layout in %s", source, len(lines) - 1, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _field(value: object) -> str:
    """An attribute as one unquoted CSV field (Kaggle's file never quotes; only the last field may hold commas)."""
    return "" if value is None else re.sub(r"[,\r\n]+", " ", str(value)).strip()


def _write_image(stored: dict, path: Path) -> bool:
    """The image as a JPEG file (JPEG bytes kept as they are); False when it does not decode."""
    data = stored.get("bytes")
    if data is None and stored.get("path") and Path(stored["path"]).is_file():
        data = Path(stored["path"]).read_bytes()
    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format == "JPEG":
                path.write_bytes(data)
            else:
                image.convert("RGB").save(path, format="JPEG", quality=95)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return False
    return True
