"""Whether a device runs bfloat16 GEMMs faster than float32 ones: measured once per process.

The energy sketch's power steps (:func:`spectra.linalg.sketch.energy_sketch`) only steer a
subspace whose values come from an exact float32 Rayleigh–Ritz step, so they can run in
bfloat16 wherever that is faster. How much faster depends on the hardware, not on torch:

- CPUs with AMX or AVX-512 BF16, GPUs since Ampere: 2–5× float32's rate (941 against
  205 GFLOP/s on 2 cores of an AMD EPYC with AVX-512 BF16, 2048×5632 @ 5632×128);
- CPUs with AVX2 only (many workstations, older servers): torch falls back to a reference
  kernel at 0.3–2 GFLOP/s, 50–300× *slower* than float32 (77–94 GFLOP/s on 2 cores of an
  AVX2 AMD EPYC, torch 2.13). A TinyLlama-1.1B-shaped analysis took 212 s there with bf16
  power steps and 23 s with float32 ones.

So the choice is measured on the device at hand, on a GEMM of the sketch's shape, instead
of guessed from a CPU flag list (which torch exposes only privately, and which says
nothing about a GPU).
"""

from __future__ import annotations

import functools
import math
import time

import torch

__all__ = ["bfloat16_speedup", "fast_sketch_dtype"]

_PROBE = (1024, 1024, 64)  # (m, k, n): a weight times a thin block, as in the sketch's power steps
_FASTER_BY = 1.25  # bf16 must beat float32 by this much; otherwise float32's accuracy costs nothing


def _best_time(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """Shortest wall time of `repeats` products a @ b, after one that warms kernels and caches up."""
    cuda = a.device.type == "cuda"
    best = math.inf
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize(a.device)
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize(a.device)
        if i:
            best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def bfloat16_speedup(device: str = "cpu", repeats: int = 2) -> float:
    """float32's time over bfloat16's for one (1024 × 1024) @ (1024 × 64) GEMM on `device`.

    Best of `repeats` timed runs of each, at the current torch thread count. Above 1,
    bfloat16 is faster. Cached per process and device: measuring takes ~5 ms where bf16
    is fast and ~0.2 s where it is emulated.
    """
    m, k, n = _PROBE
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(device)
    b = torch.randn(k, n, generator=generator).to(device)
    single = _best_time(a, b, repeats)
    half = _best_time(a.bfloat16(), b.bfloat16(), repeats)
    return single / half if half > 0 else math.inf


def fast_sketch_dtype(device: str = "cpu") -> str:
    """``"bfloat16"`` where its GEMMs run ≥ 1.25× float32's rate on `device`, else ``"float32"``."""
    return "bfloat16" if bfloat16_speedup(str(device)) >= _FASTER_BY else "float32"
