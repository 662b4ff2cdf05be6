"""Build the demo catalog the repo ships (data/demo): real products, stratified by articleType.

    python -m training.make_demo_catalog --source ../shared/data/fashion-product-images \
        --run results/runs/reference-cpu --out data/demo

Held-out products come from the run's validation split (so the dashboard can show captions of
images the model never trained on); the rest are training products that make a searchable catalog.
Images and styles.csv lines are copied byte for byte.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ris_core.data import load_catalog
from ris_core.files import write_text_atomic
from ris_core.runs import Run


def stratified_sample(frame: pd.DataFrame, n: int, seed: int) -> list[int]:
    """n ids, spread over articleType in proportion to its count, at least one of each type present."""
    rng = np.random.default_rng(seed)
    counts = frame["articleType"].value_counts()
    quota = np.maximum(1, np.floor(counts / counts.sum() * n)).astype(int)
    chosen: list[int] = []
    for article, k in quota.items():
        ids = frame.index[frame["articleType"] == article].to_numpy()
        chosen += rng.choice(ids, size=min(k, len(ids)), replace=False).tolist()
    rest = frame.index.difference(chosen).to_numpy()
    if len(chosen) < n:
        chosen += rng.choice(rest, size=min(n - len(chosen), len(rest)), replace=False).tolist()
    return sorted(int(i) for i in rng.permutation(chosen)[:n])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="Kaggle-layout folder to copy from")
    parser.add_argument("--run", type=Path, required=True, help="run whose split decides held-out products")
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--held_out", type=int, default=400, help="validation products to include")
    parser.add_argument("--train", type=int, default=2600, help="training products to include")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    source = load_catalog(args.source)
    split = Run(args.run).split()
    products = source.products
    val = products[products.index.isin(split.val_ids)]
    train = products[products.index.isin(split.train_ids)]
    chosen = stratified_sample(val, args.held_out, args.seed) + stratified_sample(train, args.train, args.seed)
    chosen_set = set(chosen)

    if args.out.exists():
        shutil.rmtree(args.out)
    (args.out / "images").mkdir(parents=True)
    lines = (args.source / "styles.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [lines[0]] + [line for line in lines[1:] if line.split(",", 1)[0].isdigit()
                         and int(line.split(",", 1)[0]) in chosen_set]
    write_text_atomic(args.out / "styles.csv", "".join(kept))
    size = 0
    for pid in chosen:
        shutil.copyfile(source.image_path(pid), args.out / "images" / f"{pid}.jpg")
        size += (args.out / "images" / f"{pid}.jpg").stat().st_size
    n_val = len(set(split.val_ids) & chosen_set)
    write_text_atomic(args.out / "PROVENANCE.md", f"""# Demo catalog (provenance)

{len(chosen):,} real products of the Kaggle "Fashion Product Images" dataset (Param Aggarwal; Myntra
photos; license reported as MIT, not verified), copied byte for byte from the offline bundle
`fashion-product-images` (images up to 240 px; its PROVENANCE.md says where each file came from).

- {n_val} are held out in the reference run `{args.run.name}` (its `split.json`), {len(chosen) - n_val}
  are training products; both stratified by articleType (at least one per type present), seed {args.seed}.
- `styles.csv` holds the original lines of these ids; `images/` {size / 1e6:.1f} MB.
- Rebuild: `python -m training.make_demo_catalog --source <fashion-product-images> --run {args.run} --out {args.out}`

Use for research, development and testing only; don't redistribute beyond the project.
""")
    print(f"{args.out}: {len(chosen)} products ({n_val} held out), images {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
