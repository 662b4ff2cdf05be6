"""What machine the figures come from, and how fast it multiplies matrices (the floor other figures compare to)."""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import UTC, datetime


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """CPU, cores, torch threads, library versions, the date, and the load average when the run started.

    A 1-minute load average above the core count means something else was running: the figures are then low.
    """
    import torch
    import transformers

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "memory_gb": _memory_gb(),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def matmul_gflops(dtype_name: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` rate of one n x n @ n x n matmul in GFLOP/s (2 n^3 floating-point operations)."""
    import torch

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    a @ b  # warm-up: thread pool start, kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def bench_machine(quick: bool = False) -> dict:
    from ris_core.precision import fast_bf16

    n = 512 if quick else 2048
    # where bf16 is emulated a 2048 matmul takes over a minute, and nothing here runs bf16 there (the encoder
    # takes its float32 path): a smaller one tells the rate
    bf16_n = n if fast_bf16() else 512
    return {
        **machine_info(),
        "matmul_n": n,
        "matmul_fp32_gflops": round(matmul_gflops("float32", n, 2 if quick else 5), 1),
        "matmul_bf16_n": bf16_n,
        "matmul_bf16_gflops": round(matmul_gflops("bfloat16", bf16_n, 2 if quick else 5), 1),
        "fast_bf16": fast_bf16(),
    }
