"""Train a run's brand step (ris_core/brand_step.py) into its model folder; the same command resumes after a kill.

    python -m training.train_brand_step --run results/runs/grouped-cpu-brand-step   # ~13 min on 2 cores

The step learns the first word of the run's training products' names from the backbone maps the captioner was
trained on (the training's map cache: no photo is decoded again), tuning MobileNetV2's last stage from its ImageNet
weights. A tenth of the training products, held out by name as the split by name holds products out, picks the
epoch; the run's held-out products are never seen. Writes model/brand_step.safetensors (the captioner's digest
changes with it: an evaluation captions again) and brand_step.json (the pick curve); checkpoints/brand_step/ holds
the state after each epoch until the step is saved.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ris_core.brand_step import BrandStep, first_word, written_forms
from ris_core.data import DataError, load_catalog, name_key
from ris_core.encoder_decoder import Captioner
from ris_core.errors import CheckpointError
from ris_core.evaluation.pipeline import resolve_data_dir
from ris_core.files import atomic_path, write_json_atomic
from ris_core.runs import Run, RunError
from training.data import cached_backbone_maps

logger = logging.getLogger("training.train_brand_step")
BATCH = 256
SUMMARY = "brand_step.json"  # in the run folder


def pick_by_name(train_ids: list[int], names: list[str], seed: int = 0) -> set[int]:
    """The training products whose name is one of a seeded tenth of the distinct names."""
    keys = [name_key(n) for n in names]
    distinct = sorted(set(keys))
    picked = set(np.random.default_rng(seed).permutation(distinct)[: len(distinct) // 10])
    return {i for i, k in zip(train_ids, keys) if k in picked}


def accuracy(step: BrandStep, mid: torch.Tensor, labels: torch.Tensor, mirrored: torch.Tensor | None = None) -> float:
    """The share of first words right, from the photos' maps (and their mirror images', averaged, as captioning
    does)."""
    with torch.inference_mode():
        predicted = torch.cat([step.log_probs(mid[s : s + 1024].float(), None if mirrored is None else
                                              mirrored[s : s + 1024].float()).argmax(1)
                               for s in range(0, len(mid), 1024)])
    return float((predicted == labels).float().mean()) if len(labels) else 0.0


class Checkpoint:
    """The step's, the optimizer's and the best epoch's tensors (safetensors) and the curve (JSON), per epoch."""

    def __init__(self, folder: Path) -> None:
        self.tensors, self.info = folder / "state.safetensors", folder / "state.json"

    def save(self, step: nn.Module, optimizer: torch.optim.Optimizer, best: dict, info: dict) -> None:
        tensors = {f"step.{k}": v.detach().contiguous() for k, v in step.state_dict().items()}
        tensors |= {f"best.{k}": v.contiguous() for k, v in best.items()}
        for index, state in optimizer.state_dict()["state"].items():
            tensors |= {f"optimizer.{index}.{k}": torch.as_tensor(v).contiguous() for k, v in state.items()}
        self.tensors.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.tensors) as tmp:
            save_file(tensors, tmp)
        write_json_atomic(self.info, info)  # written last: its epoch count says the tensors are complete

    def load(self, step: nn.Module, optimizer: torch.optim.Optimizer, setup: dict) -> tuple[dict, dict] | None:
        """(best state, info) after restoring the step and the optimizer, or None to start over (also when the
        checkpoint was written for another `setup`: words, seed, flips)."""
        if not (self.info.is_file() and self.tensors.is_file()):
            return None
        try:
            info = json.loads(self.info.read_text())
            if {k: info.get(k) for k in setup} != setup:
                logger.warning("checkpoint of another setup (words, seed or flips): starting over")
                return None
            tensors = load_file(self.tensors)
            step.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("step.")}, strict=True)
            saved = optimizer.state_dict()
            for index in saved["state"] or range(len(saved["param_groups"][0]["params"])):
                prefix = f"optimizer.{index}."
                saved["state"][index] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            optimizer.load_state_dict(saved)
            best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
            return best, info
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            logger.warning("ignoring unreadable checkpoint %s (%s): starting over", self.tensors, err)
            return None


