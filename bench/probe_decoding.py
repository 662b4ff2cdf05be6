"""Does step-by-step decoding (ris_core/decoding.py) make generate()'s decisions on a run's held-out photos?

    python -m bench.probe_decoding --run results/runs/reference-cpu       # all held-out greedy, 1,008 for beams

Captions every held-out photo greedily and the first `--beam_images` with 5-beam n-best lists, once through
transformers' `generate()` and once step by step, in one process, and prints how many differ and the seconds each
path took (side by side on the same photos; the encoder is included in both).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import probe_parser
from ris_core.data import Split, load_catalog
from ris_core.encoder_decoder import Captioner
from ris_core.images import open_image


def probe(run: Path, data_dir: Path, beam_images: int = 1008, num_beams: int = 5) -> dict:
    captioner = Captioner.load(run)
    catalog = load_catalog(data_dir)
    ids = [i for i in Split.load(run / "split.json").val_ids if i in catalog.products.index]
    images = [open_image(catalog.image_path(i)) for i in ids]
    found: dict[str, dict] = {}
    for name, fast in (("generate", False), ("step_by_step", True)):
        captioner.fast_decoding = fast
        started = time.perf_counter()
        greedy = captioner.caption(images, batch_size=64)
        middle = time.perf_counter()
        beams = [b for s in range(0, min(beam_images, len(images)), 16)
                 for b in captioner.n_best(images[s:s + 16][: beam_images - s], num_beams)]
        found[name] = {"greedy": greedy, "beams": beams, "greedy_seconds": round(middle - started, 1),
                       "beam_seconds": round(time.perf_counter() - middle, 1)}
    old, new = found["generate"], found["step_by_step"]
    return {"run": str(run), "held_out": len(images),
            "greedy_differ": sum(a != b for a, b in zip(old["greedy"], new["greedy"])),
            "beam_images": len(old["beams"]),
            "beam_lists_differ": sum(a != b for a, b in zip(old["beams"], new["beams"])),
            **{f"{k}_{name}": found[name][k] for name in found for k in ("greedy_seconds", "beam_seconds")}}


def main(argv: list[str] | None = None) -> None:
    parser = probe_parser(__doc__)
    parser.add_argument("--beam_images", type=int, default=1008)
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.run, args.data_dir, args.beam_images), indent=1))


if __name__ == "__main__":
    main()
