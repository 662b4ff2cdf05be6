"""Training throughput of the `cpu` preset's step, and what it means for one epoch of the full dataset.

The step is the one `training/train.py` runs: TrainableCaptioner fed cached backbone maps (float16, the
feature cache's shapes), bf16 autocast, the output shortlist, AdamW, gradient clipping at 1.0. The per-epoch
validation pass and data loading are not included, so the projection is a lower bound on an epoch's time.
"""

from __future__ import annotations

import time

import torch

from bench.common import FULL_SMALL, REFERENCE
from ris_core.data import DEFAULT_DATA_DIR, read_styles

FULL_TRAIN_PRODUCTS = 39_990  # 44,441 products, 10% held out, unreadable images skipped (the reference run's split)


def caption_labels(limit: int | None = None) -> list[list[int]]:
    """Real GPT-2 token ids of product names (all 44k when the full data is here, else the demo's 3,000)."""
    from ris_core.tokenizer import encode_captions

    source = FULL_SMALL if (FULL_SMALL / "styles.csv").is_file() else DEFAULT_DATA_DIR
    frame, _ = read_styles(source / "styles.csv")
    names = [n for n in frame["productDisplayName"].tolist() if n and n.upper() != "NA"][:limit]
    return encode_captions(names, 48)


def bench_training(quick: bool = False) -> dict:
    from ris_core.modeling import build_captioner
    from training.args import model_spec, parse_args
    from training.train import TrainableCaptioner

    torch.manual_seed(0)
    model_args, _, run_args = parse_args([])  # the cpu preset, as `make reference` resolves it
    spec = model_spec(model_args)
    batch = 8 if quick else run_args.batch_size
    steps = 2 if quick else 30
    base = build_captioner(spec)
    model = TrainableCaptioner(config=base.config, encoder=base.encoder, decoder=base.decoder)
    labels_pool = caption_labels(2_000 if quick else None)
    model.set_output_shortlist({t for seq in labels_pool for t in seq})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run_args.learning_rate, weight_decay=run_args.weight_decay)

    side = spec.image_size
    generator = torch.Generator().manual_seed(0)

    def make_batch(step: int) -> dict:
        rows = [labels_pool[(step * batch + i) % len(labels_pool)] for i in range(batch)]
        labels = torch.full((batch, max(map(len, rows))), -100, dtype=torch.long)
        for r, seq in enumerate(rows):
            labels[r, : len(seq)] = torch.tensor(seq)
        return {
            "labels": labels,
            "mid": torch.randn(batch, 96, side // 16, side // 16, generator=generator).half(),
            "final": torch.randn(batch, 1280, side // 32, side // 32, generator=generator).half(),
        }

    def step(inputs: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    batches = [make_batch(i) for i in range(steps + 2)]
    for inputs in batches[:2]:  # warm-up: optimizer state allocation, kernel selection
        step(inputs)
    start = time.perf_counter()
    for inputs in batches[2:]:
        step(inputs)
    seconds = time.perf_counter() - start
    rate = batch * steps / seconds
    out = {
        "batch_size": batch, "steps_timed": steps, "shortlist_tokens": int(len(model.shortlist)),
        "trainable_parameters_millions": round(sum(p.numel() for p in params) / 1e6, 2),
        "samples_per_second": round(rate, 1),
        "projected_epoch_minutes_39990": round(FULL_TRAIN_PRODUCTS / rate / 60, 1),
    }
    history = REFERENCE / "history.csv"
    if history.is_file():  # what the real run measured, data loading and validation included
        import pandas as pd

        measured = pd.read_csv(history)
        if "samples_per_second" in measured and len(measured):
            out["reference_history_samples_per_second"] = round(float(measured["samples_per_second"].median()), 1)
            out["reference_history_epoch_minutes"] = round(float(measured["seconds"].median()) / 60, 1)
    return out
