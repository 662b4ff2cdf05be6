"""Training steps on random batches against length-grouped ones (`--group_by_length`), side by side.

    python -m bench.probe_length_grouping                                   # the demo's names, ~20 s on 2 cores
    python -m bench.probe_length_grouping --data_dir ../shared/data/fashion-product-images-small --n_layer 8

A batch is padded to its longest caption: in random batches of 64 product names most of the decoder's token
positions are padding. Both orders come from the real captions' GPT-2 lengths (random: a permutation; grouped:
Trainer's `get_length_grouped_indices`, as `LengthGroupedSampler` draws them); the same sampled batch positions
of each order are timed one after the other, in the precision this machine trains in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from bench.train_steps import timed_step, trainable
from ris_core.data import DEFAULT_DATA_DIR, load_catalog
from ris_core.modeling import ModelSpec
from ris_core.precision import fast_bf16
from ris_core.tokenizer import encode_captions


def batch_widths(lengths: list[int], order: list[int], batch_size: int) -> list[int]:
    return [max(lengths[i] for i in order[k : k + batch_size]) for k in range(0, len(order) - batch_size + 1,
                                                                             batch_size)]


def measure(labels: list[list[int]], n_layer: int, batch_size: int = 64, steps: int = 12, seed: int = 0) -> dict:
    lengths = [len(seq) for seq in labels]
    torch.manual_seed(seed)
    orders = {"random": torch.randperm(len(labels)).tolist(),
              "length_grouped": get_length_grouped_indices(lengths, batch_size)}
    model, optimizer = trainable(ModelSpec(n_layer=n_layer), {t for seq in labels for t in seq})
    mid, final = torch.randn(batch_size, 96, 8, 8), torch.randn(batch_size, 1280, 4, 4)
    bf16 = fast_bf16("cpu")

    def step(order: list[int], k: int) -> float:
        rows = [labels[i] for i in order[k * batch_size : (k + 1) * batch_size]]
        padded = torch.full((batch_size, max(map(len, rows))), -100, dtype=torch.long)
        for r, seq in enumerate(rows):
            padded[r, : len(seq)] = torch.tensor(seq)
        return timed_step(model, optimizer, padded, mid, final, bf16)

    n_batches = len(labels) // batch_size
    picked = np.random.default_rng(seed).choice(n_batches, min(steps, n_batches), replace=False).tolist()
    for order in orders.values():  # warm-up
        step(order, picked[0])
    seconds = dict.fromkeys(orders, 0.0)
    for k in picked:  # interleaved: the machine's drift touches both alike
        for name, order in orders.items():
            seconds[name] += step(order, k)
    out = {"n_layer": n_layer, "batch_size": batch_size, "precision": "bf16" if bf16 else "fp32",
           "captions": len(labels), "mean_caption_tokens": round(float(np.mean(lengths)), 2),
           "timed_steps": len(picked)}
    for name, order in orders.items():
        out[f"{name}_mean_batch_width"] = round(float(np.mean(batch_widths(lengths, order, batch_size))), 2)
        out[f"{name}_samples_per_second"] = round(batch_size * len(picked) / seconds[name], 1)
    out["speedup"] = round(out["length_grouped_samples_per_second"] / out["random_samples_per_second"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA_DIR, help="a catalog (Kaggle layout)")
    parser.add_argument("--n_layer", type=int, default=4, help="decoder depth (the cpu preset: 4)")
    parser.add_argument("--steps", type=int, default=12, help="batches timed per order")
    args = parser.parse_args()
    names = load_catalog(args.data_dir).products["productDisplayName"].astype(str).tolist()
    print(json.dumps(measure(encode_captions(names), args.n_layer, steps=args.steps), indent=1))


if __name__ == "__main__":
    main()
