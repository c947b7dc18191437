"""spectra.linalg.metrics against float64 numpy/scipy references on known spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectra.errors import ConfigError
from spectra.linalg import metrics as mt
from spectra.linalg.svd import full_svd, randomized_svd

from .conftest import bf16_pair, planted, power_law, reference_svdvals

CASES = ("planted", "power_law", "bf16")


@pytest.mark.parametrize("case", CASES)
def test_energy_ranks_match_reference(spectra_cases, case):
    M = spectra_cases[case]
    ref = reference_svdvals(M)
    frac = np.cumsum(ref**2) / np.sum(ref**2)
    F = full_svd(M)
    for tau in (0.5, 0.9, 0.95, 0.99):
        assert mt.energy_rank(F, tau) == int(np.searchsorted(frac, tau) + 1)
    # Truncated values + the exact total give the same answers, or None beyond k.
    R = randomized_svd(M, 40, n_oversamples=40, n_iter=8, random_state=0)
    got = mt.energy_ranks(R)
    for tau, k in got.items():
        want = int(np.searchsorted(frac, tau) + 1)
        if want <= 30:
            assert k == want
        elif want > 40:
            assert k is None  # the needed rank exceeds the k computed: said, not guessed


def test_energy_rank_on_bare_tensor_with_total():
    s = torch.tensor([3.0, 2.0, 1.0])
    assert mt.energy_rank(s, 0.9) == 2  # 13/14 ≥ 0.9
    assert mt.energy_rank(s[:1], 0.9, total_energy=14.0) is None
    with pytest.raises(ConfigError, match="tau"):
        mt.energy_rank(s, 1.5)
    with pytest.raises(ConfigError, match="descending"):
        mt.energy_rank(torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("case", CASES)
def test_scalar_ranks_match_reference(spectra_cases, case):
    M = spectra_cases[case]
    ref = reference_svdvals(M)
    F = full_svd(M)
    p = ref / ref.sum()
    # Tolerance 1e-6 relative: float32 input, float64 reference.
    assert mt.effective_rank(F) == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-6)
    assert mt.stable_rank(F) == pytest.approx(np.sum(ref**2) / ref[0] ** 2, rel=1e-6)
    assert mt.participation_ratio(F) == pytest.approx(np.sum(ref**2) ** 2 / np.sum(ref**4), rel=1e-6)
    assert mt.nuclear_frobenius_ratio(F) == pytest.approx(ref.sum() / np.sqrt(np.sum(ref**2)), rel=1e-6)
    assert 1 <= mt.effective_rank(F) <= min(M.shape)


def test_effective_rank_bounds():
    assert mt.effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert mt.effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)


def test_stable_rank_exact_from_truncated_spectrum():
    M = power_law()[0]
    ref = reference_svdvals(M)
    R = randomized_svd(M, 4, n_iter=6, random_state=0)
    assert mt.stable_rank(R) == pytest.approx(np.sum(ref**2) / ref[0] ** 2, rel=1e-5)


@pytest.mark.parametrize("as_spectrum", [False, True])
def test_ratio_metrics_are_scale_invariant_over_float64_range(as_spectrum):
    """σ at 1e-150 … 1e+150: σ² or σ⁴ leave float64's range, the ratios must not change.

    Before the values were normalised by σ₁, stable rank and participation ratio gave
    0/0 → 0 or inf at 1e-100 and 1e+200 (negative control: the naive formula below).
    """
    from spectra.linalg.svd import Spectrum

    s = torch.from_numpy(power_law(m=64, n=96)[1].numpy())  # σᵢ = i^-0.7, float64
    top = s[:20]  # a truncated top with the exact total: energy ranks and stable rank still exact

    def metrics(scale):
        v = s * scale
        if as_spectrum:
            total = float((s**2).sum()) * scale * scale
            whole = Spectrum(v, total, (64, 96), "full-gesdd")
            part = Spectrum(top * scale, total, (64, 96), "krylov", complete=False)
            ranks = mt.energy_ranks(part, (0.3, 0.5))
        else:
            whole, part = v, None
            ranks = mt.energy_ranks(v, (0.5, 0.9, 0.99))
        out = [mt.stable_rank(whole), mt.participation_ratio(whole), mt.effective_rank(whole),
               mt.nuclear_frobenius_ratio(whole), *ranks.values(), mt.energy_rank(whole, 1.0)]
        if part is not None:
            out.append(mt.stable_rank(part))
        return out

    ref = metrics(1.0)
    assert all(x > 0 for x in ref)
    for scale in (1e-150, 1e-100, 1e100, 1e150):
        np.testing.assert_allclose(metrics(scale), ref, rtol=1e-12)
    if not as_spectrum:
        with np.errstate(all="ignore"):  # σ⁴ underflows at 1e-100, σ² overflows at 1e+200: 0/0 and inf/inf
            for x in (s.numpy() * 1e-100, s.numpy() * 1e200):
                assert not np.isfinite(np.sum(x**2) ** 2 / np.sum(x**4))
        assert mt.participation_ratio(s * 1e200) == pytest.approx(ref[1], rel=1e-12)


def test_zero_spectrum_gives_documented_zeros():
    z = torch.zeros(5, dtype=torch.float64)
    assert mt.energy_rank(z, 0.9) == 0 and set(mt.energy_ranks(z).values()) == {0}
    assert mt.stable_rank(z) == 0.0 and mt.participation_ratio(z) == 0.0
    assert mt.effective_rank(z) == 0.0 and mt.nuclear_frobenius_ratio(z) == 0.0
    assert mt.gavish_donoho(torch.zeros(12, dtype=torch.float64), (12, 16)).rank == 0
    assert mt.gavish_donoho(z, (5, 8), sigma=0.0).rank == 0  # a short side of 5: the known-noise form only
    zero = full_svd(torch.zeros(6, 9))
    assert mt.energy_rank(zero, 0.9) == 0 and mt.stable_rank(zero) == 0.0 and mt.participation_ratio(zero) == 0.0
    with pytest.raises(ConfigError, match="descending"):
        mt.stable_rank(torch.tensor([0.0, 1.0]))  # a zero first value only when all are zero


# ---------------------------------------------------------------------------- Gavish–Donoho


def test_gd_constants():
    assert mt.gd_lambda_star(1.0) == pytest.approx(4 / math.sqrt(3), rel=1e-12)
    assert mt.gd_omega(1.0) == pytest.approx(2.858, abs=1e-3)
    for beta in (0.1, 0.25, 0.5, 0.75, 1.0):
        # The cubic is the paper's fit to the exact ω; they agree to ~0.02.
        assert abs(mt.gd_omega(beta) - mt.gd_omega_approx(beta)) < 0.02


@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_marchenko_pastur_median_matches_simulation(beta):
    n = 1200
    m = int(beta * n)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(m, n, generator=g, dtype=torch.float64)
    eig = np.linalg.eigvalsh((X @ X.T / n).numpy())
    assert np.median(eig) == pytest.approx(mt.marchenko_pastur_median(beta), rel=0.015)


@pytest.mark.parametrize("beta", [1.0, 0.9, 0.5, 2048 / 5632, 0.125, 1e-3])
def test_marchenko_pastur_cdf_matches_quadrature_of_the_density(beta):
    """The closed-form CDF against SciPy's adaptive quadrature of the density (an independent reference),
    inside the support and at both edges; the median against root-finding on that quadrature."""
    from scipy.integrate import quad
    from scipy.optimize import brentq

    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2

    def density(t):
        return math.sqrt(max((hi - t) * (t - lo), 0.0)) / (2 * math.pi * beta * t)

    def integral(x):
        return quad(density, lo, x, limit=200, epsabs=1e-13, epsrel=1e-12)[0]

    for x in np.linspace(lo, hi, 9):
        assert mt.marchenko_pastur_cdf(x, beta) == pytest.approx(integral(x), abs=1e-12)
    assert mt.marchenko_pastur_cdf(lo, beta) == 0.0
    assert mt.marchenko_pastur_cdf(np.nextafter(hi, 0), beta) == pytest.approx(1.0, abs=1e-13)
    assert mt.marchenko_pastur_cdf(lo - 1.0, beta) == 0.0 and mt.marchenko_pastur_cdf(hi + 1.0, beta) == 1.0
    median = brentq(lambda x: integral(x) - 0.5, lo, hi, xtol=1e-14, rtol=1e-13)
    assert mt.marchenko_pastur_median(beta) == pytest.approx(median, rel=1e-12)


def test_marchenko_pastur_median_is_monotone_up_to_the_square_case():
    """μ_β falls from 1 (β → 0) to μ₁ ≈ 0.6528 (β = 1) without a jump near β = 1, where quadrature of the density
    (its 1/t pole meets the lower edge β₋ → 0) had put μ at 0.9999 2e-4 below μ at 1."""
    betas = [1e-6, 0.01, 0.1, 0.5, 0.9, 0.99, 0.9999, 1.0]
    medians = [mt.marchenko_pastur_median(b) for b in betas]
    assert all(a > b for a, b in zip(medians, medians[1:]))
    assert medians[0] == pytest.approx(1.0, abs=1e-5)
    assert medians[-1] == pytest.approx(0.6527759416, rel=1e-9)
    assert medians[-2] - medians[-1] < 1e-4


@pytest.mark.parametrize("m", [12, 13])
def test_gavish_donoho_unknown_noise_reads_the_median_of_every_value(m):
    """τ = ω(β)·median σ and σ̂ = median/√(n·μ_β), with numpy's median (even and odd counts) as the reference."""
    n = 40
    s = np.sort(np.random.default_rng(m).uniform(0.1, 3.0, m))[::-1].copy()
    gd = mt.gavish_donoho(torch.from_numpy(s), (m, n))
    assert gd.threshold == pytest.approx(mt.gd_omega(m / n) * np.median(s), rel=1e-14)
    assert gd.noise_sigma == pytest.approx(np.median(s) / math.sqrt(n * mt.marchenko_pastur_median(m / n)), rel=1e-14)
    assert gd.rank == int(np.sum(s > gd.threshold))


