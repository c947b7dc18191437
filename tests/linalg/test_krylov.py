"""spectra.linalg.krylov: the block Lanczos engine against explicit float64 products."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from spectra.linalg.krylov import BlockLanczos, krylov_block, reorthogonalize

from .conftest import planted, power_law, reference_svdvals


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


def test_float32_ritz_vectors_are_the_float64_ones_of_the_projection():
    """Float32 bases take their Ritz vectors from the float64 Gram matrix of the projection:
    each of the top 32 within float32 rounding (1e-6) of the float64 SVD's of the same
    projection. The float32 SVD of the projection (the route it replaced, negative control)
    is off by 8e-6 (power law) to 1e-4 (planted: close values in the noise bulk)."""
    k = 32
    for A in (power_law(m=300, n=500)[0], planted(m=300, n=500)):
        lan = BlockLanczos(A, 16, torch.Generator().manual_seed(0), max_dim=300)
        for _ in range(8):
            lan.step()
        U, Vh = lan.vectors(k)
        P = lan.projection()
        Bu, _, Bvh = torch.linalg.svd(P, full_matrices=False)  # float64 reference
        basis_u, basis_v = lan.U[:, :lan.d].double(), lan.V[:, :lan.d + lan.b].double()
        ref_u, ref_vh = basis_u @ Bu[:, :k], Bvh[:k] @ basis_v.T
        Su, _, Svh = torch.linalg.svd(P.float(), full_matrices=False)
        fp32_u = basis_u @ Su[:, :k].double()

        def off(X, R):  # column-wise distance, up to sign
            return float((X * torch.sign((X * R).sum(0)) - R).norm(dim=0).max())

        assert off(U.double(), ref_u) < 1e-6 and off(Vh.double().T, ref_vh.T) < 1e-6
        assert off(fp32_u, ref_u) > 5e-6


def test_ritz_vectors_of_a_rank_deficient_matrix_stay_orthonormal():
    """Beyond the rank θₖ < 1e-4·θ₁, where the Gram route's accuracy bound no longer holds, the
    SVD of the projection is taken: the vectors stay orthonormal and the rank-6 signal's
    triplets are the Ritz values."""
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 300, generator=g,
                                                                             dtype=torch.float64)).float()
    lan = BlockLanczos(A, 8, g, max_dim=200)
    for _ in range(3):
        lan.step()
    theta = lan.ritz_values()
    assert float(theta[11]) < 1e-4 * float(theta[0])  # the case at hand
    U, Vh = lan.vectors(12)
    eye = torch.eye(12, dtype=torch.float64)
    assert float((U.double().T @ U.double() - eye).abs().max()) < 1e-5
    assert float((Vh.double() @ Vh.double().T - eye).abs().max()) < 1e-5
    np.testing.assert_allclose((U.T @ A @ Vh.T).diagonal()[:6].double().numpy(), theta[:6].numpy(), rtol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts glibc's fresh mmap pages")
def test_a_step_touches_only_the_blocks_it_builds():
    """The bases are stored transposed (a block is a run of rows): a run touches the pages of the
    blocks it builds, not the whole storage sized for `max_dim`. Storage above glibc's largest
    mmap threshold (32 MiB) is a fresh mapping whose pages fault in on first touch; with column
    blocks of row-major (short, cap) storage, two steps faulted in 6.4k of its 18.9k pages."""
    import resource  # POSIX only

    A = torch.randn(3072, 3200, generator=torch.Generator().manual_seed(0))
    faults = []
    for _ in range(2):  # the first run also faults in the library's own one-time buffers
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        lan = BlockLanczos(A, 16, torch.Generator().manual_seed(0), max_dim=3072, scale=1.0)
        lan.step()
        lan.step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        storage_pages = (lan.U.numel() + lan.V.numel()) * 4 // 4096
        del lan
    assert faults[-1] < storage_pages // 10  # 283 measured
