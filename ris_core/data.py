"""The Fashion Product Images table: tolerant `styles.csv` reading (through `datasets`), image lookup, seeded splits.

Either Kaggle layout works: `styles.csv` beside `images/<id>.jpg` (full resolution, the 60x80
"small" variant, or the demo catalog this repo ships in `data/demo`).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ris_core.dataset_sources import datasets_cache_dir, kaggle_layout
from ris_core.errors import DataError, RunError
from ris_core.files import write_json_atomic
from ris_core.kaggle_layout import COLUMNS
from ris_core.schema import IDS, problems

logger = logging.getLogger(__name__)
MISSING_NAMES = {"", "NA", "N/A", "NAN", "NULL", "NONE"}  # the original writes "NA" for 7 missing names
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"


@dataclass
class LoadReport:
    """What reading a catalog kept, repaired and skipped; never silent."""

    data_dir: str
    rows_read: int = 0
    repaired_names: int = 0
    kept: int = 0
    skipped_no_image: int = 0
    skipped_no_name: int = 0
    skipped_duplicate_id: int = 0
    skipped_bad_id: int = 0
    skipped_ids: dict[str, list[int]] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.kept:,} products from {self.rows_read:,} rows "
            f"({self.repaired_names} names with commas repaired; skipped: "
            f"{self.skipped_no_image} without image, {self.skipped_no_name} without name, "
            f"{self.skipped_duplicate_id} duplicate ids, {self.skipped_bad_id} bad ids)"
        )


@dataclass
class Catalog:
    """Products (one row per id, index = id) plus where their images are."""

    products: pd.DataFrame
    image_dir: Path
    report: LoadReport

    def image_path(self, product_id: int) -> Path:
        return self.image_dir / f"{int(product_id)}.jpg"

    def __len__(self) -> int:
        return len(self.products)


def decode_text(raw: bytes) -> str | None:
    """UTF-8 (BOM or not), UTF-16 with a BOM (Excel's "Unicode text"), else Windows-1252; None if none fits."""
    encodings = ("utf-16",) if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else ("utf-8-sig", "cp1252")
    for encoding in encodings:
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        # NULs mean binary data or UTF-16 without a BOM; cp1252 would "decode" either into garbage
        return None if "\x00" in text else text
    return None


def _decode(raw: bytes, path: Path) -> str:
    text = decode_text(raw)
    if text is None:
        raise DataError(f"{path}: not UTF-8, UTF-16 or cp1252 text; re-save it as UTF-8 CSV")
    return text


def _unquote(name: str) -> str:
    """A name another tool wrote quoted ("a, b") loses its quotes; Kaggle's bare 3.5" stays as it is."""
    if len(name) >= 2 and name[0] == name[-1] == '"':
        return name[1:-1].replace('""', '"')
    return name


REPAIRED = "__repaired"  # per row: its name was rejoined from unquoted commas (counted in the report)


def read_styles(path: Path, cache_dir: Path | None = None) -> tuple[pd.DataFrame, LoadReport]:
    """Read a Kaggle `styles.csv` through `datasets`, rejoining names that hold unquoted commas.

    The original file has 22 lines where `productDisplayName` (the last column) contains commas without quotes;
    pandas' and `datasets`' CSV readers drop or split them, so `datasets` builds the table from our own tolerant
    rows (`Dataset.from_generator`, cached as Arrow under `cache_dir` (default `datasets_cache_dir()`), keyed by
    the file's bytes).
    """
    path = Path(path)
    cache_dir = cache_dir or datasets_cache_dir()
    if not path.is_file():
        raise DataError(f"{path} not found: point --data_dir at a folder holding styles.csv and images/")
    raw = path.read_bytes()
    text = _decode(raw, path)
    header = _styles_header(text, path)
    if any(line.strip() for line in text.splitlines()[1:]):
        frame = _styles_dataset(path, hashlib.sha256(raw).hexdigest(), header, cache_dir).to_pandas()
    else:  # a header alone: `datasets` cannot build a table of no rows
        frame = pd.DataFrame(columns=[*header, REPAIRED])
    report = LoadReport(data_dir=str(path.parent), rows_read=len(frame),
                        repaired_names=int(frame[REPAIRED].astype(bool).sum()))
    frame = frame[COLUMNS].fillna("").apply(lambda col: col.str.strip())
    return frame, report


def _styles_header(text: str, path: Path) -> list[str]:
    try:
        header = [h.strip() for h in next(csv.reader(io.StringIO(text), quoting=csv.QUOTE_NONE), [])]
    except csv.Error as err:
        raise DataError(f"{path} is not a readable CSV ({err})") from err
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"{path} lacks the columns {missing}; expected the Kaggle styles.csv header: {','.join(COLUMNS)}"
        )
    return header


