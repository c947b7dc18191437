"""spectra.linalg.subspace on constructed cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from spectra.errors import ConfigError
from spectra.linalg import subspace as ss
from spectra.linalg.partial import lowrank_svd

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


def test_grassmann_distance_of_unequal_dimensions_is_ye_lim_delta():
    """A 2-dim span inside a 5-dim one is at distance 0; one direction rotated out by θ adds θ."""
    Q = _basis(40, 6, 9)
    assert ss.grassmann_distance(Q[:, :2], Q[:, :5]) == pytest.approx(0.0, abs=1e-7)
    theta = 0.4
    A = torch.cat([Q[:, :1], math.cos(theta) * Q[:, 1:2] + math.sin(theta) * Q[:, 5:6]], 1)
    assert ss.grassmann_distance(A, Q[:, :5]) == pytest.approx(theta, rel=1e-9)


def test_similarity_matrix_matches_definition():
    A, B = _basis(40, 5, 5), _basis(40, 6, 6)
    phi = ss.similarity_matrix(A, B)
    for i in range(1, 6):
        for j in range(1, 7):
            want = float(torch.linalg.matrix_norm(A[:, :i].T @ B[:, :j]) ** 2) / min(i, j)
            assert float(phi[i - 1, j - 1]) == pytest.approx(want, abs=1e-12)
    assert float(phi.min()) >= 0 and float(phi.max()) <= 1 + 1e-12


def test_phi_refuses_columns_that_are_not_orthonormal():
    """φ of a LoRA factor itself (norms ≠ 1) exceeds 1: a ConfigError names it; its SVD's U is accepted."""
    g = torch.Generator().manual_seed(7)
    B = torch.randn(64, 8, generator=g) * 3.0  # a trained B: spans a subspace, not orthonormal
    U = _basis(64, 8, 8)
    assert float(ss._similarity_matrix(B, B).max()) > 1  # what φ would have reported
    with pytest.raises(ConfigError, match="`U_A`'s columns are not orthonormal"):
        ss.similarity_matrix(B, U)
    with pytest.raises(ConfigError, match="`U_B`'s columns are not orthonormal"):
        ss.subspace_similarity(U, B, 2, 2)
    Ub = torch.linalg.svd(B.double(), full_matrices=False)[0]
    assert float(ss.similarity_matrix(Ub, Ub).diagonal().min()) == pytest.approx(1.0, abs=1e-12)
    # Singular vectors stored in bfloat16 or float32 are within rounding: accepted.
    for dtype in (torch.bfloat16, torch.float32):
        assert float(ss.similarity_matrix(Ub.to(dtype), U.to(dtype)).max()) <= 1 + 0.05


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



def test_amplification_refuses_a_rank_past_the_updates_own():
    """A rank-1 ΔW at rank 3 used the vectors of two zero singular values, LAPACK's arbitrary choice: 12.68, and
    18.76 after a 1e-14 change of ΔW (rank 1: 24.34 both times). Refused, as the `svd=` route refuses it."""
    rng = np.random.default_rng(0)
    D = np.outer(rng.standard_normal(60), rng.standard_normal(40))
    W = torch.tensor(rng.standard_normal((60, 40)))
    nudged = torch.tensor(D + 1e-14 * rng.standard_normal((60, 40)))
    u, s, vt = np.linalg.svd(D)
    want = np.linalg.norm(D) / abs(u[:, 0] @ W.numpy() @ vt[0])  # the closed form at rank 1
    assert ss.amplification_factor(torch.tensor(D), W, 1) == pytest.approx(want, rel=1e-10)
    assert ss.amplification_factor(nudged, W, 1) == pytest.approx(want, rel=1e-10)
    with pytest.raises(ConfigError, match="numerical rank 1"):
        ss.amplification_factor(torch.tensor(D), W, 3)
    assert ss.amplification_factor(torch.zeros(60, 40, dtype=torch.float64), W, 3) == 0.0  # zero ΔW: 0 at any rank
    # with its decomposition given (verify's route) too: it returned 11.4, and 9.8 after the 1e-14 change
    from spectra.linalg.svd import full_svd

    given = full_svd(torch.tensor(D), compute_vectors=True, dtype=torch.float64)
    assert ss.amplification_factor(None, W, 1, svd=given) == pytest.approx(want, rel=1e-10)
    for delta in (None, torch.tensor(D)):
        with pytest.raises(ConfigError, match="numerical rank 1"):
            ss.amplification_factor(delta, W, 3, svd=given)
    zero = full_svd(torch.zeros(60, 40, dtype=torch.float64), compute_vectors=True, dtype=torch.float64)
    assert ss.amplification_factor(None, W, 3, svd=zero) == 0.0
    # ‖ΔW‖_F² underflows at entries near 1e-170: the factor (linear in ΔW) was 0, now 1e-170 of ΔW's
    assert ss.amplification_factor(torch.tensor(D * 1e-170), W, 1) == pytest.approx(want * 1e-170, rel=1e-10)


