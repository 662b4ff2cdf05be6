"""Train a run's brand step (ris_core/brand_step.py) into its model folder; the same command resumes after a kill.

    python -m training.train_brand_step --run results/runs/grouped-cpu-brand-step   # 13-18 min on 2 cores

The step learns the first word of the run's training products' names from the backbone maps the captioner was
trained on (the training's map cache: no photo is decoded again), tuning MobileNetV2's last stage from its ImageNet
weights at a constant rate, the mirror images' maps shown half of the time. A tenth of the training products, held
out by name as the split by name holds products out, picks between the best epoch and the average of the last
three epochs' weights (results/cpu-preset.md: the average names more first words, and more at a rate of 1e-3 than
of 3e-4; a cosine schedule, the recipe's jittered and larger photos or more epochs fewer); `--fit_all` folds the
pick set into the fit once the recipe is fixed (the cpu preset's training runs that after the captioner:
`training.train --brand_step_epochs`). The run's held-out products are never seen. Writes
model/brand_step.safetensors (the captioner's digest changes with it: an evaluation captions again) and
brand_step.json (the pick curve); checkpoints/brand_step/ holds the state after each epoch until the step is saved.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn
from tqdm.auto import tqdm

from ris_core.brand_step import BrandStep, first_word, written_forms
from ris_core.data import DataError, load_catalog, name_key
from ris_core.encoder_decoder import Captioner
from ris_core.errors import CheckpointError
from ris_core.evaluation.pipeline import resolve_data_dir
from ris_core.files import atomic_path, write_json_atomic
from ris_core.runs import Run, RunError
from training.data import cached_backbone_maps
from training.train import jittered_maps, larger_photo_maps

logger = logging.getLogger("training.train_brand_step")
BATCH = 256
SUMMARY = "brand_step.json"  # in the run folder
# AdamW's constant rate: on grouped-cpu's pick set 1e-3 names more first words than 3e-4 once the last epochs'
# weights are averaged (results/cpu-preset.md, "The brand step's rate, length and depth")
LR = 1e-3


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
    """The step's, the optimizer's, the weight average's and the best epoch's tensors (safetensors) and the curve
    (JSON), per epoch."""

    def __init__(self, folder: Path) -> None:
        self.tensors, self.info = folder / "state.safetensors", folder / "state.json"

    def save(self, step: nn.Module, optimizer: torch.optim.Optimizer, average: AveragedModel, best: dict,
             info: dict) -> None:
        tensors = {f"step.{k}": v.detach().contiguous() for k, v in step.state_dict().items()}
        tensors |= {f"average.{k}": v.detach().contiguous() for k, v in average.state_dict().items()}
        tensors |= {f"best.{k}": v.contiguous() for k, v in best.items()}
        for index, state in optimizer.state_dict()["state"].items():
            tensors |= {f"optimizer.{index}.{k}": torch.as_tensor(v).contiguous() for k, v in state.items()}
        self.tensors.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.tensors) as tmp:
            save_file(tensors, tmp)
        write_json_atomic(self.info, info)  # written last: its epoch count says the tensors are complete

    def load(self, step: nn.Module, optimizer: torch.optim.Optimizer, average: AveragedModel,
             setup: dict) -> tuple[dict, dict] | None:
        """(best state, info) after restoring the step, the optimizer and the weight average, or None to start over
        (also when the checkpoint was written for another `setup`: words, seed, views, schedule, rate, mixup, pick
        set)."""
        if not (self.info.is_file() and self.tensors.is_file()):
            return None
        try:
            info = json.loads(self.info.read_text())
            if {k: info.get(k) for k in setup} != setup:
                logger.warning("checkpoint of another setup (words, seed, views, schedule, rate, mixup, pick set): "
                               "starting over")
                return None
            tensors = load_file(self.tensors)
            step.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("step.")}, strict=True)
            average.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("average.")}, strict=True)
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


@dataclass
class Views:
    """Other cached views of the fit products' photos (the mirror image, jittered crops, the larger photo): each
    product is shown its photo or one of the views it has, all equally likely, each time it is drawn."""

    names: list[str]
    maps: list[torch.Tensor]  # each (fit products, 96, H, W)
    has: torch.Tensor  # (views, fit products) bool: a larger photo exists for only some products

    @classmethod
    def of(cls, sources: dict[str, dict], fit_ids: list[int]) -> Views:
        """The views of `fit_ids` in `sources` ({name: {"ids", "mid"}}, each a cache of some of the products)."""
        views = cls(list(sources), [], torch.zeros(len(sources), len(fit_ids), dtype=torch.bool))
        for v, (name, source) in enumerate(sources.items()):
            where = {int(pid): r for r, pid in enumerate(source["ids"].tolist())}
            views.has[v] = torch.tensor([i in where for i in fit_ids])
            views.maps.append(source["mid"][torch.tensor([where.get(i, 0) for i in fit_ids])])
            logger.info("view %s: %d of %d fit products", name, int(views.has[v].sum()), len(fit_ids))
        return views

    def draw(self, rows: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        weights = torch.cat([torch.ones(1, len(rows)), self.has[:, rows].float()]).T  # column 0: the photo
        choice = torch.multinomial(weights, 1).squeeze(1)
        for v, maps in enumerate(self.maps, start=1):
            shown = choice == v
            batch[shown] = maps[rows[shown]].float()
        return batch


def train(step: BrandStep, fit: tuple, pick: tuple | None, epochs: int, views: Views | None = None,
          checkpoint: Checkpoint | None = None, seed: int = 0, cosine: bool = False, average_last: int = 0,
          lr: float = LR, mixup: float = 0.0) -> dict:
    """Fit `step` on fit = (mid maps, labels) and leave it at the better on `pick` of its best epoch and the
    average of its last `average_last` epochs' weights (batch-norm statistics recomputed on the fit maps); without
    a pick set (None) at the average, or at the last epoch if `average_last` is 0.
    `views`: other maps of the fit products' photos drawn in place of theirs; `cosine`: the rate decays to zero;
    `mixup` > 0: each batch's maps mixed with the same batch reordered, at a weight drawn from Beta(mixup, mixup),
    and the loss mixed alike."""
    # channels-last convolutions: a batch of 256 in 0.47 s against 0.55 (python -m bench.probe_brand_step_layout)
    step.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(step.parameters(), lr=lr, weight_decay=0.05)
    average = AveragedModel(step)
    mid, labels = fit
    steps_per_epoch = -(-len(labels) // BATCH)

    def rate(t: int) -> float:  # set per batch from the batch's index alone, so a resumed run needs no state for it
        return lr * (0.5 * (1 + math.cos(math.pi * t / (epochs * steps_per_epoch))) if cosine else 1.0)

    setup = {"words": step.words, "seed": seed, "views": views.names if views else [], "cosine": cosine,
             "epochs": epochs, "average_last": average_last, "lr": lr, "mixup": mixup, "pick_set": pick is not None}
    info = {**setup, "pick_curve": []}
    best: dict = {}
    restored = checkpoint.load(step, optimizer, average, setup) if checkpoint else None
    if restored:
        best, info = restored
        logger.info("resuming after epoch %d", len(info["pick_curve"]))
    for epoch in range(len(info["pick_curve"]), epochs):
        torch.manual_seed(seed + epoch)  # each epoch's order and views from its own seed: a resumed run draws the same
        step.train()
        order = torch.randperm(len(labels))
        for b, s in enumerate(tqdm(range(0, len(order), BATCH), desc=f"brand step, epoch {epoch + 1}/{epochs}",
                                   unit="batch", mininterval=5)):
            for group in optimizer.param_groups:
                group["lr"] = rate(epoch * steps_per_epoch + b)
            rows = order[s : s + BATCH]
            batch = mid[rows].float()
            if views is not None:
                batch = views.draw(rows, batch)
            targets = [(1.0, labels[rows])]
            if mixup:
                weight, other = float(torch.distributions.Beta(mixup, mixup).sample()), torch.randperm(len(rows))
                batch = weight * batch + (1 - weight) * batch[other]
                targets = [(weight, labels[rows]), (1 - weight, labels[rows][other])]
            logits = step(batch.contiguous(memory_format=torch.channels_last))
            # -1 marks a word outside the vocabulary: only pick-set products can have one, but never crash on it
            loss = sum(w * nn.functional.cross_entropy(logits, t, label_smoothing=0.1, ignore_index=-1)
                       for w, t in targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        picked = None if pick is None else accuracy(step, *pick)  # None: an epoch done, nothing to score it on
        if picked is not None:
            logger.info("epoch %d: first word right on %.3f of the pick set", epoch + 1, picked)
            if picked > max(info["pick_curve"], default=-1.0):  # the first of equally good epochs, as best_epoch says
                best = {k: v.detach().clone() for k, v in step.state_dict().items()}
        if epoch >= epochs - average_last:
            average.update_parameters(step)
        info["pick_curve"].append(picked)
        if checkpoint:
            checkpoint.save(step, optimizer, average, best, info)
    if average_last:
        # the averaged weights' batch-norm statistics belong to none of the epochs: one pass over the fit maps
        update_bn((mid[s : s + BATCH].float() for s in range(0, len(mid), BATCH)), average)
    if pick is None:
        if not average_last:
            return {"pick_curve": [], "kept": "last epoch"}
        step.load_state_dict(average.module.state_dict())
        return {"pick_curve": [], "averaged_epochs": list(range(epochs - average_last + 1, epochs + 1)),
                "kept": "average"}
    curve = info["pick_curve"]
    result = {"pick_curve": curve, "best_epoch": curve.index(max(curve)) + 1, "pick_accuracy": max(curve)}
    if average_last:
        result |= {"averaged_epochs": list(range(epochs - average_last + 1, epochs + 1)),
                   "averaged_pick_accuracy": accuracy(average.module, *pick)}
        logger.info("epochs %d-%d averaged: first word right on %.3f of the pick set", epochs - average_last + 1,
                    epochs, result["averaged_pick_accuracy"])
        if result["averaged_pick_accuracy"] >= result["pick_accuracy"]:
            step.load_state_dict(average.module.state_dict())
            result["kept"] = "average"
            return result
    step.load_state_dict(best)
    result["kept"] = "best epoch"
    return result


def recipe_views(captioner: Captioner, catalog, ids: list[int], train_ids: list[int], run: Run,
                 cache_dir: Path) -> dict[str, dict]:
    """The maps of the jittered crops and larger photos (and their mirror images) the run's training cached."""
    recipe = run.info().get("args", {})
    data_args = SimpleNamespace(**{**recipe, "cache_dir": str(cache_dir)})
    views: dict[str, dict] = {}
    if recipe.get("larger_images_dir"):
        larger = larger_photo_maps(captioner.model, catalog, ids, train_ids, captioner.spec, data_args)
        views["larger"] = {"ids": larger["ids"], "mid": larger["maps"][0]}
        if larger["mirrored"] is not None:
            views["larger mirrored"] = {"ids": larger["ids"], "mid": larger["mirrored"][0]}
    if recipe.get("jitter_views"):
        jittered = jittered_maps(captioner.model, catalog, ids, train_ids, captioner.spec, data_args)
        views |= {f"jitter {seed}": {"ids": jittered["ids"], "mid": mid}
                  for seed, (mid, _) in enumerate(jittered["views"])}
    return views


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder with a MobileNetV2 captioner")
    parser.add_argument("--data_dir", type=Path, default=None, help="default: the data the run was trained on")
    parser.add_argument("--cache_dir", type=Path, default=Path(".cache"))
    parser.add_argument("--epochs", type=int, default=13)
    parser.add_argument("--average_last", type=int, default=3,
                        help="average the weights of the last N epochs, kept if better on the pick set (0: the best "
                             "epoch)")
    parser.add_argument("--mirrored", action=argparse.BooleanOptionalAction, default=True,
                        help="the mirror images' cached maps among the views shown (extracted once, ~2 min, and "
                             "read either way to score the pick set as captioning reads photos)")
    parser.add_argument("--recipe_views", action=argparse.BooleanOptionalAction, default=False,
                        help="also the jittered crops and larger photos the run's training cached, if it used any")
    parser.add_argument("--cosine", action=argparse.BooleanOptionalAction, default=False,
                        help="decay the learning rate to zero over the epochs (else constant)")
    parser.add_argument("--lr", type=float, default=LR, help="AdamW's learning rate, constant unless --cosine")
    parser.add_argument("--mixup", type=float, default=0.0,
                        help="mix each batch's maps and labels with the batch reordered, at Beta(a, a) (0: off)")
    parser.add_argument("--fit_all", action=argparse.BooleanOptionalAction, default=False,
                        help="once the recipe is fixed, fit on every training product, the pick set's too: keeps the "
                             "average of the last epochs (or the last epoch) with no pick figures")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        raise RunError(f"--epochs must be at least 1, not {args.epochs}")
    if args.mixup < 0:
        raise RunError(f"--mixup must be 0 (off) or more, not {args.mixup}")
    if not args.lr > 0:
        raise RunError(f"--lr must be above 0, not {args.lr}")
    if args.average_last < 0:
        raise RunError(f"--average_last must be 0 or more, not {args.average_last}")
    args.average_last = min(args.average_last, args.epochs)  # --epochs 2: the average of both
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
    picked = set() if args.fit_all else pick_by_name(train_ids, names, seed=args.seed)
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
    shown = {"mirrored": mirror} if args.mirrored else {}
    if args.recipe_views:
        shown |= recipe_views(captioner, catalog, maps["ids"].tolist(), train_ids, run, args.cache_dir)
    views = Views.of(shown, fit_ids)
    del shown
    pick = part(sorted(picked), maps) if picked else None
    logger.info("%s: %d products fit, %d pick the epoch; %d first words", run.name, len(fit_ids), len(picked),
                len(vocabulary))
    torch.manual_seed(args.seed)  # the new linear layer's draw
    step = BrandStep.from_imagenet([forms[w] for w in vocabulary])
    result = train(step, part(fit_ids, maps), pick, args.epochs, views if views.names else None,
                   Checkpoint(run.path / "checkpoints" / "brand_step"), args.seed, args.cosine, args.average_last,
                   args.lr, args.mixup)
    if pick is not None:
        result["pick_accuracy_with_mirror"] = accuracy(step, *pick, mirrored=part(sorted(picked), mirror)[0])
    path = step.save(run.model_dir)
    write_json_atomic(run.path / SUMMARY, {**result, "epochs": args.epochs, "average_last": args.average_last,
                                           "views": views.names, "cosine": args.cosine, "lr": args.lr,
                                           "mixup": args.mixup, "fit_all": not picked,  # too few names: all fit
                                           "words": len(vocabulary), "fit_products": len(fit_ids),
                                           "pick_products": len(picked),
                                           "minutes": round((time.monotonic() - started) / 60, 1)})
    for leftover in (run.path / "checkpoints" / "brand_step").glob("state.*"):
        leftover.unlink()
    if pick is None:
        logger.info("saved %s (%s; no pick set: every training product fit)", path, result["kept"])
    else:
        logger.info("saved %s (%s: %.3f of the pick set's first words right with the mirror images)", path,
                    result["kept"], result["pick_accuracy_with_mirror"])
    return path


def cli() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        main(sys.argv[1:])
    except (DataError, RunError, CheckpointError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
