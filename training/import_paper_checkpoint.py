"""Import the paper notebook's `captioner.pt` as a run folder the dashboard lists.

    python -m training.import_paper_checkpoint captioner.pt --out results/runs/paper-notebook
    python -m training.import_paper_checkpoint captioner.pt --out results/runs/paper-notebook \\
        --split_from results/runs/reference-cpu --heads 12

Writes <out>/: run.json (kind "paper-notebook"), notebook/model.safetensors + notebook/config.json (converted,
tied weights stored once), history.csv (only the paper's reported final row) and split.json (copied from
--split_from, so the import is evaluated on the same held-out products as that run). The .pt is read with
`weights_only=True`: a file that is not a plain dict of tensors is refused, never executed. An existing
different folder is never overwritten (exit code 2); importing the same file again changes nothing.
Load the result with `ris_core.captioner.load_any_captioner(<out>)`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from ris_core.data import Split
from ris_core.files import write_csv_atomic, write_json_atomic
from ris_core.modeling import CheckpointError
from ris_core.paper_notebook import (
    DECODING_MODES,
    DEFAULT_MODE,
    NOTEBOOK_DIR,
    NotebookCaptioner,
    load_notebook_checkpoint,
    load_notebook_dir,
    save_notebook_dir,
)
from ris_core.runs import HISTORY_COLUMNS, RESULTS_DIR, RunError, borrowed_split, git_commit

logger = logging.getLogger("training.import_paper_checkpoint")
KIND = "paper-notebook"
PAPER = "Patel & Patel (2024), \"Reverse Image Search Using Image Captioning\", Table I"
# The only numbers the paper reports for its final epoch (its epoch 4 = 5 epochs done); nothing else is filled in.
REPORTED_ROW = {"epoch": 5, "val_loss": 1.156, "val_perplexity": 3.18}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="the notebook's captioner.pt (a bare state_dict)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "runs" / "paper-notebook",
                        help="run folder to create (refused if it holds a different run)")
    parser.add_argument("--split_from", type=Path, default=RESULTS_DIR / "runs" / "reference-cpu",
                        help="run whose split.json is copied: the held-out products the import is evaluated on")
    parser.add_argument("--heads", type=int, default=None,
                        help="attention heads (not visible in the weights; default width // 64, i.e. 12 for ViT-B)")
    return parser.parse_args(argv)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def existing_import(out: Path, sha256: str, config: dict | None = None) -> bool:
    """True when `out` already holds this very import; RunError when it holds anything else.

    Without `config` only the source file is compared: a cheap check before the slow load.
    """
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    try:
        info = json.loads((out / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        info = {}
    same = (info.get("kind") == KIND and info.get("source", {}).get("sha256") == sha256
            and (config is None or info.get("notebook_config") == config)
            and (out / NOTEBOOK_DIR / "model.safetensors").is_file())
    if not same:
        raise RunError(f"{out} already exists and holds a different run; nothing was changed. "
                       "Pass another --out, or delete that folder first")
    return True


def main(argv: list[str] | None = None) -> Path:
    # 1. Parse arguments; a different run in --out is refused before the slow load
    args = parse_args(argv)
    source, out = args.checkpoint, args.out
    if not source.is_file():
        raise CheckpointError(f"{source} not found: pass the notebook's captioner.pt")
    sha256 = sha256_file(source)
    existing_import(out, sha256)

    # 2. Read the checkpoint: tensors only, layout checked key by key
    model = load_notebook_checkpoint(source, heads=args.heads)
    config = asdict(model.config)
    logger.info("read %s: depth %d, width %d, %d heads, %d px, sha256 %s", source, model.config.depth,
                model.config.width, model.config.heads, model.config.image_size, sha256[:12])

    # 3. Never overwrite a different run; the same import again is a no-op
    if existing_import(out, sha256, config):
        logger.info("%s already holds this import; nothing to do", out)
        return out

    # 4. The split to evaluate on: the same held-out products as --split_from
    split, source_info = borrowed_split(args.split_from)
    split_path = args.split_from / "split.json"

    # 5. Write everything into a hidden sibling folder first; it is moved into place only when complete
    tmp = out.with_name(f".{out.name}.importing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_run(tmp, model, args, sha256, split, source_info, split_path)
        # 6. The converted weights must give back exactly the tensors that were read
        reloaded = load_notebook_dir(tmp / NOTEBOOK_DIR).state_dict()
        if any(not torch.equal(v, reloaded[k]) for k, v in model.state_dict().items()):
            raise CheckpointError(f"the converted weights of {source} differ from the original; nothing was written")
        # 7. Move into place (an empty --out folder is replaced)
        if out.exists():
            out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    logger.info("wrote %s", out)
    return out


def write_run(tmp: Path, model: NotebookCaptioner, args: argparse.Namespace, sha256: str, split: Split,
              source_info: dict, split_path: Path) -> None:
    """notebook/, split.json, history.csv and run.json of the import, into `tmp`."""
    source, out, config = args.checkpoint, args.out, asdict(model.config)
    # the notebook trained on images stretched to 224 x 224: the adapter feeds it the same (PREPROCESSING)
    save_notebook_dir(model, tmp / NOTEBOOK_DIR, extra={"source_sha256": sha256, "preprocessing": "stretch"})
    shutil.copyfile(split_path, tmp / "split.json")
    history = pd.DataFrame([REPORTED_ROW], columns=HISTORY_COLUMNS)  # other cells stay empty: never estimated
    write_csv_atomic(tmp / "history.csv", history)
    info = {
        "name": out.name, "kind": KIND, "status": "complete",
        "reported_not_reproduced": True,  # history.csv only; the checkpoint in notebook/ is real
        "reported_scope": "history.csv holds the paper's reported final row, not measured on this checkpoint; "
                          "notebook/ holds the real weights (ris_core.captioner.load_any_captioner)",
        "source": {"file": str(Path(source).resolve()), "sha256": sha256, "bytes": Path(source).stat().st_size},
        "reported": {"source": PAPER, **REPORTED_ROW},
        "model": "paper notebook VisionGPT2Model: timm ViT-B/16 + nanoGPT-style GPT-2, decoder block i "
                 "cross-attends to ViT block i, tied embeddings",
        "notebook_config": config, "parameters": sum(p.numel() for p in model.parameters()),
        "decoding": {"default": DEFAULT_MODE, "modes": DECODING_MODES},
        "data": {"data_dir": source_info.get("data", {}).get("data_dir"), "split_from": str(args.split_from),
                 "train": len(split.train_ids), "val": len(split.val_ids)},
        "notes": [
            "Trained by the paper's notebook on its own random 90/10 split (seed not published): most products "
            "held out by split.json were probably in its training data, so held-out scores are optimistic.",
            "Captions come from BOS, which the notebook never trained on: the first generated word is spurious. "
            f"Default decoding here: {DEFAULT_MODE}.",
            "Images are stretched to 224 x 224 (bilinear) and normalised with mean/std 0.5, as the notebook trained; "
            "our own runs pad to a white square instead.",
            "Held-out perplexity is reported both ways: RIS Eval's (the first token predicted from BOS, as our runs) "
            "and the notebook's (the first token given, never predicted: the definition of the paper's Table I), "
            "in eval/caption_metrics.json as perplexity and perplexity_notebook_definition.",
        ],
        "git_commit": git_commit(), "imported": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json_atomic(tmp / "run.json", info)


def cli(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (CheckpointError, RunError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