@pytest.mark.parametrize("scale", [1e155, 1e-160, 1e-170, 1e-300, 1e300])
def test_energy_fractions_of_a_float64_update_at_any_scale(scale):
    """Float64 entries of 1e155 overflowed ‖ΔW‖_F² to a NaN fraction; at 1e-170 the squares fell to subnormals
    (−0.67 on the Eckart–Young energy at rank 5). The fractions do not depend on the scale."""
    rng = np.random.default_rng(1)
    D, U = rng.standard_normal((60, 40)), rng.standard_normal((60, 5))
    Q = np.linalg.qr(U)[0]
    s = np.linalg.svd(D, compute_uv=False)
    col = np.linalg.norm(Q.T @ D) ** 2 / np.linalg.norm(D) ** 2  # the reference at scale 1
    top5 = (s[:5] ** 2).sum() / (s**2).sum()
    scaled = torch.tensor(D * scale)
    assert ss.captured_energy(scaled, U=torch.tensor(U)) == pytest.approx(col, rel=1e-12)
    assert ss.captured_energies(scaled, torch.tensor(U), torch.tensor(D[:5].T))[0] == pytest.approx(col, rel=1e-12)
    assert ss.best_rank_energy(scaled, 5) == pytest.approx(top5, rel=1e-12)

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