@pytest.mark.parametrize("known", [True, False])
def test_gavish_donoho_recovers_planted_rank(known):
    noise = 0.01
    M = planted(m=300, n=400, rank=8, noise=noise)
    F = full_svd(M)
    gd = mt.gavish_donoho(F, M.shape, sigma=noise if known else None)
    assert gd.rank == 8
    assert gd.noise_sigma == pytest.approx(noise, rel=0.05)  # unknown: estimated from the median
    ref = reference_svdvals(M)
    assert ref[8] < gd.threshold < ref[7]


def test_gavish_donoho_unknown_noise_needs_whole_spectrum():
    M = planted()
    R = randomized_svd(M, 10, random_state=0)
    with pytest.raises(ConfigError, match="whole spectrum"):
        mt.gavish_donoho(R, M.shape)
    assert mt.gavish_donoho(R, M.shape, sigma=0.01).rank == 8  # known σ works on top-k


def test_marchenko_pastur_edge_matches_pure_noise():
    m, n, sigma = 256, 512, 0.02
    g = torch.Generator().manual_seed(2)
    N = sigma * torch.randn(m, n, generator=g, dtype=torch.float64)
    top = reference_svdvals(N)[0]
    edge = sigma * (math.sqrt(m) + math.sqrt(n))
    assert top == pytest.approx(edge, rel=0.03)  # finite-size Tracy–Widom fluctuation ≪ 3 %


