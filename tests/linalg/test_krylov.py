"""spectra.linalg.krylov: the block Lanczos engine against explicit float64 products."""

from __future__ import annotations

import numpy as np
import torch

from spectra.linalg.krylov import BlockLanczos, krylov_block, reorthogonalize

from .conftest import power_law, reference_svdvals


def _run(A, b, steps):
    lan = BlockLanczos(A, b, torch.Generator().manual_seed(0), max_dim=min(A.shape))
    history = []
    for _ in range(steps):
        lan.step()
        history.append(lan.ritz_values())
    return lan, history


def test_bases_are_orthonormal_and_projection_is_exact():
    A = power_law(m=96, n=160, dtype=torch.float64)[0]
    lan, _ = _run(A, 8, 5)
    d, b = lan.d, lan.b
    U, V = lan.U[:, :d], lan.V[:, :d + b]
    # Tolerances: float64 work, a local and a guarded full Gram–Schmidt pass → orthogonality to ~1e-14.
    assert torch.allclose(U.T @ U, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(V.T @ V, torch.eye(d + b, dtype=torch.float64), atol=1e-12)
    # The coefficients held are Uᵀ A [V, V_next] computed explicitly.
    assert torch.allclose(lan.projection(), U.T @ A @ V, atol=1e-12)
    # Block upper-bidiagonal with bandwidth b: nothing below the diagonal.
    assert torch.count_nonzero(torch.tril(lan.projection()[:, :d], -1).abs() > 1e-12) == 0


def test_ritz_values_grow_monotonically_towards_the_singular_values():
    A, s = power_law(m=96, n=160, dtype=torch.float64)
    _, history = _run(A, 8, 8)
    for prev, cur in zip(history, history[1:]):
        n = prev.numel()
        assert bool((cur[:n] >= prev[:n] - 1e-12).all())  # interlacing: never decrease
    top = history[-1][:8].numpy()
    assert bool((top <= s[:8].numpy() * (1 + 1e-12)).all())  # lower bounds of σ
    np.testing.assert_allclose(top, s[:8].numpy(), rtol=1e-8)


def test_filling_the_space_gives_the_exact_spectrum():
    # 40 × 44 with b = 8: five steps fill U; V runs out of room and the last projection is explicit.
    A = power_law(m=40, n=44, dtype=torch.float64)[0]
    lan, history = _run(A, 8, 5)
    assert lan.full
    np.testing.assert_allclose(history[-1].numpy(), reference_svdvals(A), rtol=1e-10)
    U, Vh = lan.vectors(5)
    assert torch.allclose(U.T @ A @ Vh.T, torch.diag(history[-1][:5]), atol=1e-10)


def test_default_block():
    assert krylov_block(8, 1000) == 32 and krylov_block(160, 4096) == 40 and krylov_block(4096, 8192) == 128
    assert krylov_block(200, 4096) == 48 and krylov_block(256, 4096) == 48 and krylov_block(512, 4096) == 96
    assert krylov_block(64, 20) == 20  # never wider than the matrix


def test_reorthogonalize_repeats_only_while_a_pass_cancels():
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(200, 24, generator=g, dtype=torch.float64))[0]
    fresh = torch.randn(200, 4, generator=g, dtype=torch.float64)
    fresh -= basis @ (basis.T @ fresh)  # a new direction, exactly ⊥ the basis
    inside = basis @ torch.randn(24, 4, generator=g, dtype=torch.float64)
    passes = []
    real = torch.linalg.vector_norm

    def counting(x, *a, **k):
        passes.append(1)
        return real(x, *a, **k)

    for old, expect_passes in ((1e-9, 1), (1e3, 2)):  # rounding-level vs massive components along old blocks
        Y = fresh + old * inside  # components along the whole basis, not only its newest block
        target = Y.clone()
        passes.clear()
        torch.linalg.vector_norm = counting
        try:
            coef = reorthogonalize(Y, basis, last=8)
        finally:
            torch.linalg.vector_norm = real
        assert len(passes) // 2 == expect_passes  # two norms per full pass
        assert float((basis.T @ Y).abs().max()) < 1e-12 * float(target.abs().max())  # ⊥ the basis
        assert torch.allclose(basis @ coef + Y, target, atol=1e-10)  # Y = basis·coef + remainder


def test_float32_bases_projection_and_ritz_values():
    """The working dtype of the SVD paths: orthogonality, the held projection and its Ritz values at fp32 level."""
    A = power_law(m=300, n=500, dtype=torch.float32)[0]
    lan, history = _run(A, 16, 6)
    d, b = lan.d, lan.b
    U, V = lan.U[:, :d].double(), lan.V[:, :d + b].double()
    assert float((U.T @ U - torch.eye(d, dtype=torch.float64)).abs().max()) < 1e-5
    assert float((V.T @ V - torch.eye(d + b, dtype=torch.float64)).abs().max()) < 1e-5
    explicit = U.T @ A.double() @ V
    assert float((lan.projection() - explicit).abs().max()) < 1e-5 * float(explicit.abs().max())
    exact = torch.linalg.svdvals(lan.projection())  # the float64 SVD of the same projection
    top = history[-1][:32]
    np.testing.assert_allclose(top.numpy(), exact[:32].numpy(), rtol=1e-9)  # Gram route ≈ SVD route
    assert not np.allclose(history[-2][:32].numpy(), exact[:32].numpy(), rtol=1e-9)  # an earlier space differs


def test_float32_ritz_values_after_skipped_checks():
    """The Gram matrix of the projection is kept between checks: checks after 2, 3, 6 and 7
    steps (blocks summed in between) give the float64 SVD's values of the same projection."""
    A = power_law(m=300, n=500, dtype=torch.float32)[0]
    lan = BlockLanczos(A, 16, torch.Generator().manual_seed(0), max_dim=300)
    for step in range(1, 8):
        lan.step()
        if step in (2, 3, 6, 7):
            exact = torch.linalg.svdvals(lan.projection())
            np.testing.assert_allclose(lan.ritz_values()[:32].numpy(), exact[:32].numpy(), rtol=1e-9)