def _rank_deficient(m: int, n: int, rank: int, seed: int):
    """A float64 (m, n) weight of exactly `rank`, with orthonormal bases of its left and right null spaces."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.linspace(2.0, 1.0, rank, dtype=torch.float64)
    return (U[:, :rank] * s) @ V[:, :rank].T, U[:, rank:], V[:, rank:]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: its null σ are rounding, ~1e-9·σ₁
@pytest.mark.parametrize("exact_below", [640, 0])  # full decompositions; the certified path (which must defer)
def test_a_tuned_direction_in_a_rank_deficient_bases_null_space_is_an_intruder(exact_below, dtype):
    base, null_left, null_right = _rank_deficient(200, 200, 198, seed=5)  # null planes
    u = null_left.sum(1) / math.sqrt(2)  # spread over the null plane: no basis of it holds u
    v = null_right.sum(1) / math.sqrt(2)
    tuned = base + 4.0 * torch.outer(u, v)  # σ = 4 above the base's 2
    base, tuned = base.to(dtype), tuned.to(dtype)
    found = ss.intruder_dimensions(base, tuned, k=4, exact_below=exact_below)
    # reference: numpy's float64 SVD, cosines against the 198 vectors of nonzero σ only
    Ub, sb, _ = np.linalg.svd(base.double().numpy(), full_matrices=False)
    Ut = np.linalg.svd(tuned.double().numpy(), full_matrices=False)[0][:, :4]
    reference = np.abs(Ub[:, :198].T @ Ut).max(0)
    assert found.indices == (0,)
    assert found.max_cos[0] < 1e-5 and reference[0] < 1e-5
    assert np.allclose(found.max_cos[1:].numpy(), reference[1:], atol=1e-9 if dtype == torch.float64 else 1e-5)
    # negative control: over every returned vector, LAPACK's null basis decides, and any basis of a
    # plane holds some vector within 45° of u, so the published count would miss it
    assert np.abs(Ub.T @ Ut[:, 0]).max() >= 1 / math.sqrt(2) - 1e-9
    assert sb[198] < (1e-12 if dtype == torch.float64 else 1e-7)  # zero, or float32's rounding of zero


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_zero_base_makes_every_tuned_direction_an_intruder_and_a_rank_short_tuned_none_beyond_its_rank(dtype):
    tuned, _, _ = _rank_deficient(24, 16, 3, seed=6)
    tuned = tuned.to(dtype)  # float32: the zero σ are its rounding, 2e-7·σ₁, not zeros
    found = ss.intruder_dimensions(torch.zeros(24, 16, dtype=dtype), tuned, k=5)
    assert found.indices == (0, 1, 2)  # the two vectors of zero σ are no directions of W_tuned
    assert found.max_cos[:3].tolist() == [0.0, 0.0, 0.0] and bool(found.max_cos[3:].isnan().all())
    same = ss.intruder_dimensions(tuned, tuned, k=5)  # negative control: a weight against itself
    assert same.count == 0 and float(same.max_cos[:3].min()) > 1 - 1e-9


def test_numerical_rank_stands_on_the_rounding_noise_not_on_sigma_1():
    """A float32 rank-4 ΔW (256×1024) whose weakest direction is 1e-4·σ₁: matrix_rank's max(m, n)·eps·σ₁
    (1.2e-4·σ₁) dropped it; the rounding noise of its float32 entries sits near 1e-8·σ₁."""
    from spectra.linalg.svd import full_svd

    g = torch.Generator().manual_seed(8)
    U, _ = torch.linalg.qr(torch.randn(256, 4, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(1024, 4, generator=g, dtype=torch.float64))
    D = ((U * torch.tensor([1.0, 0.5, 0.3, 1e-4], dtype=torch.float64)) @ V.T).float()
    F = full_svd(D, dtype=torch.float64)
    s = F.values.double()
    assert ss.numerical_rank(F, D.shape, dtype=torch.float32) == 4
    assert float(s[4] / s[0]) < 1e-7 < float(s[3] / s[0])  # a gap of four decades around the cut
    assert int((s > 1024 * torch.finfo(torch.float32).eps * s[0]).sum()) == 3  # negative control: matrix_rank's rule
    assert ss.numerical_rank(F, D.shape) > 4  # at float64's precision the float32 rounding is rank too


def test_numerical_rank_of_a_difference_of_stored_weights_stands_on_their_rounding():
    """A rank-4 LoRA merged into a float32 checkpoint, subtracted: ΔW carries the rounding of W + ΔW (~1e-7·|W|),
    not of ΔW, so at rms(ΔW)/rms(W) = 5e-4 ΔW's own noise edge counted 721 directions; W's gives 4, and the
    amplification at 8 is refused, as matrix_rank's rule refused it."""
    from spectra.linalg.svd import full_svd

    g = torch.Generator().manual_seed(0)
    W = torch.randn(512, 512, generator=g) * 0.02
    D = (torch.randn(512, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 512, generator=g, dtype=torch.float64))
    D = D / D.pow(2).mean().sqrt() * 1e-5
    delta = (W.double() + D).float() - W  # the merged checkpoint's ΔW
    F = full_svd(delta, compute_vectors=True, dtype=torch.float64)
    weights = float(W.double().pow(2).sum())
    assert ss.numerical_rank(F, delta.shape, dtype=torch.float32, rounded_energy=weights) == 4
    assert ss.numerical_rank(F, delta.shape, dtype=torch.float32) > 100  # ΔW's own edge: the rounding counted
    with pytest.raises(ConfigError, match="numerical rank 4"):
        ss.amplification_factor(delta, W, 8, rounded_energy=weights)
    assert ss.amplification_factor(delta, W, 4, rounded_energy=weights) > 0
    # scale-free: a float64 matrix whose energy underflows keeps its cut (it counted every value, null ones too)
    tiny = torch.tensor(_rank_deficient(24, 16, 3, seed=6)[0].numpy() * 1e-170)
    assert ss.numerical_rank(full_svd(tiny, dtype=torch.float64), tiny.shape) == 3


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
    with pytest.raises(ConfigError, match="holds 3 singular vectors; 4 are needed"):
        intruder_dimensions(W, W + D, k=3, base_svd=randomized_svd(W, 3, random_state=0))  # a top k + 1 at least
    float32 = intruder_dimensions(W, W + D, k=3, base_svd=full_svd(W, compute_vectors=True))
    assert float32.max_cos.dtype == torch.float64 and float32.method == "full"
    top = intruder_dimensions(W, W + D, k=3, base_svd=randomized_svd(W.double(), 5, random_state=0))
    assert top.indices == float32.indices
    bad = D.clone()
    bad[0, 0] = float("nan")
    for call in (lambda: captured_energy(bad, U=D[:, :2]), lambda: amplification_factor(bad, W, 2),
                 lambda: intruder_dimensions(W, bad, k=2)):
        with pytest.raises(ConfigError, match="NaN or Inf"):
            call()


