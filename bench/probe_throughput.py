"""Measure the cpu preset's design choices side by side in one run (throughput only, no accuracy).

    python -m bench.probe_throughput   # ~30 s on 2 cores; writes results/cpu-preset-throughput.json
    python -m bench.probe_throughput --out /tmp/throughput.json   # another machine: keep the committed figures

Variants of one training step (batch 64, 10 target tokens per caption, AdamW; bf16 autocast where bf16 is fast,
else fp32, as `training.train` chooses): multi-scale tokens (80) vs final map only (16), and the output-layer
shortlist vs the full 50,257-way softmax; plus the frozen backbone's extraction rate as training extracts maps
(channels_last) in fp32 vs bf16 (emulated in float32 where bf16 is slow, as the captioner serves it). The file
records which.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.train_steps import timed_step, trainable
from ris_core.files import write_json_atomic
from ris_core.modeling import ModelSpec, build_captioner
from ris_core.precision import fast_bf16
from ris_core.runs import RESULTS_DIR

BATCH, TOKENS, SHORTLIST = 64, 10, 7259  # 7,259 distinct GPT-2 tokens occur in the 44k product names


def step_rate(multi_scale: bool, shortlist: bool, bf16: bool, steps: int = 6) -> float:
    model, optimizer = trainable(ModelSpec(multi_scale=multi_scale), set(range(SHORTLIST)) if shortlist else None)
    mid, final = torch.randn(BATCH, 96, 8, 8), torch.randn(BATCH, 1280, 4, 4)
    labels = torch.randint(0, SHORTLIST, (BATCH, TOKENS + 2))
    labels[:, TOKENS] = 50256
    labels[:, TOKENS + 1 :] = -100
    for _ in range(2):  # warm-up
        timed_step(model, optimizer, labels, mid, final, bf16=bf16)
    return BATCH * steps / sum(timed_step(model, optimizer, labels, mid, final, bf16=bf16) for _ in range(steps))


def extraction_rate(bf16: bool, n: int = 256) -> float:
    """Frozen maps per second as training extracts them (`backbone_maps`: channels_last, chunked)."""
    encoder = build_captioner(replace(ModelSpec(), backbone_precision="bf16" if bf16 else "fp32")).encoder
    pixels = torch.randn(n, 3, 128, 128)
    with torch.no_grad():
        encoder.backbone_maps(pixels[:32])
        started = time.perf_counter()
        encoder.backbone_maps(pixels)
    return n / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "cpu-preset-throughput.json")
    args = parser.parse_args(argv)
    fast = fast_bf16()
    rows = []
    for multi_scale in (True, False):
        for shortlist in (True, False):
            rate = step_rate(multi_scale, shortlist, bf16=fast)
            rows.append({"variant": f"{'80 tokens (8x8+4x4)' if multi_scale else '16 tokens (4x4)'}, "
                                    f"{'shortlist softmax' if shortlist else 'full softmax'}",
                         "train_samples_per_second": round(rate, 1), "epoch_minutes_40k": round(39990 / rate / 60, 1)})
    for bf16 in (False, True):
        bf16_name = "bf16 + channels_last" if fast else "bf16 emulated in float32 + channels_last"
        rows.append({"variant": f"backbone extraction {bf16_name if bf16 else 'fp32 + channels_last'}",
                     "images_per_second": round(extraction_rate(bf16), 1)})
    for row in rows:
        print(json.dumps(row))
    write_json_atomic(args.out, {"threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                                 "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                 "training_precision": "bf16" if fast else "fp32", "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
