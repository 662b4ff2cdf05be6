"""Can the backbone's maps tell the brand better than the captioner does? Brand classifiers on them.

    python -m bench.probe_brand_head --run results/runs/grouped-cpu   # ~65 min on 2 cores; the training map cache
    python -m bench.probe_brand_head --run results/runs/grouped-cpu --heads "the stride-32 stage tuned, linear" \
        --mirrored --epochs 16 --predictions /tmp/brand   # ~30 min; bench/probe_brand_first.py decodes from it

The first word of a product name is mostly its brand, and on products never seen it decides most of a caption's
CIDEr-D (bench/probe_novel_words.py). Here classifiers over the cached MobileNetV2 maps (the ones the `cpu` preset
trains on) predict that word: on the frozen maps, a linear layer on the pooled maps, a linear layer on the whole 4x4
final map and a small attention head over the 80 tokens the decoder cross-attends to; and the backbone's last
stage itself, from its ImageNet weights, tuned on the cached stride-16 map with a linear layer on top (what
unfreezing the backbone's top would give). Each is trained on the run's training products, its epoch chosen on a
tenth of them held out by name (the same way the split by name holds products out), and scored once on the run's
held-out products; the captioner's own first-word accuracy on those products (from the run's captions.csv) stands
beside them. If no head beats the captioner, a brand step over these maps would not help.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ris_core.brand_step import BrandStep, first_word
from ris_core.data import load_catalog, name_key
from ris_core.evaluation import files
from ris_core.evaluation.pipeline import resolve_data_dir
from ris_core.files import write_csv_atomic
from ris_core.metrics import first_word_rate
from ris_core.modeling import ModelSpec, build_captioner
from ris_core.runs import Run
from training.data import cached_backbone_maps


class PooledLinear(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.norm, self.out = nn.LayerNorm(1280 + 96), nn.Linear(1280 + 96, classes)

    def forward(self, mid: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.cat([final.mean((2, 3)), mid.mean((2, 3))], dim=1)))


class FinalMapLinear(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.norm, self.out = nn.LayerNorm(1280 * 16), nn.Linear(1280 * 16, classes)

    def forward(self, mid: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(final.flatten(1)))


class TokenAttention(nn.Module):
    """The 80 tokens (16 of the final map, 64 of the stride-16 map) projected to 256, one transformer layer,
    mean-pooled: about the capacity the decoder's cross-attention has."""

    def __init__(self, classes: int, width: int = 256) -> None:
        super().__init__()
        self.final, self.mid = nn.Linear(1280, width), nn.Linear(96, width)
        self.position = nn.Parameter(torch.zeros(80, width))
        self.layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.1, batch_first=True)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, classes))

    def forward(self, mid: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.final(final.flatten(2).transpose(1, 2)), self.mid(mid.flatten(2).transpose(1, 2))], 1)
        return self.out(self.layer(tokens + self.position).mean(1))


def last_stage_tuned(classes: int) -> nn.Module:
    """MobileNetV2's stride-32 stage from its ImageNet weights with a linear layer: the product's brand step
    (ris_core/brand_step.py), what unfreezing the backbone's top would give."""
    return BrandStep.from_imagenet([str(k) for k in range(classes)])


HEADS = {"linear on the pooled maps": PooledLinear, "linear on the 4x4 final map": FinalMapLinear,
         "attention over the 80 tokens": TokenAttention, "the stride-32 stage tuned, linear": last_stage_tuned}


def probabilities(head: nn.Module, mid: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    head.eval()
    with torch.inference_mode():
        return torch.cat([head(mid[s : s + 1024].float(), final[s : s + 1024].float()).softmax(1)
                          for s in range(0, len(mid), 1024)])


def accuracy(head: nn.Module, mid: torch.Tensor, final: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probabilities(head, mid, final).argmax(1) == labels).float().mean()) if len(labels) else 0.0


