"""Where a caption's time goes on this machine, and what bf16 decoding would buy and change.

    python -m bench.probe_decoder_cost --run results/runs/reference-cpu      # ~2 min on 2 cores

On the first `--images` held-out photos of the run, one process, side by side:
- batch 1, per photo: preprocessing, the frozen backbone, greedy decoding, with 2 threads and with 1 (decoding at
  batch 1 is bound by streaming the weights from memory, not by arithmetic, so threads barely matter);
- batch 64: the same stages per photo;
- at batch 64, fp32 (what the library runs) against the decoder under bf16 autocast (the precision the `cpu`
  preset trains it in): ms per photo for greedy, 5-beam n-best and the likelihoods of 15 catalog names per photo,
  and how many greedy captions, beam lists and likeliest names differ between the two.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from bench.common import probe_parser
from ris_core import decoding
from ris_core.data import Split, load_catalog
from ris_core.encoder_decoder import Captioner
from ris_core.images import open_image


def _stages(captioner: Captioner, images: list, batch: int) -> dict[str, float]:
    """ms per photo of preprocessing, backbone (+ tokens) and greedy decoding at this batch size."""
    spent = {"preprocess": 0.0, "backbone": 0.0, "greedy": 0.0}
    for start in range(0, len(images), batch):
        clock = time.perf_counter()
        pixels = captioner.preprocess(images[start:start + batch])
        spent["preprocess"] += time.perf_counter() - clock
        clock = time.perf_counter()
        with torch.no_grad():
            hidden = _hidden(captioner, pixels)
        spent["backbone"] += time.perf_counter() - clock
        clock = time.perf_counter()
        decoding.greedy(captioner.model.decoder, hidden, captioner.start_token_id, captioner.eos_token_id, 32)
        spent["greedy"] += time.perf_counter() - clock
    return {stage: round(seconds / len(images) * 1000, 2) for stage, seconds in spent.items()}


def _hidden(captioner: Captioner, pixels: torch.Tensor) -> torch.Tensor:
    """What `Captioner.encode` hands the decoder, from already preprocessed pixels."""
    encoder = captioner.model.encoder
    if hasattr(encoder, "backbone_maps"):
        raw = encoder.tokens_from_maps(*encoder.backbone_maps(pixels))
    else:
        raw = encoder(pixel_values=pixels).last_hidden_state
    projection = getattr(captioner.model, "enc_to_dec_proj", None)
    resize = projection is not None and encoder.config.hidden_size != captioner.model.decoder.config.hidden_size
    return projection(raw) if resize else raw


def _decoded(captioner: Captioner, encoded: list, pools: list[list[str]], bf16: bool) -> tuple[dict, dict]:
    """(greedy captions, beam lists, likeliest pool index; ms per photo of each) under fp32 or bf16 autocast."""
    found: dict[str, list] = {"greedy": [], "beams": [], "likeliest": []}
    spent = dict.fromkeys(found, 0.0)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with context, torch.no_grad():
        for start, enc in encoded:
            clock = time.perf_counter()
            found["greedy"] += captioner._texts(decoding.greedy(captioner.model.decoder, enc.hidden,
                                                                captioner.start_token_id, captioner.eos_token_id, 32))
            spent["greedy"] += time.perf_counter() - clock
            clock = time.perf_counter()
            found["beams"] += captioner.n_best(enc, 5)
            spent["beams"] += time.perf_counter() - clock
            clock = time.perf_counter()
            scores = captioner.log_likelihoods(enc, pools[start:start + enc.hidden.shape[0]])
            found["likeliest"] += [int(s.argmax()) for s in scores]
            spent["likeliest"] += time.perf_counter() - clock
    count = len(found["greedy"])
    return found, {k: round(v / count * 1000, 2) for k, v in spent.items()}


def probe(run: Path, data_dir: Path, images_wanted: int = 256) -> dict:
    captioner = Captioner.load(run)
    catalog = load_catalog(data_dir)
    split = Split.load(run / "split.json")
    ids = [i for i in split.val_ids if i in catalog.products.index][:images_wanted]
    images = [open_image(catalog.image_path(i)) for i in ids]
    names = catalog.products.loc[[i for i in split.train_ids if i in catalog.products.index][: 15 * len(ids)],
                                 "productDisplayName"].tolist()
    pools = [names[15 * k:15 * (k + 1)] for k in range(len(ids))]
    out: dict = {"run": str(run), "photos": len(ids), "threads": torch.get_num_threads()}
    _stages(captioner, images[:8], 1)  # warm-up
    for threads in (torch.get_num_threads(), 1):
        torch.set_num_threads(threads)
        out[f"batch_1_ms_per_photo_{threads}_threads"] = _stages(captioner, images[:32], 1)
    torch.set_num_threads(out["threads"])
    out["batch_64_ms_per_photo"] = _stages(captioner, images, 64)
    encoded = [(start, captioner.encode(images[start:start + 64])) for start in range(0, len(images), 64)]
    _decoded(captioner, encoded[:1], pools, bf16=False)  # warm-up
    fp32, fp32_ms = _decoded(captioner, encoded, pools, bf16=False)
    bf16, bf16_ms = _decoded(captioner, encoded, pools, bf16=True)
    out["batch_64_decoder_ms_per_photo"] = {"fp32": fp32_ms, "bf16_autocast": bf16_ms}
    out["bf16_differs_from_fp32"] = {k: sum(a != b for a, b in zip(fp32[k], bf16[k], strict=True)) for k in fp32}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = probe_parser(__doc__)
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.run, args.data_dir, args.images), indent=1))


if __name__ == "__main__":
    main()
