"""Captioning throughput at batch 1 and batch 64, against a floor from the model's FLOPs and this CPU's matmul rate.

The floor is what captioning would cost if every floating-point operation ran at the speed of one large matmul:
encoder FLOPs at the bf16 rate (the frozen backbone runs under bf16 autocast; at the fp32 rate where bf16 is slow and
the backbone emulates it in float32) plus decoder FLOPs at the fp32 rate.
`x_floor` = measured seconds per caption / floor seconds per caption (1.0 would be perfect).
Beside it, a reranked caption (ris_core/rerank.py: 5 beams + 10 catalog names, scored on both views) per image,
the greedy pass's encoder output reused by the reranking as in the evaluation, and its cost as a multiple of the
greedy caption's, measured in the same run on the same images, at batch 1, 16 (the target's) and 64 (the
evaluation's). `full_head_*`: the same figures with the plain 50,257-way output layer instead of the shortlist
head (ris_core/output_head.py);
`generate_*`: with transformers' generate() instead of step-by-step decoding (ris_core/decoding.py).
`brand_step_*`: with a brand step (ris_core/brand_step.py) choosing each greedy caption's first word.
`rows_reranked_*`: reranked with each candidate scored as its own padded row instead of over the image's prefix
tree (ris_core/prefix_tree.py); `glibc_defaults_*`: greedy rates in a fresh process that keeps glibc's allocator
settings (RIS_MALLOC=default) instead of ris_core/allocator.py's.
`backbone_ms_per_photo`: the frozen backbone over a batch of 128 photos (as the evaluation embeds the catalog) in
chunks of `BACKBONE_CHUNK` against one pass, interleaved, medians.
`preprocess_ms_per_photo`: squaring and normalising 64 photos with the image processor against the lookup table
(`ris_core.modeling.pixel_values`, the same pixels bit for bit), interleaved, medians.
`rerank_stage_ms_per_image`: one reranked batch of 16 split into its stages (one encoder pass per view, the beams,
the likelihoods of both views over prefix trees and as padded rows), beside the likelihoods with each candidate's
cross-attention keys and values projected again (the path before `ris_core.modeling.cross_attention_cache`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import REPO, demo_image_paths, reference_run
from bench.machine import matmul_gflops
from ris_core.allocator import OVERRIDE
from ris_core.brand_step import BrandStep, written_forms
from ris_core.data import DEFAULT_DATA_DIR
from ris_core.encoding_cache import EncodingCache
from ris_core.errors import RunError
from ris_core.images import open_image
from ris_core.output_head import ShortlistHead
from ris_core.precision import fast_bf16
from ris_core.rerank import RerankConfig, candidate_pool, rerank


def load_captioner():
    """(captioner, where it came from): the reference run, any trained run, or an untrained ModelSpec()."""
    from ris_core.captioner import Captioner
    from ris_core.modeling import ModelSpec, build_captioner

    run, why = reference_run()
    if run is not None:
        return Captioner.load(run.path), why
    spec = ModelSpec()
    model = build_captioner(spec).eval()
    return Captioner(model=model, spec=spec, name="untrained"), f"untrained build_captioner(ModelSpec()) ({why})"


def full_output_layer(model: torch.nn.Module) -> torch.nn.Linear:
    """The plain output layer, tied to the token embedding as saved."""
    wte = model.decoder.transformer.wte.weight
    head = torch.nn.Linear(wte.shape[1], wte.shape[0], bias=False)
    head.weight = wte
    return head


def caption_flops(captioner, images) -> tuple[float, float, float]:
    """(encoder, decoder, tokens) per caption for one `run_batch` over `images`, counted by FlopCounterMode."""
    from ris_core.tokenizer import gpt2_tokenizer

    pixels = captioner.preprocess(images)
    with FlopCounterMode(display=False) as encoder_count:
        mid, final = captioner.model.encoder.backbone_maps(pixels)
        captioner.model.encoder.tokens_from_maps(mid, final)
    with FlopCounterMode(display=False) as total_count:
        captions = captioner.run_batch(images).captions
    encoder = encoder_count.get_total_flops()
    decoder = total_count.get_total_flops() - encoder
    tokens = sum(len(gpt2_tokenizer()(c)["input_ids"]) + 1 for c in captions)  # + EOS
    n = len(images)
    return encoder / n, decoder / n, tokens / n


def images_per_second(captioner, images, batch_size: int, repeats: int) -> float:
    captioner.caption(images[:batch_size], batch_size=batch_size)  # warm-up at this shape
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        captioner.caption(images, batch_size=batch_size)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def reranked_per_second(captioner, images, batch_size: int, repeats: int) -> float:
    """Reranked captions per second, greedy captioning included (the names and similarities are fixed).

    As in the evaluation, the greedy pass's encoder output is kept for the reranking (an empty cache each pass,
    so no pass starts with encodings of an earlier one)."""
    names = [(f"Brand{i} Men Blue Printed Round Neck T-shirt", 0.9 - 0.01 * i) for i in range(RerankConfig().k)]
    shares, kept = hasattr(captioner, "encodings"), getattr(captioner, "encodings", None)
    best = float("inf")
    try:
        for _ in range(repeats + 1):  # the first pass warms up
            if shares:
                captioner.encodings = EncodingCache(1 << 30)
            start = time.perf_counter()
            for s in range(0, len(images), batch_size):
                chunk = images[s : s + batch_size]
                rerank(captioner, chunk, captioner.caption(chunk, batch_size=batch_size), [names] * len(chunk))
            best = min(best, time.perf_counter() - start)
    finally:
        if shares:
            captioner.encodings = kept
    return len(images) / best


def rerank_stages(captioner, images, repeats: int) -> dict:
    """Milliseconds per image of each reranking stage on one batch, best of `repeats` (after a warm-up)."""
    from PIL import ImageOps

    from ris_core.encoder_decoder import _padded
    from ris_core.modeling import sequence_log_likelihoods
    from ris_core.tokenizer import encode_captions

    config = RerankConfig()
    names = [(f"Brand{i} Men Blue Printed Round Neck T-shirt", 0.9 - 0.01 * i) for i in range(config.k)]
    mirrored = [ImageOps.mirror(im) for im in images]
    best: dict[str, float] = {}

    @contextmanager
    def timed(stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        best[stage] = min(best.get(stage, float("inf")), time.perf_counter() - start)

    with torch.no_grad():
        for _ in range(repeats + 1):
            with timed("encoder, both views"):
                views = captioner.encode(images), captioner.encode(mirrored)
            with timed("beams"):
                beams = captioner.n_best(views[0], config.num_beams)
            if getattr(captioner, "decodes_fast", False):
                captioner.fast_decoding = False
                with timed("beams, generate()"):
                    captioner.n_best(views[0], config.num_beams)
                captioner.fast_decoding = True
            texts = [list(candidate_pool(b, names, config.generated_margin)) for b in beams]
            with timed("likelihoods, both views"):
                for view in views:
                    captioner.log_likelihoods(view, texts)
            if getattr(captioner, "tree_scoring", False):
                captioner.tree_scoring = False
                with timed("likelihoods, both views, one padded row per candidate"):
                    for view in views:
                        captioner.log_likelihoods(view, texts)
                captioner.tree_scoring = True
            rows = torch.tensor([i for i, ts in enumerate(texts) for _ in ts])
            labels = _padded(encode_captions([t for ts in texts for t in ts]))
            hidden = views[0].hidden
            with timed("likelihoods, one view, one padded pass, shared cross-attention"):
                sequence_log_likelihoods(captioner.model, hidden, labels, rows)
            with timed("likelihoods, one view, one padded pass, cross-attention per candidate"):
                sequence_log_likelihoods(captioner.model, hidden[rows], labels)
    return {stage: round(seconds / len(images) * 1000, 2) for stage, seconds in best.items()}


def variant_rates(captioner, images, shapes, quick: bool, prefix: str) -> dict:
    """Greedy images/s at each (batch, images, repeats) shape and reranked at batch 16, of a variant the caller
    has switched on (the old output layer, generate())."""
    out = {f"{prefix}_batch_{batch}_images_per_second": round(images_per_second(captioner, images[:count], batch,
                                                                                 repeats), 2)
           for batch, count, repeats in shapes}
    batch = 2 if quick else 16
    out[f"{prefix}_reranked_batch_{batch}_images_per_second"] = round(
        reranked_per_second(captioner, images[: 4 if quick else 32], batch, 1), 2)
    return out


def brand_step_rates(captioner, images, shapes, quick: bool) -> dict:
    """`variant_rates` with a brand step (ris_core/brand_step.py) over the demo catalog's first words: what the
    step and the choice of the first word cost beside plain greedy. Its linear layer is untrained: the cost, not
    the choices, is measured (a word of one token or three changes little)."""
    names = pd.read_csv(DEFAULT_DATA_DIR / "styles.csv", usecols=["productDisplayName"], keep_default_na=False)
    captioner.brand_step = BrandStep.from_imagenet(sorted(set(written_forms(
        names["productDisplayName"].tolist()).values()))).eval()
    try:
        return variant_rates(captioner, images, shapes, quick, "brand_step")
    finally:
        captioner.brand_step = None


def bench_captioning(quick: bool = False, fp32_gflops: float | None = None, bf16_gflops: float | None = None) -> dict:
    torch.manual_seed(0)
    captioner, source = load_captioner()
    small, large = (1, 4) if quick else (1, 64)
    images = [open_image(p) for p in demo_image_paths(large)]
    n = 512 if quick else 2048
    fp32 = fp32_gflops or matmul_gflops("float32", n, 2 if quick else 5)
    bf16 = bf16_gflops or matmul_gflops("bfloat16", n if fast_bf16() else 512, 2 if quick else 5)
    # the encoder's floor: bf16 where it runs natively, else the float32 emulation (ris_core/encoders.py)
    encoder_rate = bf16 if fast_bf16() else fp32
    out: dict = {"model": source, "parameters_millions": round(sum(p.numel() for p in captioner.model.parameters())
                                                                / 1e6, 2)}
    # (batch size, images, repeats)
    shapes = ((small, 2 if quick else 16, 1 if quick else 2), (large, large, 1 if quick else 3))
    for batch, count, repeats in shapes:
        rate = images_per_second(captioner, images[:count], batch, repeats)
        encoder, decoder, tokens = caption_flops(captioner, images[:batch])
        floor = encoder / (encoder_rate * 1e9) + decoder / (fp32 * 1e9)
        out.update({
            f"batch_{batch}_images_per_second": round(rate, 2),
            f"batch_{batch}_gflops_per_caption": round((encoder + decoder) / 1e9, 3),
            f"batch_{batch}_encoder_gflops_per_caption": round(encoder / 1e9, 3),
            f"batch_{batch}_tokens_per_caption": round(tokens, 1),
            f"batch_{batch}_floor_images_per_second": round(1 / floor, 1),
            f"batch_{batch}_x_floor": round((1 / rate) / floor, 1),
        })
    # batch 16 is the target's; 64 is the evaluation's (ris_core.evaluation.pipeline._reranked)
    for batch, count in ((small, 2 if quick else 8), (16 if not quick else 2, 4 if quick else 32),
                         (4 if quick else 64, 4 if quick else 64)):
        reranked = reranked_per_second(captioner, images[:count], batch, 1)
        greedy = images_per_second(captioner, images[:count], batch, 1)
        out.update({f"reranked_batch_{batch}_images_per_second": round(reranked, 2),
                    f"reranked_batch_{batch}_x_greedy": round(greedy / reranked, 1)})
    if hasattr(getattr(captioner.model.decoder, "transformer", None), "h"):  # a GPT-2 decoder
        out["batch_1_weight_stream"] = weight_stream(captioner, out[f"batch_{small}_tokens_per_caption"],
                                                     200 if quick else 2000, images[: 2 if quick else 16])
    if hasattr(captioner, "draft"):
        out["drafted_batch_1"] = drafted_batch_1(captioner, 4 if quick else 32, 1 if quick else 3)
    if hasattr(captioner.model.encoder, "backbone_maps"):
        out["backbone_ms_per_photo"] = backbone_chunking(captioner, images, 1 if quick else 3)
    if getattr(captioner, "spec", None) is not None:
        out["preprocess_ms_per_photo"] = preprocessing(captioner.spec, images, 1 if quick else 5)
    if hasattr(captioner, "encode"):
        out["rerank_stage_ms_per_image"] = rerank_stages(captioner, images[: 4 if quick else 16], 1 if quick else 3)
    if getattr(captioner, "decodes_fast", False):  # generate(), side by side
        captioner.fast_decoding = False
        try:
            out.update(variant_rates(captioner, images, shapes, quick, "generate"))
        finally:
            captioner.fast_decoding = True
    if getattr(captioner, "tree_scoring", False):  # candidates one padded row each, side by side
        captioner.tree_scoring = False
        try:
            reranked = reranked_per_second(captioner, images[: 4 if quick else 32], 2 if quick else 16, 1)
            out[f"rows_reranked_batch_{2 if quick else 16}_images_per_second"] = round(reranked, 2)
        finally:
            captioner.tree_scoring = True
    if not quick:
        out.update(glibc_default_rates())
    if getattr(captioner, "brand_step", False) is None and captioner.has_backbone and captioner.decodes_fast:
        out.update(brand_step_rates(captioner, images, shapes, quick))
    if isinstance(captioner.model.decoder.lm_head, ShortlistHead):  # the old output layer, side by side
        head = captioner.model.decoder.lm_head
        captioner.model.decoder.lm_head = full_output_layer(captioner.model)
        try:
            out.update(variant_rates(captioner, images, shapes, quick, "full_head"))
        finally:
            captioner.model.decoder.lm_head = head
    out.update(matmul_fp32_gflops=round(fp32, 1), matmul_bf16_gflops=round(bf16, 1))
    return out


def _step_matmuls(block: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """A GPT-2 block's matmuls that run at every decoding step (not cross-attention's keys and values)."""
    return (block.attn.c_attn, block.attn.c_proj, block.crossattention.q_attn, block.crossattention.c_proj,
            block.mlp.c_fc, block.mlp.c_proj)


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def weight_stream(captioner, tokens_per_caption: float, repeats: int, photos: list | None = None) -> dict:
    """Batch 1's other floor: every decoder step reads all of the blocks' and the output layer's weights for one row.

    The bytes a step reads (the six per-step matmuls of each block, the output layer's rows; cross-attention keys
    and values are projected once per photo), the rate the first block's matmuls read their weights at batch 1
    here, and the captions per second the decoder could not exceed at that rate. With `photos`, also one photo's
    encoder pass as measured (no cache) and the captions per second of both together."""
    transformer = captioner.model.decoder.transformer
    head = captioner.model.decoder.lm_head
    step_bytes = (sum(_bytes(layer.weight) for block in transformer.h for layer in _step_matmuls(block))
                  + _bytes(head.rows if isinstance(head, ShortlistHead) else head.weight))
    first = _step_matmuls(transformer.h[0])
    inputs = [torch.randn(1, layer.weight.shape[0]) for layer in first]  # GPT-2's Conv1D: weight is (in, out)
    with torch.inference_mode():
        for _ in range(repeats // 10):  # warm-up
            for layer, x in zip(first, inputs):
                layer(x)
        start = time.perf_counter()
        for _ in range(repeats):
            for layer, x in zip(first, inputs):
                layer(x)
        seconds = (time.perf_counter() - start) / repeats
    rate = sum(_bytes(layer.weight) for layer in first) / seconds
    decoder_seconds = step_bytes * tokens_per_caption / rate
    out = {"decoder_mb_per_step": round(step_bytes / 1e6, 1), "gb_per_second": round(rate / 1e9, 1),
           "decoder_floor_images_per_second": round(1 / decoder_seconds, 1)}
    if photos and hasattr(captioner, "encode"):
        kept, captioner.encodings = getattr(captioner, "encodings", None), None  # every pass computed
        try:
            captioner.encode(photos[:1])  # warm-up at batch 1
            start = time.perf_counter()
            for photo in photos:
                captioner.encode([photo])
            encoder_seconds = (time.perf_counter() - start) / len(photos)
        finally:
            captioner.encodings = kept
        out.update(encoder_ms=round(encoder_seconds * 1e3, 2),
                   with_encoder_images_per_second=round(1 / (encoder_seconds + decoder_seconds), 1))
    return out


def drafted_batch_1(captioner, count: int, repeats: int) -> dict:
    """Greedy captions one photo at a time, with a draft of the demo catalog's training names
    (`ris_core.draft`) against without, interleaved, on the first `count` of the run's held-out demo photos:
    images/s (best of `repeats`), decoder steps per caption, and the share of captions equal to the plain ones."""
    from ris_core import decoding
    from ris_core.data import load_catalog

    run, why = reference_run()
    if run is None:
        return {"skipped": why}
    try:
        split = run.split()
    except RunError as err:
        return {"skipped": str(err)}
    catalog = load_catalog(DEFAULT_DATA_DIR)
    training = split.searchable_ids(catalog.products)
    held_out = [i for i in catalog.products.index if int(i) not in set(training)][:count]
    if not held_out:
        return {"skipped": f"none of {DEFAULT_DATA_DIR}'s products is held out by {run.name}"}
    images = [open_image(catalog.image_path(i)) for i in held_out]
    draft = captioner.draft_from(catalog.products.loc[training, "productDisplayName"].astype(str).tolist())
    decoder, steps = decoding.IncrementalDecoder, {"plain": 0, "drafted": 0}
    step, extend = decoder.step, decoder.extend
    kept, best, captions = captioner.draft, {"plain": float("inf"), "drafted": float("inf")}, {}

    def counted(method, name: str):
        def call(state, tokens):
            steps[name] += 1
            return method(state, tokens)
        return call

    decoder.step, decoder.extend = counted(step, "plain"), counted(extend, "drafted")
    try:
        for _ in range(repeats + 1):  # the first round warms up
            for name, with_draft in (("plain", None), ("drafted", draft)):
                captioner.draft, steps[name] = with_draft, 0
                start = time.perf_counter()
                captions[name] = captioner.caption(images, batch_size=1)
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        captioner.draft, decoder.step, decoder.extend = kept, step, extend
    return {"photos": len(images), "draft_names": len(training),
            **{f"{name}_images_per_second": round(len(images) / seconds, 2) for name, seconds in best.items()},
            **{f"{name}_steps_per_caption": round(count / len(images), 2) for name, count in steps.items()},
            "identical_captions": round(sum(a == b for a, b in zip(captions["plain"], captions["drafted"]))
                                        / len(images), 4)}


def backbone_chunking(captioner, images, repeats: int) -> dict:
    """ms per photo of the backbone over 128 photos in cache-sized chunks and in one pass (ris_core/encoders.py)."""
    from ris_core import encoders

    pixels = captioner.preprocess((images * (128 // len(images) + 1))[:128])
    chunk, times = encoders.BACKBONE_CHUNK, {"chunks": [], "one_pass": []}
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                for name, size in (("chunks", chunk), ("one_pass", len(pixels))):
                    encoders.BACKBONE_CHUNK = size
                    started = time.perf_counter()
                    captioner.model.encoder.backbone_maps(pixels)
                    times[name].append(1000 * (time.perf_counter() - started) / len(pixels))
    finally:
        encoders.BACKBONE_CHUNK = chunk
    return {f"chunks_of_{chunk}": round(sorted(times["chunks"])[repeats // 2], 2),
            "one_pass_of_128": round(sorted(times["one_pass"])[repeats // 2], 2)}


def preprocessing(spec, images, repeats: int) -> dict:
    """ms per photo to square and normalise `images`: the image processor against the lookup table."""
    from ris_core.images import square
    from ris_core.modeling import image_processor, pixel_values

    processor, times = image_processor(spec), {"processor": [], "lookup_table": []}
    for _ in range(repeats):
        for name in times:
            started = time.perf_counter()
            squares = [square(im, spec.image_size, spec.source_max_side) for im in images]
            if name == "processor":
                processor(images=squares, return_tensors="pt")
            else:
                pixel_values(spec, squares)
            times[name].append(1000 * (time.perf_counter() - started) / len(images))
    return {name: round(sorted(values)[repeats // 2], 3) for name, values in times.items()}


def glibc_default_rates() -> dict:
    """Greedy images/s at batch 1 and 64 in a fresh process that keeps glibc's allocator settings
    (RIS_MALLOC=default): the side-by-side "before" of ris_core/allocator.py, which this process has applied."""
    env = {**os.environ, OVERRIDE: "default"}
    done = subprocess.run([sys.executable, "-m", "bench.captioning"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        return {"glibc_defaults_error": done.stderr[-500:]}
    return {f"glibc_defaults_{key}": value for key, value in json.loads(done.stdout.splitlines()[-1]).items()}


def greedy_rates() -> dict:
    captioner, _ = load_captioner()
    images = [open_image(p) for p in demo_image_paths(64)]
    return {"batch_1_images_per_second": round(images_per_second(captioner, images[:16], 1, 2), 2),
            "batch_64_images_per_second": round(images_per_second(captioner, images, 64, 3), 2)}


if __name__ == "__main__":  # the greedy rates of this process, one JSON line (for glibc_default_rates)
    print(json.dumps(greedy_rates()))