# ---------------------------------------------------------------------------- noise floor


def test_bf16_noise_floor_sits_at_planted_rank():
    base, tuned = bf16_pair(rank=4)
    delta = tuned.float() - base.float()
    F = full_svd(delta)
    floor = mt.rounding_noise_floor(base, tuned, s=F)
    assert floor.rank == 4  # not full rank (256)
    assert floor.base_dtype == "bfloat16"
    # The predicted noise matches the rounding actually present (fp64 originals rebuilt).
    g = torch.Generator().manual_seed(0)
    base64 = 0.02 * torch.randn(256, 512, generator=g, dtype=torch.float64)
    actual = base.double() - base64
    assert math.sqrt(float((actual**2).mean())) == pytest.approx(math.sqrt(floor.variance / 2), rel=0.05)
    # Everything past the planted rank lies below the edge, and close to it (within 10 %).
    assert F.values[4] < floor.mp_edge < F.values[3]
    assert float(F.values[4]) == pytest.approx(floor.mp_edge, rel=0.1)


def test_float32_noise_floor_is_negligible_and_upcast_dtype_is_honoured():
    base, tuned = bf16_pair(rank=4)
    f32 = mt.rounding_noise_floor(base.float(), tuned.float())
    bf = mt.rounding_noise_floor(base.float(), tuned.float(), base_dtype=torch.bfloat16,
                                 tuned_dtype=torch.bfloat16)
    assert f32.sigma < bf.sigma / 30_000  # 2^-23 vs 2^-7: a factor 2^16 in ulp
    assert bf.variance == pytest.approx(mt.rounding_noise_floor(base, tuned).variance)