def train_head(name: str, classes: int, data: dict[str, tuple], epochs: int, seed: int = 0,
               mirrored: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Train on data["fit"], keep the epoch best on data["pick"], report it on data["test"] (its probabilities
    there under "test_probabilities"). `mirrored`: the fit products' maps of their mirrored photos, each drawn
    instead of the photo's own half of the time (flip augmentation)."""
    torch.manual_seed(seed)
    head = HEADS[name](classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=getattr(head, "lr", 1e-3), weight_decay=0.05)
    mid, final, labels = data["fit"]
    best, state, curve = -1.0, None, []
    for _ in range(epochs):
        head.train()
        order = torch.randperm(len(labels))
        for s in range(0, len(order), 256):
            rows = order[s : s + 256]
            batch_mid, batch_final = mid[rows].float(), final[rows].float()
            if mirrored is not None:
                flip = torch.rand(len(rows)) < 0.5
                batch_mid[flip], batch_final[flip] = mirrored[0][rows[flip]].float(), mirrored[1][rows[flip]].float()
            loss = nn.functional.cross_entropy(head(batch_mid, batch_final), labels[rows], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        picked = accuracy(head, *data["pick"])
        curve.append(picked)
        if picked > best:
            best, state = picked, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(state)
    mid, final, labels = data["test"]
    test = probabilities(head, mid, final)
    return {"head": name, "pick_curve": curve, "best_epoch": curve.index(best) + 1, "pick_accuracy": best,
            "test_accuracy": float((test.argmax(1) == labels).float().mean()), "test_probabilities": test}


def slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def write_predictions(path: Path, ids: list[int], vocabulary: list[str], probs: torch.Tensor, top: int = 5) -> None:
    """One row per product: its id and the head's `top` likeliest first words with their probabilities."""
    best = probs.topk(min(top, probs.shape[1]), dim=1)
    frame = pd.DataFrame({"id": ids})
    for k in range(best.indices.shape[1]):
        frame[f"word_{k + 1}"] = [vocabulary[i] for i in best.indices[:, k].tolist()]
        frame[f"p_{k + 1}"] = best.values[:, k].numpy().round(5)
    write_csv_atomic(path, frame)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data_dir", type=Path, default=None)
    parser.add_argument("--cache_dir", type=Path, default=Path(".cache"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--heads", nargs="+", choices=list(HEADS), default=list(HEADS))
    parser.add_argument("--mirrored", action="store_true",
                        help="flip augmentation: the maps of the mirrored photos (cached once, ~2 min) half the time")
    parser.add_argument("--predictions", type=Path, default=None,
                        help="write each head's five likeliest first words per held-out product to <dir>/<head>.csv "
                             "(bench/probe_brand_first.py decodes captions from them)")
    args = parser.parse_args(argv)
    run = Run(args.run)
    catalog = load_catalog(resolve_data_dir(run, args.data_dir))
    products = catalog.products
    spec = ModelSpec()
    model = build_captioner(spec).eval()
    maps, _ = cached_backbone_maps(model, catalog, products.index.tolist(), spec, args.cache_dir)
    row = {int(pid): r for r, pid in enumerate(maps["ids"].tolist())}
    split = run.split()
    train_ids = [i for i in split.train_ids if i in row]
    test_ids = [i for i in split.val_ids if i in row]
    # a tenth of the training products, held out by name, picks the epoch
    names = products.loc[train_ids, "productDisplayName"].map(name_key)
    rng = np.random.default_rng(0)
    picked_names = set(rng.permutation(sorted(set(names)))[: len(set(names)) // 10])
    pick_ids = [i for i, n in zip(train_ids, names) if n in picked_names]
    fit_ids = [i for i, n in zip(train_ids, names) if n not in picked_names]
    words = products["productDisplayName"].map(first_word)
    vocabulary = sorted(set(words.loc[fit_ids]))
    index = {w: k for k, w in enumerate(vocabulary)}

    def part(ids: list[int]) -> tuple:
        rows = torch.tensor([row[i] for i in ids])
        labels = torch.tensor([index.get(words.loc[i], -1) for i in ids])
        return maps["mid"][rows], maps["final"][rows], labels  # -1: a word no fitted product starts with

    data = {"fit": part(fit_ids), "pick": part(pick_ids), "test": part(test_ids)}
    flipped = None
    if args.mirrored:
        mirror, _ = cached_backbone_maps(model, catalog, products.index.tolist(), spec, args.cache_dir, mirrored=True)
        mirror_row = {int(pid): r for r, pid in enumerate(mirror["ids"].tolist())}
        rows = torch.tensor([mirror_row[i] for i in fit_ids])
        flipped = mirror["mid"][rows], mirror["final"][rows]
    print(f"{run.name}: {len(fit_ids)} products fit, {len(pick_ids)} pick the epoch, {len(test_ids)} held out; "
          f"{len(vocabulary)} first words; held-out products whose first word was fitted: "
          f"{float((data['test'][2] >= 0).float().mean()):.3f}")
    captions = pd.read_csv(run.eval_dir / files.CAPTIONS, keep_default_na=False)
    rows = [{"head": "the captioner's greedy caption (captions.csv)", "test_accuracy": first_word_rate(
        captions["generated"].tolist(), captions["reference"].tolist())}]
    if "reranked" in captions:
        rows.append({"head": "the captioner's reranked caption", "test_accuracy": first_word_rate(
            captions["reranked"].tolist(), captions["reference"].tolist())})
    frequent = max(set(words.loc[fit_ids]), key=list(words.loc[fit_ids]).count)
    rows.append({"head": f"the most frequent first word ({frequent!r})",
                 "test_accuracy": float(np.mean([words.loc[i] == frequent for i in test_ids]))})
    for name in args.heads:
        result = train_head(name, len(vocabulary), data, args.epochs, mirrored=flipped)
        print(f"{name}: accuracy on the pick set by epoch {[round(a, 3) for a in result['pick_curve']]}")
        if args.predictions is not None:
            write_predictions(args.predictions / f"{slug(name)}.csv", test_ids, vocabulary,
                              result["test_probabilities"])
        rows.append({k: v for k, v in result.items() if k != "test_probabilities"})
    table = pd.DataFrame(rows)
    table["best_epoch"] = table.get("best_epoch", pd.Series(dtype=float)).astype("Int64")
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(table[["head", "best_epoch", "pick_accuracy", "test_accuracy"]].to_string(
            index=False, float_format=lambda v: "" if math.isnan(v) else f"{v:.3f}"))
    return table


if __name__ == "__main__":
    main()
