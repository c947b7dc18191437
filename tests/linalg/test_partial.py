"""spectra.linalg.partial against float64 numpy SVDs: exact low-rank SVDs, residual bounds, certified top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectra.errors import ConfigError
from spectra.linalg import partial
from spectra.linalg.svd import full_svd, randomized_svd

from .conftest import power_law


def _sin_largest_angle(Q1: np.ndarray, Q2: np.ndarray) -> float:
    """sin of the largest principal angle between the spans of two orthonormal bases (dim, j)."""
    return float(np.linalg.norm(Q2 - Q1 @ (Q1.T @ Q2), 2))


def test_lowrank_svd_is_the_svd_of_the_product():
    g = torch.Generator().manual_seed(0)
    L, R = torch.randn(300, 6, generator=g), torch.randn(200, 6, generator=g)
    F = partial.lowrank_svd(L, R, scale=2.5)
    M = 2.5 * L.double().numpy() @ R.double().numpy().T  # (300, 200), rank 6
    U, s, Vh = np.linalg.svd(M)
    assert F.method == "lowrank-qr" and F.k == 6 and not F.complete and F.U.dtype == torch.float64
    np.testing.assert_allclose(F.values.numpy(), s[:6], rtol=1e-12)
    assert F.total_energy == pytest.approx(float(np.sum(M**2)), rel=1e-12)
    # distinct values: each vector is the reference's up to sign
    np.testing.assert_allclose(np.abs(np.sum(F.U.numpy() * U[:, :6], 0)), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(F.Vh.numpy() * Vh[:6], 1)), 1.0, atol=1e-12)
    np.testing.assert_allclose((F.U * F.values) @ F.Vh, M, atol=1e-12 * s[0])
    wide = partial.lowrank_svd(L[:4], R[:5], scale=1.0)  # r = 6 > min(m, n) = 4: every value, complete
    assert wide.k == 4 and wide.complete
    np.testing.assert_allclose(wide.values.numpy(), np.linalg.svd(L[:4].double().numpy() @ R[:5].double().numpy().T,
                                                                  compute_uv=False), rtol=1e-12)
    with pytest.raises(ConfigError, match="not factors of one product"):
        partial.lowrank_svd(L, R[:, :5])


def test_ritz_bounds_hold_for_rough_triplets_and_vanish_for_exact_ones():
    M = power_law(200, 300, alpha=1.0)[0].double()
    U, s, Vh = np.linalg.svd(M.numpy())
    rough = randomized_svd(M, 12, n_iter=1, algorithm="subspace", random_state=0)  # far from converged
    b = partial.ritz_bounds(M, rough)
    assert float(b.residuals.min()) > 1e-6  # the case is not trivial
    for i in range(11):  # the last has no lower neighbour: inf
        true = _sin_largest_angle(U[:, i:i + 1], rough.U[:, i:i + 1].numpy())
        assert true <= float(b.vector_sin[i]) + 1e-12, i
    for j in range(1, 12):
        true = max(_sin_largest_angle(U[:, :j], rough.U[:, :j].numpy()),
                   _sin_largest_angle(Vh[:j].T, rough.Vh[:j].T.numpy()))
        assert true <= float(b.subspace_sin[j - 1]) + 1e-12, j
    assert torch.isinf(b.vector_sin[-1]) and torch.isinf(b.subspace_sin[-1])
    exact = partial.ritz_bounds(M, full_svd(M, compute_vectors=True))
    assert float(exact.subspace_sin[:11].max()) < 1e-10 and float(exact.vector_sin[:-1].max()) < 1e-10


@pytest.mark.parametrize("transposed", [False, True])
def test_ritz_bounds_of_a_float32_matrix_equal_those_of_its_float64_copy(transposed):
    """A float32 M is up-cast by row blocks (here 4 of them, the last partial) instead of copied
    whole: the residuals equal those from the float64 copy up to summation order, also for a
    transposed view (Conv1D-style storage)."""
    g = torch.Generator().manual_seed(5)
    M = torch.randn(3000, 1100, generator=g)  # 8 MB blocks of 953 rows
    M = M.T if transposed else M
    F = randomized_svd(M.double(), 9, n_iter=1, algorithm="subspace", random_state=0)  # rough: residuals matter
    got, ref = partial.ritz_bounds(M, F), partial.ritz_bounds(M.double(), F)
    np.testing.assert_allclose(got.residuals.numpy(), ref.residuals.numpy(), rtol=1e-10)
    assert float(got.residuals.min()) > 1e-3


def test_ritz_bounds_refuse_a_tie():
    """Negative control: σ₂ = σ₃ exactly, so neither vector nor the top-2 subspace is determined."""
    g = torch.Generator().manual_seed(1)
    Q1 = torch.linalg.qr(torch.randn(80, 6, generator=g, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(90, 6, generator=g, dtype=torch.float64))[0]
    M = (Q1 * torch.tensor([5.0, 3.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)) @ Q2.T
    b = partial.ritz_bounds(M, full_svd(M, compute_vectors=True))
    assert float(b.subspace_sin[0]) < 1e-10 and float(b.subspace_sin[2]) < 1e-10  # gaps after σ₁ and σ₃
    assert float(b.subspace_sin[1]) > 1.0 and float(b.vector_sin[1]) > 1.0 and float(b.vector_sin[2]) > 1.0


def test_krylov_triplets_are_ritz_triplets_of_a_fixed_space():
    M = power_law(600, 900, alpha=1.0, seed=4)[0]  # float32
    s = np.linalg.svd(M.double().numpy(), compute_uv=False)
    F = partial.krylov_triplets(M, 12, steps=8)
    assert F.method == "krylov" and F.n_iter == 9 and F.U.dtype == torch.float32  # 8 steps beyond the first block
    assert np.all(F.values.double().numpy() <= s[:12] * (1 + 1e-6))  # Ritz values: lower bounds (float32 rounding)
    np.testing.assert_allclose(F.values.numpy()[:4], s[:4], rtol=1e-5)
    np.testing.assert_allclose((F.U.T @ F.U).numpy(), np.eye(12), atol=1e-5)
    small = partial.krylov_triplets(M[:40, :50], 12, steps=8)  # no room for a block beside 12 columns: full
    assert small.method == "full-gesdd" and small.k == 12
    np.testing.assert_allclose(small.values.numpy(), np.linalg.svd(M[:40, :50].double().numpy(),
                                                                   compute_uv=False)[:12], rtol=1e-5)


@pytest.mark.parametrize("shape", [(640, 960), (960, 640)])
def test_top_svd_certified_path_matches_the_full_decomposition(shape):
    M = power_law(*shape, alpha=0.7, seed=2)[0]  # float32, slow decay: gaps of ~2 % at j = 32
    U, s, Vh = np.linalg.svd(M.double().numpy())
    F = partial.top_svd(M, 32, exact_below=0)
    assert F.method == "krylov" and F.k == 32 and F.U.dtype == torch.float64
    np.testing.assert_allclose(F.values.numpy(), s[:32], rtol=1e-10)
    assert F.tolerance < 1e-6
    for j in range(1, 33):  # every top-j subspace within the certified angle, both sides
        assert _sin_largest_angle(U[:, :j], F.U[:, :j].numpy()) <= partial.ANGLE_TOL, j
        assert _sin_largest_angle(Vh[:j].T, F.Vh[:j].T.numpy()) <= partial.ANGLE_TOL, j
    small = partial.top_svd(M, 32, exact_below=640)  # min side ≤ exact_below: the full decomposition
    assert small.method == "full-gesdd" and small.complete


@pytest.mark.parametrize("transposed", [False, True])
def test_top_svd_of_a_float32_matrix_is_that_of_its_float64_copy(transposed):
    """The float64 Krylov space multiplies a float32 M by row blocks up-cast (no float64 copy of M, 2× its
    size): the same steps, values and vectors as from the copy, to summation order; a transposed view too."""
    M = power_law(960, 640, alpha=0.7, seed=2)[0]
    M = M.T.contiguous().T if transposed else M  # tall, stored as its (640, 960) transpose
    F, ref = partial.top_svd(M, 32, exact_below=0), partial.top_svd(M.double(), 32, exact_below=0)
    assert F.method == ref.method == "krylov" and F.n_iter == ref.n_iter and F.values.dtype == torch.float64
    np.testing.assert_allclose(F.values.numpy(), ref.values.numpy(), rtol=1e-13)
    np.testing.assert_allclose((F.U.T @ ref.U).diagonal().abs().numpy(), 1.0, atol=1e-10)  # the same vectors
    assert F.total_energy == pytest.approx(ref.total_energy, rel=1e-13)


def test_top_svd_falls_back_where_a_subspace_is_not_determined():
    """Negative control: σ₁₀ = σ₁₁, so the top-10 subspace is any of a family and cannot be certified."""
    g = torch.Generator().manual_seed(3)
    s = torch.cat([0.9 ** torch.arange(20, dtype=torch.float64), torch.linspace(0.1, 0.01, 620, dtype=torch.float64)])
    s[10] = s[9]
    Q1 = torch.linalg.qr(torch.randn(640, 640, generator=g, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(800, 640, generator=g, dtype=torch.float64))[0]
    M = (Q1 * s) @ Q2.T
    F = partial.top_svd(M, 12, exact_below=0)
    assert F.method == "full-gesdd" and F.complete
    np.testing.assert_allclose(F.values.numpy(), s.numpy(), rtol=1e-12)
    below = partial.top_svd(M, 9, exact_below=0)  # the tie lies past the top 9 + 1: certified
    assert below.method == "krylov"


def test_top_svd_rejects_bad_requests():
    M = torch.zeros(10, 12)
    with pytest.raises(ConfigError, match="`k`"):
        partial.top_svd(M, 11)
    with pytest.raises(ConfigError, match="angle_tol"):
        partial.top_svd(M, 2, angle_tol=0.0)