# ---------------------------------------------------------------------------- certified intruders


def _pretrained(m, n, seed):
    """A stand-in pretrained weight (float64): a Marchenko–Pastur bulk (edge ≈ 1 + √(m/n)), four strong directions."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, 4, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, 4, generator=g, dtype=torch.float64))[0]
    bulk = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(max(m, n))
    return bulk + (U * torch.tensor([6.0, 5.0, 4.0, 3.0], dtype=torch.float64)) @ V.T


def _reference_max_cos(W, Wt, k, side):
    """max_i |cos(y_j, x_i)| from numpy's full SVDs: the definition."""
    Ub, _, Vbh = np.linalg.svd(W.double().numpy(), full_matrices=False)
    Ut, _, Vth = np.linalg.svd(Wt.double().numpy(), full_matrices=False)
    X, Y = (Ub, Ut[:, :k]) if side == "left" else (Vbh.T, Vth[:k].T)
    return np.abs(X.T @ Y).max(0)


def _spikes(m, n, sigmas, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(sigmas), generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, len(sigmas), generator=g, dtype=torch.float64))[0]
    return (u * torch.tensor(sigmas, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(640, 960), (960, 640)])  # the long side goes through the QR projection
def test_certified_intruders_equal_the_full_decision(shape, side):
    W = _pretrained(*shape, seed=0)
    tuned = W + _spikes(*shape, [8.0, 7.0], seed=1)  # two new directions above every base σ
    ref = _reference_max_cos(W, tuned, 6, side)
    assert list(np.flatnonzero(ref < 0.5)) == [0, 1]  # the planted ones, and only they
    found = ss.intruder_dimensions(W, tuned, k=6, side=side, exact_below=0)
    assert found.method == "certified" and found.indices == (0, 1)
    # the bounds sit on the reference's side of ε: above it for followers, below for intruders
    cos = found.max_cos.numpy()
    assert np.all(cos[:2] >= ref[:2] - 1e-12) and np.all(cos[:2] < 0.5)
    assert np.all(cos[2:] <= ref[2:] + 1e-12) and np.all(cos[2:] >= 0.5)
    exact = ss.intruder_dimensions(W, tuned, k=6, side=side, exact_below=640)  # full decompositions
    assert exact.method == "full" and exact.indices == (0, 1)
    np.testing.assert_allclose(exact.max_cos.numpy(), ref, atol=1e-10)
    deep = ss.intruder_dimensions(W, tuned, k=10, side=side, exact_below=0)  # reaching into the bulk: any path,
    assert deep.indices == tuple(np.flatnonzero(_reference_max_cos(W, tuned, 10, side) < 0.5))  # the same answer


def test_certified_aligned_update_has_no_intruders():
    W = _pretrained(640, 960, seed=2)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    aligned = W + 0.05 * (U[:, :6] * S[:6]) @ Vh[:6]  # scales the base's own top directions
    found = ss.intruder_dimensions(W, aligned, k=6, exact_below=0)
    assert found.method == "certified" and found.count == 0
    assert np.all(found.max_cos.numpy() <= _reference_max_cos(W, aligned, 6, "left") + 1e-12)  # lower bounds (of 1)


@pytest.mark.parametrize("cos", [0.6, 0.4])
def test_direction_beyond_the_base_top_falls_back_or_is_certified_correctly(cos):
    """A tuned direction at |cos| = 0.6 (0.4) with base vector 100, far past the computed top 2k + 2.

    At 0.6 nothing short of every base vector can show it is no intruder: the call must fall
    back to the full decompositions (negative control of the certificate). Both give the
    reference's answer.
    """
    W = _pretrained(640, 960, seed=3)
    Ub = torch.linalg.svd(W, full_matrices=False)[0]
    g = torch.Generator().manual_seed(4)
    w = torch.randn(640, generator=g, dtype=torch.float64)
    w -= Ub[:, 100] * (Ub[:, 100] @ w)
    y = cos * Ub[:, 100] + math.sqrt(1 - cos**2) * w / w.norm()
    v = torch.randn(960, generator=g, dtype=torch.float64)
    tuned = W + 40.0 * torch.outer(y, v / v.norm())  # its top left vector is ≈ y
    ref = _reference_max_cos(W, tuned, 4, "left")
    assert abs(ref[0] - cos) < 0.02
    found = ss.intruder_dimensions(W, tuned, k=4, exact_below=0)
    assert found.indices == tuple(np.flatnonzero(ref < 0.5))
    if cos > 0.5:
        assert found.method == "full"
        np.testing.assert_allclose(found.max_cos.numpy(), ref, atol=1e-10)