def _styles_dataset(path: Path, sha256: str, header: list[str], cache_dir: Path):
    """The rows of `path` as a `datasets.Dataset` of strings (plus REPAIRED), built once per file content."""
    import datasets

    features = datasets.Features({**{h: datasets.Value("string") for h in header}, REPAIRED: datasets.Value("bool")})
    rows = {"path": str(path), "sha256": sha256}  # the digest keys the cache: an edited file is read anew
    try:
        return datasets.Dataset.from_generator(_styles_rows, features=features, cache_dir=str(cache_dir),
                                               gen_kwargs=rows)
    except OSError as err:  # the cache cannot be written (read-only checkout, full disk): build it in memory
        logger.warning("%s: no Arrow cache in %s (%s); reading it in memory", path, cache_dir, err)
        return datasets.Dataset.from_list(list(_styles_rows(**rows)), features=features)
    except datasets.exceptions.DatasetGenerationError as err:
        if isinstance(err.__cause__, DataError):
            raise err.__cause__ from None
        raise DataError(f"{path} could not be read ({type(err.__cause__ or err).__name__}: {err})") from err


def _styles_rows(path: str, sha256: str):
    """Kaggle's rows, one dict each. Kaggle's file never quotes: QUOTE_NONE keeps a stray quote from swallowing
    the following lines; a row longer than the header has its extra fields rejoined into the name (last)."""
    del sha256  # the cache key only
    rows = csv.reader(io.StringIO(_decode(Path(path).read_bytes(), Path(path))), quoting=csv.QUOTE_NONE)
    header = [h.strip() for h in next(rows)]
    width, name_at = len(header), header.index("productDisplayName")
    try:
        for fields in rows:
            if not fields:
                continue
            repaired = len(fields) > width and name_at == width - 1
            if repaired:
                fields = fields[: width - 1] + [",".join(fields[width - 1 :])]
            fields = (fields + [""] * width)[:width]
            fields[name_at] = _unquote(fields[name_at])
            yield {**dict(zip(header, fields)), REPAIRED: repaired}
    except csv.Error as err:  # e.g. a NUL byte, a stray CR
        raise DataError(f"{path}: line {rows.line_num} is not valid CSV ({err})") from err


def load_catalog(data_dir: str | Path, require_images: bool = True, columns=None) -> Catalog:
    """Load a Kaggle-layout folder into a clean product table (index = integer id).

    Any other copy of the data (a parquet file or folder, a saved Arrow dataset, an imagefolder, a Hub dataset
    id) is read through `datasets` and written once as the Kaggle layout (`ris_core.dataset_sources`; `columns`:
    a `SourceColumns` saying which column is which). Rows without a name, without an image file, or with a
    repeated or non-numeric id are skipped and counted in `Catalog.report`.
    """
    data_dir = Path(data_dir)
    if _other_source(data_dir):
        data_dir = kaggle_layout(str(data_dir), columns)
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist: pass a folder with styles.csv and images/")
    frame, report = read_styles(data_dir / "styles.csv")
    image_dir = data_dir / "images"
    if require_images and not image_dir.is_dir():
        raise DataError(f"{image_dir} does not exist: the Kaggle layout keeps images/<id>.jpg beside styles.csv")

    ids = pd.to_numeric(frame["id"], errors="coerce")
    bad = ids.isna()
    report.skipped_bad_id = int(bad.sum())
    frame = frame[~bad].assign(id=ids[~bad].astype(np.int64))

    no_name = frame["productDisplayName"].str.upper().isin(MISSING_NAMES)
    report.skipped_no_name = int(no_name.sum())
    report.skipped_ids["no_name"] = frame.loc[no_name, "id"].tolist()
    frame = frame[~no_name]

    dup = frame["id"].duplicated(keep="first")
    report.skipped_duplicate_id = int(dup.sum())
    report.skipped_ids["duplicate_id"] = frame.loc[dup, "id"].tolist()
    frame = frame[~dup]

    if require_images:
        on_disk = {int(p.stem) for p in image_dir.glob("*.jpg") if p.stem.isdigit()}
        has_image = frame["id"].isin(on_disk)
        report.skipped_no_image = int((~has_image).sum())
        report.skipped_ids["no_image"] = frame.loc[~has_image, "id"].tolist()
        frame = frame[has_image]

    frame = frame.replace("", np.nan)
    frame["year"] = pd.to_numeric(frame["year"], errors="coerce").astype("Int64")
    frame = frame.set_index("id").sort_index()
    report.kept = len(frame)
    if report.kept == 0:
        raise DataError(f"{data_dir}: no usable products (see: {report.summary()})")
    return Catalog(products=frame, image_dir=image_dir, report=report)


