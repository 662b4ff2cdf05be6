"""The brand step's training batch with channels-last convolutions against the default layout, side by side.

    python -m bench.probe_brand_step_layout                 # ~1 min on 2 cores

One batch of 256 stride-16 maps (96 x 8 x 8, as the cpu preset caches them) through the step's forward pass, loss,
backward pass and AdamW update, as training/train_brand_step.py runs it; the two layouts alternate round by round
on the same batches, each from the same ImageNet weights, and each layout's median is reported, with how far
apart the two layouts' losses end (the layout changes the rounding, not the arithmetic).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from ris_core.brand_step import BrandStep
from training.train_brand_step import BATCH, LR

WORDS = 436  # the first words of the split by name's training names


def timed_steps(channels_last: bool, batches: list[torch.Tensor], labels: torch.Tensor) -> tuple[list[float], float]:
    """Seconds per batch after the first, and the last batch's loss."""
    torch.manual_seed(0)
    step = BrandStep.from_imagenet([f"w{i}" for i in range(WORDS)])
    if channels_last:
        step.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(step.parameters(), lr=LR, weight_decay=0.05)
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        loss = nn.functional.cross_entropy(step(batch.float()), labels, label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    return seconds[1:], loss.item()  # the first batch warms the kernels up


def measure(rounds: int = 3, batches: int = 6) -> dict:
    generator = torch.Generator().manual_seed(0)
    maps = [torch.randn(BATCH, 96, 8, 8, generator=generator).half() for _ in range(batches)]
    labels = torch.randint(0, WORDS, (BATCH,), generator=generator)
    times: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
    losses: dict[str, float] = {}
    for _ in range(rounds):
        for name in times:
            seconds, losses[name] = timed_steps(name == "channels_last", maps, labels)
            times[name] += seconds
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"batch": BATCH, "threads": torch.get_num_threads(), "timed_batches": len(times["contiguous"]),
            **{f"{name}_s_per_batch": round(value, 4) for name, value in medians.items()},
            "channels_last_speedup": round(medians["contiguous"] / medians["channels_last"], 3),
            "last_loss_gap": abs(losses["contiguous"] - losses["channels_last"])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=6, help="batches per layout and round (the first not timed)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batches < 2:
        parser.error("--rounds must be at least 1 and --batches at least 2")
    result = measure(args.rounds, args.batches)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
