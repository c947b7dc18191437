"""Synthetic matrices with known spectra, shared by the linalg tests (fixed seeds, ≤ 512)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _orth(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return Q


def planted(m=300, n=400, rank=8, noise=0.01, signal=None, seed=0, dtype=torch.float32):
    """Rank-`rank` signal with singular values `signal` + i.i.d. N(0, noise²) entries."""
    g = torch.Generator().manual_seed(seed)
    if signal is None:
        edge = noise * (m**0.5 + n**0.5)
        signal = torch.linspace(6 * edge, 3 * edge, rank, dtype=torch.float64)
    S = (_orth(m, rank, g) * signal) @ _orth(n, rank, g).T
    return (S + noise * torch.randn(m, n, generator=g, dtype=torch.float64)).to(dtype)


def power_law(m=256, n=384, alpha=0.7, seed=0, dtype=torch.float32):
    """σᵢ = i^(−alpha) with random singular vectors: the slow-decay case."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    s = torch.arange(1, r + 1, dtype=torch.float64) ** -alpha
    return ((_orth(m, r, g) * s) @ _orth(n, r, g).T).to(dtype), s


def bf16_pair(m=256, n=512, rank=4, seed=0):
    """(base, tuned) both rounded to bf16; tuned − base = planted rank-`rank` update + rounding."""
    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(m, n, generator=g, dtype=torch.float64)
    # Rounding noise std ≈ √(2·mean ulp²/12) ≈ 5e-5 here; edge ≈ σ(√m+√n) ≈ 2e-3.
    signal = torch.linspace(0.02, 0.01, rank, dtype=torch.float64)
    update = (_orth(m, rank, g) * signal) @ _orth(n, rank, g).T
    return base.to(torch.bfloat16), (base + update).to(torch.bfloat16)


def reference_svdvals(M: torch.Tensor) -> np.ndarray:
    """float64 numpy SVD: the independent reference."""
    return np.linalg.svd(M.double().numpy(), compute_uv=False)


@pytest.fixture(scope="session")
def spectra_cases():
    """The three spectrum types of issue 3: name -> float32 matrix."""
    base, tuned = bf16_pair()
    return {
        "planted": planted(),
        "power_law": power_law()[0],
        "bf16": tuned.float() - base.float(),
    }