def train(step: BrandStep, fit: tuple, pick: tuple, epochs: int, mirrored: torch.Tensor | None = None,
          checkpoint: Checkpoint | None = None, seed: int = 0) -> dict:
    """Fit `step` on fit = (mid maps, labels), keep the epoch best on `pick`, leave `step` at it. `mirrored`: the
    fit products' maps of their mirrored photos, each drawn instead of the photo's own half of the time."""
    optimizer = torch.optim.AdamW(step.parameters(), lr=step.lr, weight_decay=0.05)
    mid, labels = fit
    setup = {"words": step.words, "seed": seed, "flips": mirrored is not None}
    info = {**setup, "pick_curve": []}
    best: dict = {}
    restored = checkpoint.load(step, optimizer, setup) if checkpoint else None
    if restored:
        best, info = restored
        logger.info("resuming after epoch %d", len(info["pick_curve"]))
    for epoch in range(len(info["pick_curve"]), epochs):
        torch.manual_seed(seed + epoch)  # each epoch's order and flips from its own seed: a resumed run draws the same
        step.train()
        order = torch.randperm(len(labels))
        for s in tqdm(range(0, len(order), BATCH), desc=f"brand step, epoch {epoch + 1}/{epochs}", unit="batch",
                      mininterval=5):
            rows = order[s : s + BATCH]
            batch = mid[rows].float()
            if mirrored is not None:
                flip = torch.rand(len(rows)) < 0.5
                batch[flip] = mirrored[rows[flip]].float()
            # -1 marks a word outside the vocabulary: only pick-set products can have one, but never crash on it
            loss = nn.functional.cross_entropy(step(batch), labels[rows], label_smoothing=0.1, ignore_index=-1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        picked = accuracy(step, *pick)
        logger.info("epoch %d: first word right on %.3f of the pick set", epoch + 1, picked)
        if picked > max(info["pick_curve"], default=-1.0):  # the first of equally good epochs, as best_epoch says
            best = {k: v.detach().clone() for k, v in step.state_dict().items()}
        info["pick_curve"].append(picked)
        if checkpoint:
            checkpoint.save(step, optimizer, best, info)
    step.load_state_dict(best)
    curve = info["pick_curve"]
    return {"pick_curve": curve, "best_epoch": curve.index(max(curve)) + 1, "pick_accuracy": max(curve)}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder with a MobileNetV2 captioner")
    parser.add_argument("--data_dir", type=Path, default=None, help="default: the data the run was trained on")
    parser.add_argument("--cache_dir", type=Path, default=Path(".cache"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--mirrored", action=argparse.BooleanOptionalAction, default=True,
                        help="flip augmentation from the cached maps of the mirrored photos (extracted once, ~2 min, "
                             "and read either way to score the pick set as captioning reads photos)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        raise RunError(f"--epochs must be at least 1, not {args.epochs}")
    run = Run(args.run)
    captioner = Captioner.load(run.path)
    if not captioner.has_backbone or captioner.spec is None:
        raise RunError(f"{run.path}: a brand step needs a captioner trained here on MobileNetV2 maps")
    started = time.monotonic()
    catalog = load_catalog(resolve_data_dir(run, args.data_dir))
    products = catalog.products
    ids = products.index.tolist()[: run.info().get("args", {}).get("max_products")]  # the training's map cache
    maps, _ = cached_backbone_maps(captioner.model, catalog, ids, captioner.spec, args.cache_dir)
    row = {int(pid): r for r, pid in enumerate(maps["ids"].tolist())}
    train_ids = [i for i in run.split().train_ids if i in row]
    if not train_ids:
        raise DataError(f"none of {run.name}'s training products is in {catalog.image_dir.parent}")
    names = products.loc[train_ids, "productDisplayName"].astype(str).tolist()
    picked = pick_by_name(train_ids, names, seed=args.seed)
    fit_ids = [i for i in train_ids if i not in picked]
    forms = written_forms(products.loc[fit_ids, "productDisplayName"].astype(str).tolist())
    vocabulary = sorted(forms)
    index = {w: k for k, w in enumerate(vocabulary)}
    words = products["productDisplayName"].map(first_word)

    def part(part_ids: list[int], source: dict) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.tensor([row[i] for i in part_ids])
        return source["mid"][rows], torch.tensor([index.get(words.loc[i], -1) for i in part_ids])

    # the mirrored photos' maps: flip augmentation (--mirrored), and the pick set scored as captioning scores it
    mirror, _ = cached_backbone_maps(captioner.model, catalog, ids, captioner.spec, args.cache_dir, mirrored=True)
    if not torch.equal(mirror["ids"], maps["ids"]):
        raise DataError(f"the mirrored map cache holds other products than the plain one; clear {args.cache_dir}")
    flipped = part(fit_ids, mirror)[0] if args.mirrored else None
    pick = part(sorted(picked), maps)
    logger.info("%s: %d products fit, %d pick the epoch; %d first words", run.name, len(fit_ids), len(picked),
                len(vocabulary))
    torch.manual_seed(args.seed)  # the new linear layer's draw
    step = BrandStep.from_imagenet([forms[w] for w in vocabulary])
    result = train(step, part(fit_ids, maps), pick, args.epochs, flipped,
                   Checkpoint(run.path / "checkpoints" / "brand_step"), args.seed)
    result["pick_accuracy_with_mirror"] = accuracy(step, *pick, mirrored=part(sorted(picked), mirror)[0])
    path = step.save(run.model_dir)
    write_json_atomic(run.path / SUMMARY, {**result, "epochs": args.epochs, "mirrored": args.mirrored,
                                           "words": len(vocabulary), "fit_products": len(fit_ids),
                                           "pick_products": len(picked),
                                           "minutes": round((time.monotonic() - started) / 60, 1)})
    for leftover in (run.path / "checkpoints" / "brand_step").glob("state.*"):
        leftover.unlink()
    logger.info("saved %s (epoch %d: %.3f of the pick set's first words right, %.3f with the mirror images)", path,
                result["best_epoch"], result["pick_accuracy"], result["pick_accuracy_with_mirror"])
    return path


def cli() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        main(sys.argv[1:])
    except (DataError, RunError, CheckpointError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
