"""spectra.linalg.subspace on constructed cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from spectra.errors import ConfigError
from spectra.linalg import subspace as ss

from .conftest import planted, reference_svdvals


def _basis(dim, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(dim, r, generator=g, dtype=torch.float64))[0]


def test_identical_subspaces_have_phi_one_and_zero_angles():
    U = _basis(64, 8, 0)
    mixed = U @ _basis(8, 8, 1)  # same span, different basis
    phi = ss.similarity_matrix(U, U)
    assert torch.allclose(torch.diagonal(phi), torch.ones(8, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ss.principal_angles(U, mixed), torch.zeros(8, dtype=torch.float64), atol=1e-7)
    assert ss.grassmann_distance(U, mixed) < 1e-6


def test_orthogonal_subspaces_have_phi_zero():
    Q = _basis(64, 8, 0)
    A, B = Q[:, :4], Q[:, 4:]
    assert float(ss.similarity_matrix(A, B).abs().max()) < 1e-12
    assert ss.subspace_similarity(A, B, 4, 4) == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(ss.principal_angles(A, B), torch.full((4,), math.pi / 2, dtype=torch.float64))


@pytest.mark.parametrize("theta", [1e-6, 0.3, 1.2])
def test_rotation_by_known_angle(theta):
    Q = _basis(32, 4, 2)
    e1, e2 = Q[:, :1], Q[:, 1:2]
    A = torch.cat([e1, Q[:, 2:3]], 1)
    B = torch.cat([math.cos(theta) * e1 + math.sin(theta) * e2, Q[:, 2:3]], 1)
    angles = ss.principal_angles(A, B)
    assert float(angles.max()) == pytest.approx(theta, rel=1e-6)  # small angles via sines stay accurate
    assert float(angles.min()) == pytest.approx(0.0, abs=1e-7)
    # φ at (1, 1) compares e1 with its rotation: cos²θ.
    assert ss.subspace_similarity(A, B, 1, 1) == pytest.approx(math.cos(theta) ** 2, abs=1e-12)


def test_principal_angles_match_scipy():
    A, B = _basis(50, 6, 3), _basis(50, 4, 4)
    ref = np.sort(scipy.linalg.subspace_angles(A.numpy(), B.numpy()))
    np.testing.assert_allclose(ss.principal_angles(A, B).numpy(), ref, atol=1e-10)
    assert ss.grassmann_distance(A, B) == pytest.approx(float(np.linalg.norm(ref)), rel=1e-10)


def test_similarity_matrix_matches_definition():
    A, B = _basis(40, 5, 5), _basis(40, 6, 6)
    phi = ss.similarity_matrix(A, B)
    for i in range(1, 6):
        for j in range(1, 7):
            want = float(torch.linalg.matrix_norm(A[:, :i].T @ B[:, :j]) ** 2) / min(i, j)
            assert float(phi[i - 1, j - 1]) == pytest.approx(want, abs=1e-12)
    assert float(phi.min()) >= 0 and float(phi.max()) <= 1 + 1e-12


def test_captured_energy_in_own_top_subspace_is_eckart_young():
    M = planted()
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    ref = reference_svdvals(M)
    best = float(np.sum(ref[:5] ** 2) / np.sum(ref**2))
    assert ss.best_rank_energy(M, 5) == pytest.approx(best, rel=1e-10)
    assert ss.captured_energy(M, U=U[:, :5], V=Vh[:5].T) == pytest.approx(best, rel=1e-8)
    assert ss.captured_energy(M, U=U[:, :5]) == pytest.approx(best, rel=1e-8)  # one side suffices here
    rand = ss.captured_energy(M, U=_basis(300, 5, 7), V=_basis(400, 5, 8))
    assert rand < 0.01 * best  # negative control: a random subspace captures almost nothing


def test_amplification_of_matrix_with_itself():
    M = planted()
    for r in (1, 4, 8):
        want = 1 / math.sqrt(ss.best_rank_energy(M, r))
        assert ss.amplification_factor(M, M, r) == pytest.approx(want, rel=1e-8)


def test_amplification_large_for_update_orthogonal_to_weight():
    g = torch.Generator().manual_seed(9)
    W = torch.randn(128, 96, generator=g, dtype=torch.float64)
    delta = torch.outer(torch.randn(128, generator=g, dtype=torch.float64),
                        torch.randn(96, generator=g, dtype=torch.float64))
    # A random direction sees W at ~ its average gain ≈ ‖W‖_F/√(128·96) ≪ ‖ΔW‖_F.
    aligned = ss.amplification_factor(W, W, 1)
    assert ss.amplification_factor(delta, W, 1) > 5 * aligned


def test_planted_intruder_found_and_aligned_update_has_none():
    g = torch.Generator().manual_seed(11)
    base = torch.randn(128, 256, generator=g, dtype=torch.float64) / 16
    u = torch.randn(128, generator=g, dtype=torch.float64)
    v = torch.randn(256, generator=g, dtype=torch.float64)
    intruder = 3.0 * torch.outer(u / u.norm(), v / v.norm())  # σ = 3 > σ₁(base) ≈ 1.7
    found = ss.intruder_dimensions(base, base + intruder)
    assert found.indices == (0,) and float(found.max_cos[0]) < 0.5
    U, S, Vh = torch.linalg.svd(base, full_matrices=False)
    aligned = base + 0.05 * (U[:, :10] * S[:10]) @ Vh[:10]  # scales base's own directions
    none = ss.intruder_dimensions(base, aligned, k=10, epsilon=0.5)
    assert none.count == 0 and float(none.max_cos.min()) > 0.99


def test_rejects_mismatched_inputs():
    with pytest.raises(ConfigError, match="different spaces"):
        ss.principal_angles(_basis(10, 2, 0), _basis(12, 2, 0))
    with pytest.raises(ConfigError, match="epsilon"):
        ss.intruder_dimensions(torch.eye(4), torch.eye(4), k=2, epsilon=1.5)
    with pytest.raises(ConfigError, match="U"):
        ss.captured_energy(torch.eye(4))
    with pytest.raises(ConfigError, match="rank"):
        ss.amplification_factor(torch.eye(4), torch.eye(4), 0)


def test_handed_in_decompositions_and_non_finite_inputs_are_checked():
    import pytest

    from spectra.errors import ConfigError
    from spectra.linalg.subspace import amplification_factor, captured_energy, intruder_dimensions
    from spectra.linalg.svd import full_svd, randomized_svd

    g = torch.Generator().manual_seed(0)
    W, D = torch.randn(40, 30, generator=g), torch.randn(40, 30, generator=g)
    exact = amplification_factor(D, W, 4)
    assert amplification_factor(D, W, 4, svd=full_svd(D, compute_vectors=True)) == pytest.approx(exact, rel=1e-5)
    with pytest.raises(ConfigError, match="holds 2 singular vectors"):
        amplification_factor(D, W, 4, svd=randomized_svd(D, 2, random_state=0))
    with pytest.raises(ConfigError, match="decomposes a"):
        amplification_factor(D, W, 4, svd=full_svd(D.T, compute_vectors=True))
    with pytest.raises(ConfigError, match="singular vectors"):
        intruder_dimensions(W, W + D, k=3, base_svd=randomized_svd(W, 5, random_state=0))  # not every vector
    float32 = intruder_dimensions(W, W + D, k=3, base_svd=full_svd(W, compute_vectors=True))
    assert float32.max_cos.dtype == torch.float64
    bad = D.clone()
    bad[0, 0] = float("nan")
    for call in (lambda: captured_energy(bad, U=D[:, :2]), lambda: amplification_factor(bad, W, 2),
                 lambda: intruder_dimensions(W, bad, k=2)):
        with pytest.raises(ConfigError, match="NaN or Inf"):
            call()