@pytest.mark.parametrize("d", [40, 300])  # 64 Lanczos steps: an invariant space at 40, the Gauss rule's bound at 300
def test_largest_atom_bounds_every_base_direction(d):
    g = torch.Generator().manual_seed(5)
    S = torch.randn(d, d + 40, generator=g, dtype=torch.float64)
    X = torch.linalg.svd(S, full_matrices=False)[0]  # (d, d) every left singular vector
    spread = torch.nn.functional.normalize(torch.randn(d, 3, generator=g, dtype=torch.float64), dim=0)
    Z = torch.cat([spread, 0.5 * spread[:, :1]], 1)  # the last with a quarter of the mass
    true = ((X.T @ Z) ** 2).amax(0)  # (4,)
    bound = ss._largest_atom(S, Z, torch.full((4,), 0.2, dtype=torch.float64))
    assert torch.all(bound >= true)
    if d == 300:  # random directions in 300 dimensions are told apart from ε² = 0.25
        assert torch.all(bound < 0.2)
    x = X[:, d // 2]  # a direction from the middle of the spectrum
    rest = torch.nn.functional.normalize(spread[:, 0] - x * float(x @ spread[:, 0]), dim=0)
    heavy = (0.8 * x + 0.6 * rest)[:, None]  # cos 0.8 with x
    weight = ss._largest_atom(S, heavy, torch.tensor([0.25], dtype=torch.float64))
    assert float(weight) >= 0.64 - 1e-12  # negative control: an atom of 0.64 is never bounded below itself


# ---------------------------------------------------------------------------- rank-deficient factors


def _known_update(out=60, inn=40, seed=20):
    """ΔW_full = U diag(σ) Vᵀ (float64, full rank) with σ known, and its singular vectors."""
    g = torch.Generator().manual_seed(seed)
    U, V = _basis(out, inn, seed), _basis(inn, inn, seed + 1)
    sigma = torch.linspace(3.0, 0.5, inn, dtype=torch.float64)
    return (U * sigma) @ V.T, U, V, sigma, g


def _numpy_energy(D, Q):
    """‖Qᵀ D‖²/‖D‖² for an orthonormal Q (numpy float64): the share of D in span(Q)."""
    return float(np.sum((Q.T @ D) ** 2) / np.sum(D**2))


@pytest.mark.parametrize("case", ["zero", "duplicate"])
def test_captured_energy_of_a_rank_deficient_factor_is_that_of_its_true_span(case):
    """B (out, 4) spanning only ΔW's top-2 left singular vectors: the captured share is (σ₁² + σ₂²)/Σσ².

    A plain QR of B (what the measures took) adds two arbitrary orthonormal columns and
    overstated it (negative control).
    """
    D, U, V, sigma, g = _known_update()
    b1, b2 = 2.0 * U[:, 0], U[:, 0] - 0.5 * U[:, 1]
    extra = (torch.zeros_like(b1), torch.zeros_like(b1)) if case == "zero" else (-3.0 * b1, b1 + b2)
    B = torch.stack([b1, b2, *extra], 1)  # (out, 4), rank 2
    known = float((sigma[:2] ** 2).sum() / (sigma**2).sum())
    assert ss.captured_energy(D, U=B) == pytest.approx(known, rel=1e-12)
    Q2 = np.linalg.qr(B[:, :2].numpy())[0]  # independent: numpy on the two independent columns
    assert ss.captured_energy(D, U=B) == pytest.approx(_numpy_energy(D.numpy(), Q2), rel=1e-12)
    assert _numpy_energy(D.numpy(), np.linalg.qr(B.numpy())[0]) > known + 0.01  # the plain QR's answer
    A = torch.stack([V[:, 0], V[:, 0] + V[:, 1], 0 * V[:, 0], 2 * V[:, 1]])  # (4, in), rank 2, row space V[:, :2]
    both = ss.captured_energy(D, U=B, V=A.T)  # P_U D P_V = σ₁u₁v₁ᵀ + σ₂u₂v₂ᵀ
    assert both == pytest.approx(known, rel=1e-12)
    assert ss.orthonormal_basis(B).shape == (60, 2) and ss.orthonormal_basis(A.T).shape == (40, 2)


def test_full_rank_bases_are_unchanged():
    """Negative control: full-rank bases and factors keep every direction, as QR and lowrank_svd did."""
    D = _known_update()[0]
    g = torch.Generator().manual_seed(30)
    B = torch.randn(60, 5, generator=g, dtype=torch.float64)
    Q = np.linalg.qr(B.numpy())[0]
    assert ss.orthonormal_basis(B).shape == (60, 5)
    assert ss.captured_energy(D, U=B) == pytest.approx(_numpy_energy(D.numpy(), Q), rel=1e-12)
    C = torch.randn(60, 3, generator=g, dtype=torch.float64)
    ref = np.sort(scipy.linalg.subspace_angles(B.numpy(), C.numpy()))
    np.testing.assert_allclose(ss.principal_angles(B, C).numpy(), ref, atol=1e-10)
    R = torch.randn(40, 5, generator=g, dtype=torch.float64)
    F, L = ss.factor_svd(B, R, scale=0.5), lowrank_svd(B, R, scale=0.5)
    assert F.values.numel() == 5 and torch.equal(F.values, L.values) and torch.equal(F.U, L.U)


def test_principal_angles_count_only_the_directions_a_basis_has():
    """span[u₁, u₂, 0, u₁ + u₂] vs span[u₁, u₃, u₄, u₅]: two angles, 0 and π/2 (scipy on the independent columns)."""
    Q = _basis(32, 5, 21)
    A = torch.stack([Q[:, 0], Q[:, 1], torch.zeros(32, dtype=torch.float64), Q[:, 0] + Q[:, 1]], 1)
    B = Q[:, [0, 2, 3, 4]]
    angles = ss.principal_angles(A, B)
    ref = np.sort(scipy.linalg.subspace_angles(A[:, :2].numpy(), B.numpy()))
    assert angles.shape == (2,)  # QR of A gave four angles, two of them to arbitrary directions
    np.testing.assert_allclose(angles.numpy(), ref, atol=1e-10)
    np.testing.assert_allclose(angles.numpy(), [0.0, math.pi / 2], atol=1e-10)
    assert ss.principal_angles(torch.zeros(32, 3), B).shape == (0,)  # a zero factor spans nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_real_directions_of_a_low_precision_factor_are_kept(dtype):
    """The stored factor is the adapter exactly: a bf16 B whose σ decays to 3 % of σ₁ has all 64 directions. A
    tolerance of bf16's rounding (√r·ε/2 = 6 % at r = 64) reported 47 (a review); an exact dependence (a repeated
    column) is still found in any dtype."""
    g = torch.Generator().manual_seed(22)
    Q = torch.linalg.qr(torch.randn(1024, 64, generator=g, dtype=torch.float64))[0]
    B = (Q * torch.logspace(0, math.log10(0.03), 64, dtype=torch.float64)).to(dtype)  # (1024, 64)
    sigma = np.linalg.svd(B.double().numpy(), compute_uv=False)
    assert sigma[-1] / sigma[0] > 0.02 and np.linalg.matrix_rank(B.double().numpy()) == 64
    assert ss.orthonormal_basis(B).shape == (1024, 64)
    R = torch.randn(512, 64, generator=g).to(dtype)  # Aᵀ of a LoRA: s·B A keeps B's 64 directions
    assert ss.factor_svd(B, R, scale=0.5).values.numel() == 64
    assert math.sqrt(64) * torch.finfo(torch.bfloat16).eps / 2 > sigma[-1] / sigma[0]  # negative control: the old cut
    repeated = torch.cat([B[:, :3], B[:, :1]], 1)  # (1024, 4), rank 3 exactly
    assert ss.orthonormal_basis(repeated).shape == (1024, 3)


def _product_case(case, out=60, inn=40):
    """B (out, 4), A (4, in) and the true spaces of B A, built with a known rank.

    zero: B's columns 3, 4 are zero (never trained); rank(B A) = 2, yet A has rank 4, so
    span(Aᵀ) is too large. duplicate: B's 3rd column repeats its 1st, A's 4th row its 2nd.
    product: rank(B) = rank(A) = 3 but B A has rank 2 (A's column space meets B's null space).
    """
    g = torch.Generator().manual_seed(23)
    b = torch.randn(out, 3, generator=g, dtype=torch.float64)
    a = torch.randn(4, inn, generator=g, dtype=torch.float64)
    if case == "zero":
        B, A = torch.cat([b[:, :2], torch.zeros(out, 2, dtype=torch.float64)], 1), a
        col, row = b[:, :2], a[:2].T
    elif case == "duplicate":
        B, A = torch.cat([b, b[:, :1]], 1), torch.cat([a[:3], a[1:2]], 0)
        col, row = b, a[:3].T  # B A = b₁(a₁ + a₂)ᵀ + b₂a₂ᵀ + b₃a₃ᵀ: rank 3
    else:
        B = torch.cat([b, (b[:, 0] + b[:, 1])[:, None]], 1)  # null(B) = span(e₁ + e₂ − e₄)
        C = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
        A = C @ a[:3]  # (4, in), rank 3: col(A) = span(C) ∋ e₁ + e₂ − e₄, so B A = b₁ a₂ᵀ + b₃ a₃ᵀ
        col, row = b[:, [0, 2]], a[1:3].T
    return B, A, col, row


@pytest.mark.parametrize("case", ["zero", "duplicate", "product"])
def test_factor_svd_spans_the_products_own_spaces(case):
    D = _known_update()[0]
    B, A, col, row = _product_case(case)
    s = 2.0
    M = s * (B @ A).numpy()
    k = int(np.linalg.matrix_rank(M))
    Um, sm, Vmh = np.linalg.svd(M)
    F = ss.factor_svd(B, A.T, scale=s)
    assert F.values.numel() == k == col.shape[1]
    np.testing.assert_allclose(F.values.numpy(), sm[:k], rtol=1e-12)
    for mine, ref in ((F.U, Um[:, :k]), (F.Vh.T, Vmh[:k].T)):
        np.testing.assert_allclose(mine.numpy() @ mine.numpy().T, ref @ ref.T, atol=1e-12)  # same projector
    # captured energy in the product's spaces: numpy on the spaces known by construction
    Qc, Qr = np.linalg.qr(col.numpy())[0], np.linalg.qr(row.numpy())[0]
    Dn = D.numpy()
    assert ss.captured_energy(D, U=F.U) == pytest.approx(_numpy_energy(Dn, Qc), rel=1e-10)
    assert ss.captured_energy(D, V=F.Vh.T) == pytest.approx(_numpy_energy(Dn.T, Qr), rel=1e-10)
    # φ(k, k) of the update against its own singular vectors is 1; the angles are zero
    assert ss.subspace_similarity(F.U, torch.from_numpy(Um), k, k) == pytest.approx(1.0, abs=1e-12)
    assert float(ss.principal_angles(F.U, torch.from_numpy(Um[:, :k])).max()) < 1e-7
    # negative controls: lowrank_svd's vectors past k are arbitrary and take more energy on the row side,
    # and so does A's own span where B A has lower rank than A (zero columns of B)
    full = lowrank_svd(B, A.T, scale=s)
    assert ss.captured_energy(D, V=full.Vh.T) > _numpy_energy(Dn.T, Qr) + 0.01
    if case in ("zero", "product"):
        assert ss.captured_energy(D, V=A.T) > _numpy_energy(Dn.T, Qr) + 0.01


def test_zero_factors_and_bad_bases():
    F = ss.factor_svd(torch.zeros(8, 2), torch.ones(6, 2))
    assert F.values.numel() == 0 and F.U.shape == (8, 0) and F.total_energy == 0.0
    assert ss.captured_energy(torch.ones(8, 6), U=torch.zeros(8, 2)) == 0.0
    with pytest.raises(ConfigError, match="`rtol` must be a float in"):
        ss.orthonormal_basis(torch.eye(4), rtol=1.5)
    with pytest.raises(ConfigError, match="`U` holds NaN"):
        ss.captured_energy(torch.ones(4, 4), U=torch.full((4, 2), float("nan")))


# ---------------------------------------------------------------------------- float64 by row blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_captured_energies_are_the_three_projections_from_one_pass(dtype):
    """ΔW is read by row blocks up-cast to float64 (no float64 copy): the same numbers as numpy's on the
    up-cast ΔW, for the column space, the row space and both; a side with no basis is the zero space."""
    g = torch.Generator().manual_seed(3)
    D = torch.randn(90, 70, generator=g).to(dtype)
    U, V = torch.randn(90, 5, generator=g), torch.randn(70, 4, generator=g, dtype=torch.float64)
    Dn, Qu, Qv = D.double().numpy(), np.linalg.qr(U.double().numpy())[0], np.linalg.qr(V.numpy())[0]
    total = np.sum(Dn**2)
    want = (np.sum((Qu.T @ Dn) ** 2) / total, np.sum((Dn @ Qv) ** 2) / total, np.sum((Qu.T @ Dn @ Qv) ** 2) / total)
    got = ss.captured_energies(D, U, V)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got == (ss.captured_energy(D, U=U), ss.captured_energy(D, V=V), ss.captured_energy(D, U=U, V=V))
    assert ss.captured_energies(D, U[:, :0], V)[0] == 0.0 and got[2] < min(got[:2])  # negative controls


def test_amplification_factor_from_a_decomposition_alone():
    """A LoRA update need not be formed: its factors' SVD carries ‖ΔW‖_F² and the vectors."""
    g = torch.Generator().manual_seed(4)
    W, L, R = torch.randn(60, 80, generator=g), torch.randn(60, 3, generator=g), torch.randn(80, 3, generator=g)
    F = lowrank_svd(L, R, scale=0.5)
    Dn, Wn = 0.5 * L.double().numpy() @ R.double().numpy().T, W.double().numpy()
    Ua, _, Vah = np.linalg.svd(Dn)
    want = np.linalg.norm(Dn) / np.linalg.norm(Ua[:, :2].T @ Wn @ Vah[:2].T)
    assert ss.amplification_factor(None, W, 2, svd=F) == pytest.approx(want, rel=1e-10)
    assert ss.amplification_factor(torch.from_numpy(Dn), W, 2, svd=F) == ss.amplification_factor(None, W, 2, svd=F)
    with pytest.raises(ConfigError, match="needs `delta`, or its decomposition"):
        ss.amplification_factor(None, W, 2)
    with pytest.raises(ConfigError, match="decomposes a"):
        ss.amplification_factor(None, W.T, 2, svd=F)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(640, 960), (960, 640)])