def test_ulp_known_values():
    x = torch.tensor([1.0, 1.5, 0.3, 0.0, -2.0])
    assert mt.ulp(x, torch.bfloat16).tolist() == [2**-7, 2**-7, 2**-9, 0.0, 2**-6]
    assert mt.ulp(x, torch.float16).tolist() == [2**-10, 2**-10, 2**-12, 0.0, 2**-9]
    assert mt.ulp(torch.tensor([1e-7]), torch.float16).tolist() == [2**-24]  # subnormal spacing


# ---------------------------------------------------------------------------- decay, size


def test_decay_fit_recovers_exponent():
    M, s = power_law(alpha=0.7)
    fit = mt.decay_fit(full_svd(M), stop=200)
    assert fit.alpha == pytest.approx(0.7, abs=1e-4) and fit.r2 > 0.9999
    # A planted spectrum is no power law: the fit says so.
    bad = mt.decay_fit(full_svd(planted()), stop=100)
    assert bad.r2 < 0.9


def test_decay_fit_validates_range():
    with pytest.raises(ConfigError, match="3 points"):
        mt.decay_fit(torch.tensor([1.0, 0.5]))


def test_relative_update_size():
    base = torch.ones(4, 4)
    assert mt.relative_update_size(0.1 * base, base) == pytest.approx(0.1)
    assert math.isinf(mt.relative_update_size(base, torch.zeros(4, 4)))
    with pytest.raises(ConfigError, match="`delta` holds NaN"):  # it returned nan
        mt.relative_update_size(torch.tensor([[math.nan]]), torch.ones(1, 1))
    with pytest.raises(ConfigError, match="`base` holds NaN"):
        mt.relative_update_size(torch.ones(1, 1), torch.tensor([[math.inf]]))


def test_metrics_refuse_what_cannot_be_measured():
    """A spectrum longer than `shape` allows (it gave rank 15 for a 3×500 matrix), an infinite noise level (rank 0),
    an empty pair (ZeroDivisionError): each refused, naming the input."""
    s = torch.linspace(10, 1, 20, dtype=torch.float64)
    with pytest.raises(ConfigError, match="20 singular values for a 3×500 matrix"):
        mt.gavish_donoho(s, (3, 500), sigma=0.1)
    tau = mt.gd_lambda_star(20 / 500) * math.sqrt(500) * 0.1  # the same values with their own shape: λ*(β)·√n·σ
    assert mt.gavish_donoho(s, (20, 500), sigma=0.1).rank == int((s > tau).sum()) == 15
    with pytest.raises(ConfigError, match="finite, non-negative"):
        mt.gavish_donoho(s, (20, 500), sigma=math.inf)
    with pytest.raises(ConfigError, match="empty"):
        mt.rounding_noise_floor(torch.zeros(0, 3), torch.zeros(0, 3))