def _other_source(path: Path) -> bool:
    """A source `datasets` reads: a parquet file, a folder that is not a Kaggle one, or a Hub id (owner/name)."""
    if path.is_file():
        return path.suffix == ".parquet"
    if path.is_dir():
        return not (path / "styles.csv").exists() and not (path / "images").is_dir()
    parts = path.parts
    return len(parts) == 2 and not str(path).startswith((".", "/")) and all(p.strip() for p in parts)


@dataclass
class Split:
    """Which product ids train and which are held out; saved in every run."""

    seed: int
    val_fraction: float
    train_ids: list[int]
    val_ids: list[int]

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    def searchable_ids(self, products: pd.DataFrame) -> list[int]:
        """The products of a data folder the run trained on: the catalog searched (never a held-out product).

        A data folder the run never saw (no overlap with its split) is searched whole, minus held-out ids."""
        held_out = {int(i) for i in self.val_ids}
        ids = [int(i) for i in self.train_ids if int(i) in products.index]
        return ids or [int(i) for i in products.index if int(i) not in held_out]

    @classmethod
    def load(cls, path: Path) -> Split:
        """A split.json written by `save`; RunError when it is unreadable or not a split."""
        path = Path(path)
        where = f"{path.parent.name}/{path.name}"
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(f"{where} is unreadable ({type(err).__name__}); re-run training") from err
        spec = {"seed": int, "val_fraction": float, "train_ids": IDS, "val_ids": IDS}
        wrong = problems(raw, spec, where) or [f"{where} lacks {k}" for k in spec if k not in raw]
        if wrong:
            raise RunError(f"{where} is not a split: {'; '.join(wrong[:3])}")
        return cls(**{k: raw[k] for k in spec})


SPLIT_BY = ("product", "name")


def make_split(ids: list[int] | np.ndarray, val_fraction: float = 0.1, seed: int = 0,
               groups: list[str] | None = None) -> Split:
    """A seeded split of product ids; the same ids (and groups) and seed give the same split.

    Without `groups`, a random split of products (as the paper's). With `groups` (one key per id, e.g. the
    normalised product name), whole groups are held out until `val_fraction` of the products are: products
    sharing a name never straddle train and validation, so every held-out name is novel to the model."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    ids = np.asarray(ids, dtype=np.int64)
    if groups is None:
        ids = np.sort(ids)
        order = np.random.default_rng(seed).permutation(len(ids))
        n_val = max(1, round(len(ids) * val_fraction))
        val = np.sort(ids[order[:n_val]])
        train = np.sort(ids[order[n_val:]])
        return Split(seed=seed, val_fraction=val_fraction, train_ids=train.tolist(), val_ids=val.tolist())
    if len(groups) != len(ids):
        raise ValueError(f"{len(groups)} group keys for {len(ids)} ids")
    by_id = sorted(zip(ids.tolist(), groups, strict=True))
    members: dict[str, list[int]] = {}
    for pid, key in by_id:
        members.setdefault(key, []).append(pid)
    keys = sorted(members)
    order = np.random.default_rng(seed).permutation(len(keys))
    target, val = max(1, round(len(ids) * val_fraction)), []
    for index in order:
        if len(val) >= target:
            break
        val += members[keys[index]]
    held = set(val)
    train = [pid for pid, _ in by_id if pid not in held]
    return Split(seed=seed, val_fraction=val_fraction, train_ids=train, val_ids=sorted(val))


def name_key(name: object) -> str:
    """The form of a product name two products "share": case and spacing folded (an empty name is its own key)."""
    return " ".join(str(name or "").split()).lower()


def fingerprint(ids: list[int] | np.ndarray) -> dict:
    """Row count and a hash of the sorted ids: tells whether two runs saw the same products."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    return {"rows": int(len(ids)), "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()}


def verbatim_overlap(train_names: list[str], val_names: list[str]) -> float:
    """Share of held-out names that occur verbatim among training names (a leakage figure)."""
    seen = {name_key(n) for n in train_names}
    return float(np.mean([name_key(n) in seen for n in val_names])) if val_names else 0.0
