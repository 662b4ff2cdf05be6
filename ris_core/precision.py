"""Does this machine run bfloat16 at full speed? The answer picks the training precision and the backbone path.

Machines of the same kind differ: with AVX-512, oneDNN runs bf16 fast (the cpu preset was tuned there: bf16
1.6x over fp32); on an AMD EPYC with AVX2 only it falls back to a reference path, and the frozen MobileNetV2
ran 10x, a training step of the cpu preset 17x slower in bf16 than in fp32 (4.5 vs 78 samples/s).
`RIS_BF16=native` or `RIS_BF16=emulated` overrides the detection (e.g. to reproduce a bf16 result exactly).
"""

from __future__ import annotations

import functools
import os

import torch

OVERRIDE = "RIS_BF16"


@functools.cache
def fast_bf16(device: str = "cpu") -> bool:
    """True where bf16 kernels are native; False where they would be emulated slowly."""
    override = os.environ.get(OVERRIDE, "").strip().lower()
    if override in ("native", "emulated"):
        return override == "native"
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:  # oneDNN's own test: AVX-512 (core) or newer
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def round_to_bf16(tensor: torch.Tensor) -> torch.Tensor:
    """The nearest bfloat16 value of each element, kept as float32."""
    return tensor.to(torch.bfloat16).to(torch.float32)