def test_energy_rank_at_full_energy_from_a_float32_spectrum():
    """Σσᵢ² of float32 values matches the exact ‖M‖_F² only to ~1e-7: τ = 1 must still give a rank, not None."""
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        assert mt.energy_rank(full_svd(torch.randn(64, 96, generator=g)), 1.0) == 64
    low = torch.randn(64, 5, generator=g) @ torch.randn(5, 96, generator=g)  # rank 5 exactly
    assert mt.energy_rank(full_svd(low), 1.0) == 5 and mt.energy_rank(full_svd(low.double()), 1.0) == 5
    assert mt.energy_rank(torch.tensor([3.0, 1.0]), 0.95, total_energy=100.0) is None  # truncated: beyond k


def test_energy_rank_at_full_energy_leaves_out_a_tail_under_1e12_of_the_energy():
    """As documented: τ = 1 on a complete spectrum stops once the rest holds under 1e-12 of Σσᵢ²."""
    s = torch.exp(-0.3 * torch.arange(73, dtype=torch.float64))
    share = torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0]) / (s**2).sum()  # share[i] = Σ_{j≥i} σⱼ² / Σσ²
    expected = int((share >= 1e-12).sum())  # the values whose tail share is still ≥ 1e-12
    assert mt.energy_rank(s, 1.0) == expected == 47
    assert mt.energy_rank(s[:20], 1.0) == 20  # a slower spectrum keeps every value


def test_bf16_sketch_runs_every_requested_iteration():
    A, _ = power_law(600, 500, seed=4)
    fixed = randomized_svd(A, 16, n_iter=7, sketch_dtype=torch.bfloat16, random_state=0)
    assert fixed.n_iter == 7 and math.isfinite(fixed.tolerance)


def test_float32_energy_ranks_are_not_cut_short_by_a_loose_slack():
    """A 1e-5 slack for float32 values put ranks one (at τ = 1, many) too low."""
    from spectra.linalg.svd import full_svd

    F = full_svd(torch.diag(torch.tensor([1.0, 0.1005289])))  # top share 0.989995: τ = 0.99 needs both
    assert mt.energy_rank(F, 0.99) == 2
    assert mt.energy_rank(full_svd(torch.diag(torch.tensor([1.0, 0.003]))), 1.0) == 2
    s = torch.logspace(0, -2.7, 50, dtype=torch.float32)
    assert mt.energy_rank(s, 1.0) == 50  # was 45: values down to 3e-3·σ₁ dropped
    assert mt.energy_rank(s, 1.0, total_energy=float((s.double() ** 2).sum())) == 50
    # random complete float32 spectra against float64 SVDs of the same matrices: equal at every τ
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(20, 120, (1,), generator=g))
        M = torch.randn(n, n + 7, generator=g) * torch.rand(n, 1, generator=g) ** 3
        ref = np.linalg.svd(M.double().numpy(), compute_uv=False)
        share = np.cumsum(ref**2) / np.sum(ref**2)
        got = mt.energy_ranks(full_svd(M), (0.5, 0.9, 0.95, 0.99, 1.0))
        for tau, rank in got.items():
            exact = int(np.argmax(share >= tau * (1 - 1e-12))) + 1
            assert rank == exact, (trial, tau, rank, exact)


def test_marchenko_pastur_cdf_refuses_nan():
    with pytest.raises(ConfigError, match="NaN"):
        mt.marchenko_pastur_cdf(float("nan"), 0.5)
