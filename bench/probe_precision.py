"""bf16 on this machine: native, emulated in float32, or plain fp32, side by side in one run.

    python -m bench.probe_precision     # ~3 min on 2 cores; writes results/precision-probe.json

Measures the frozen MobileNetV2's extraction rate (bf16 autocast, its float32 emulation, fp32), one cpu-preset
training step (bf16 autocast vs fp32), and, on the 400 held-out demo products at 60x80, how many of the
reference captioner's captions (trained on bf16 maps) each backbone path reproduces exactly.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from bench.probe_throughput import BATCH, SHORTLIST, TOKENS
from bench.train_steps import timed_step, trainable
from ris_core import precision
from ris_core.data import Split, load_catalog
from ris_core.encoder_decoder import Captioner
from ris_core.files import write_json_atomic
from ris_core.images import open_image
from ris_core.metrics import corpus_bleu
from ris_core.modeling import ModelSpec, build_captioner
from ris_core.runs import RESULTS_DIR

REPO = Path(__file__).resolve().parent.parent
REFERENCE = RESULTS_DIR / "runs" / "reference-cpu"
SMALL = REPO.parent / "shared" / "data" / "fashion-product-images-small"
PATHS = ("native", "emulated", "fp32")


def use(path: str, encoder) -> None:
    """Route the backbone through one path: bf16 autocast, its emulation, or fp32."""
    encoder.config.backbone_precision = "fp32" if path == "fp32" else "bf16"
    precision.fast_bf16.cache_clear()
    os.environ[precision.OVERRIDE] = "emulated" if path == "emulated" else "native"


def extraction_rate(path: str, n: int = 128) -> float:
    encoder = build_captioner(ModelSpec()).encoder
    use(path, encoder)
    pixels = torch.randn(n, 3, 128, 128)
    encoder.backbone_maps(pixels[:16])
    started = time.perf_counter()
    encoder.backbone_maps(pixels)
    return n / (time.perf_counter() - started)


def step_rate(bf16: bool, steps: int = 4) -> float:
    model, optimizer = trainable(ModelSpec(), set(range(SHORTLIST)))
    mid, final = torch.randn(BATCH, 96, 8, 8), torch.randn(BATCH, 1280, 4, 4)
    labels = torch.randint(0, SHORTLIST, (BATCH, TOKENS + 2))
    labels[:, TOKENS], labels[:, TOKENS + 1 :] = 50256, -100
    timed_step(model, optimizer, labels, mid, final, bf16)  # warm-up
    return BATCH * steps / sum(timed_step(model, optimizer, labels, mid, final, bf16) for _ in range(steps))


def caption_agreement() -> dict:
    captioner = Captioner.load(REFERENCE)
    catalog = load_catalog(SMALL)
    demo = load_catalog(REPO / "data" / "demo").products.index
    ids = [i for i in Split.load(REFERENCE / "split.json").val_ids if i in demo]
    images = [open_image(catalog.image_path(i)) for i in ids]
    references = catalog.products.loc[ids, "productDisplayName"].tolist()
    captions, out = {}, {"products": len(ids)}
    for path in PATHS:
        use(path, captioner.model.encoder)
        started = time.perf_counter()
        captions[path] = captioner.caption(images, batch_size=64)
        out[path] = {"seconds": round(time.perf_counter() - started, 1),
                     "bleu_4": round(corpus_bleu(captions[path], references)["bleu_4"], 2),
                     "same_as_native": sum(a == b for a, b in zip(captions[path], captions["native"])) / len(ids)}
    return out


def main() -> None:
    result = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"),
              "extraction_images_per_second": {p: round(extraction_rate(p), 1) for p in PATHS},
              "train_samples_per_second": {"bf16": round(step_rate(True), 1), "fp32": round(step_rate(False), 1)},
              "reference_captions": caption_agreement()}
    print(json.dumps(result, indent=1))
    write_json_atomic(RESULTS_DIR / "precision-probe.json", result)


if __name__ == "__main__":
    main()