def test_certified_intruders_of_float32_weights_read_them_as_stored(shape, side):
    """A float32 W_base is multiplied in float64 by row blocks (wide) or QR-factored in place from one
    float64 copy (tall): the decisions are those of numpy on the same float32 weights."""
    W = _pretrained(*shape, seed=0).float()
    tuned = (W.double() + _spikes(*shape, [8.0, 7.0], seed=1)).float()
    ref = _reference_max_cos(W, tuned, 6, side)
    found = ss.intruder_dimensions(W, tuned, k=6, side=side, exact_below=0)
    assert found.method == "certified" and found.indices == tuple(np.flatnonzero(ref < 0.5)) == (0, 1)
    cos = found.max_cos.numpy()
    assert np.all(cos[:2] >= ref[:2] - 1e-12) and np.all(cos[2:] <= ref[2:] + 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_side_operator_reads_the_stored_weight(dtype):
    """S Sᵀ Z and Qᵀ Y in float64 whatever W's dtype and side, against numpy (R from one in-place QR)."""
    g = torch.Generator().manual_seed(6)
    W = torch.randn(50, 30, generator=g).to(dtype)
    Z = torch.randn(50, 3, generator=g, dtype=torch.float64)
    Wn = W.double().numpy()
    S, project = ss._side_operator(W, "right")  # Wᵀ (30, 50) is wide: S = Wᵀ, as stored
    assert S.dtype == dtype and S.data_ptr() == W.data_ptr()
    np.testing.assert_allclose(ss._gram_times(S, Z[:30]).numpy(), Wn.T @ Wn @ Z[:30].numpy(), rtol=1e-12)
    R, project = ss._side_operator(W, "left")  # W (50, 30) is tall: its R (30, 30), Qᵀ applied
    Q, Rn = np.linalg.qr(Wn)
    np.testing.assert_allclose(np.abs(np.diag(R.numpy())), np.abs(np.diag(Rn)), rtol=1e-12)
    np.testing.assert_allclose(np.abs(project(Z).numpy()), np.abs(Q.T @ Z.numpy()), rtol=1e-9, atol=1e-12)
    WWtZ = project(torch.from_numpy(Wn @ Wn.T @ Z.numpy()))  # Qᵀ W Wᵀ Z = R Rᵀ Qᵀ Z
    np.testing.assert_allclose(ss._gram_times(R, project(Z)).numpy(), WWtZ.numpy(), rtol=1e-9, atol=1e-10)
