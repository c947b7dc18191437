"""The fast per-module numbers against exact references (float64 numpy/scipy, metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectra.linalg import sketch
from spectra.linalg import metrics
from spectra.linalg.svd import full_svd


def bf16_pair(m, n, *, rank, rel, seed=0):
    """bf16 base and tuned with a rank-`rank` exponentially decaying update of relative size `rel`."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(m, n, generator=g) * 0.02).bfloat16().float()
    u, _ = torch.linalg.qr(torch.randn(m, 6 * rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, 6 * rank, generator=g))
    s = torch.exp(-torch.arange(6 * rank) / rank)
    d = u * s @ v.T
    d *= rel * w.norm() / d.norm()
    return w, (w + d).bfloat16().float()


def test_squared_norm_matches_float64():
    x = torch.randn(1000, 777) * 1e-3
    assert sketch.squared_norm(x) == pytest.approx(float(x.double().pow(2).sum()), rel=1e-7)
    assert sketch.squared_norm(torch.zeros(5, 5)) == 0.0


@pytest.mark.parametrize("scale", [1e30, 1e18, 1e-20, 1e-30, "mixed"])
def test_squared_norm_over_the_float32_range(scale):
    """fp32 block sums of squares overflow past ~1e17 and lose digits below ~1e-19: redone in float64."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(700, 901, generator=g)  # 153 whole blocks and a partial one
    if scale == "mixed":  # huge, tiny and zero blocks side by side, and both extremes inside one block
        x.view(-1)[: 40 * 4096] *= 1e30
        x.view(-1)[40 * 4096: 80 * 4096] *= 1e-30
        x.view(-1)[80 * 4096: 90 * 4096] = 0.0
        x.view(-1)[100 * 4096 + 7] = 3e36
        x.view(-1)[101 * 4096 + 9] = 1e-40  # a float32 subnormal
    else:
        x *= scale
    expected = float(np.sum(x.double().numpy() ** 2))  # float64 numpy: the reference
    assert math.isfinite(expected) and expected > 0
    assert sketch.squared_norm(x) == pytest.approx(expected, rel=1e-6, abs=0)  # abs=0: 1e-54 is not "≈ 0"
    acc = sketch.BlockSquaredNorm(x.numel())  # chunked as the subtraction feeds it
    for i in range(0, x.numel(), 1 << 17):
        acc.add(x.view(-1)[i:i + (1 << 17)])
    assert acc.total() == pytest.approx(expected, rel=1e-6, abs=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_squared_norm_reports_nan_and_inf(bad):
    """Callers (the pairing) read a non-finite norm as a NaN/Inf entry: the float64 redo must keep it."""
    for where in (5, 4096 * 7 + 3, 153 * 4096 + 2):  # a block of small values, a middle block, the partial tail
        x = torch.randn(700, 901) * 1e-30  # every block is redone in float64
        x.view(-1)[where] = bad
        assert not math.isfinite(sketch.squared_norm(x))
        y = torch.randn(700, 901)
        y.view(-1)[where] = bad
        assert not math.isfinite(sketch.squared_norm(y))
    assert sketch.squared_norm(torch.zeros(700, 901)) == 0.0


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_noise_floor_exact_when_small_and_close_when_sampled(storage):
    b = torch.randn(300, 200).to(storage).float()
    t = (b + 1e-3 * torch.randn(300, 200)).to(storage).float()
    exact = metrics.rounding_noise_floor(b, t, base_dtype=storage, tuned_dtype=storage)
    fast = sketch.sampled_noise_floor(b, t, base_dtype=storage, tuned_dtype=storage)
    assert fast.variance == pytest.approx(exact.variance, rel=1e-12) and fast.mp_edge == pytest.approx(exact.mp_edge)
    sampled = sketch.sampled_noise_floor(b, t, base_dtype=storage, tuned_dtype=storage, max_elements=6000)
    assert sampled.sigma == pytest.approx(exact.sigma, rel=0.05) and sampled.sigma != exact.sigma


def test_energy_sketch_ranks_match_full_svd():
    w, t = bf16_pair(600, 900, rank=12, rel=1e-2)
    d = t - w
    total = sketch.squared_norm(d)
    fast = sketch.energy_sketch(d, energy=0.9, thresholds=(0.5, 0.9, 0.99), total_energy=total, block=32)
    exact = full_svd(d.double())
    assert fast.method == "adaptive-bf16" and not fast.complete
    for tau in (0.5, 0.9):
        assert abs(metrics.energy_rank(fast, tau) - metrics.energy_rank(exact, tau)) <= 1
    assert metrics.energy_rank(fast, 0.99) is None  # deep in the rounding noise: not claimed
    k = fast.k
    assert np.all(fast.values.double().numpy() <= exact.values[:k].numpy() * (1 + 1e-5))  # Ritz: lower bounds
    np.testing.assert_allclose(fast.values[:5].double().numpy(), exact.values[:5].numpy(), rtol=1e-3)


def _with_tail(m, n, *, rank, tail, seed=0):
    """ΔW of a bf16 pair: a rank-`rank` exponentially decaying update plus a Gaussian tail holding `tail` of
    its energy (make_pair's model of a fine-tune), both sides rounded to bf16."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(m, n, generator=g) * 0.02).bfloat16().float()
    u, _ = torch.linalg.qr(torch.randn(m, 6 * rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, 6 * rank, generator=g))
    d = u * torch.exp(-torch.arange(6 * rank) / rank) @ v.T
    size = 1e-2 * float(w.norm())  # ‖ΔW‖_F
    d *= size * math.sqrt(1 - tail) / d.norm()
    d += torch.randn(m, n, generator=g) * (size * math.sqrt(tail / (m * n)))
    return (w + d).bfloat16().float() - w


@pytest.mark.parametrize("rank, seed", [(4, 0), (2, 1), (8, 2)])
def test_energy_sketch_gives_a_threshold_it_cannot_settle_as_an_interval(rank, seed):
    """A noise tail puts the 95 % rank in the basis's unconverged part, where the Ritz values still run low:
    their rank there, which the sketch reported as a number, was 2–3 too high. It is now left out of the
    values (energy_rank reads None) and given as an interval holding the float64 rank."""
    d = _with_tail(400, 1100, rank=rank, tail=0.03, seed=seed)
    taus = (0.5, 0.9, 0.95, 0.99)
    fast = sketch.energy_sketch(d, energy=0.9, thresholds=taus, total_energy=sketch.squared_norm(d))
    s = np.linalg.svd(d.double().numpy(), compute_uv=False)  # the float64 reference
    cum = np.cumsum(s**2) / np.sum(s**2)
    exact = {t: int(np.searchsorted(cum, t) + 1) for t in taus}
    assert fast.method == "adaptive-bf16"
    for t in (0.5, 0.9):
        assert abs(metrics.energy_rank(fast, t) - exact[t]) <= 1
    assert metrics.energy_rank(fast, 0.95) is None and metrics.energy_rank(fast, 0.99) is None
    lo, hi = fast.rank_bounds[0.95]
    assert lo <= exact[0.95] <= hi and fast.k < hi
    assert hi - exact[0.95] >= 2  # negative control: the Ritz values' own rank is off here
    assert 0.99 not in fast.rank_bounds  # past the basis: no interval is claimed either


def test_energy_sketch_reports_a_higher_threshold_it_settles():
    """Without a tail the 95 % rank converges with the 90 % one and stays a number (no interval)."""
    d = _with_tail(400, 1100, rank=8, tail=0.0)
    fast = sketch.energy_sketch(d, energy=0.9, thresholds=(0.95,), total_energy=sketch.squared_norm(d))
    exact = full_svd(d.double())
    assert fast.rank_bounds == {}
    for t in (0.9, 0.95):
        assert abs(metrics.energy_rank(fast, t) - metrics.energy_rank(exact, t)) <= 1


def test_energy_sketch_resolves_a_rank_that_lies_in_the_noise_floor():
    """The SVD bench's bf16 ΔW (seed 4), sketched as module_spectrum does: its 90 % rank, 168, lies in the
    rounding-noise bulk (σ_k² is 2.5e-4 of ‖ΔW‖²) and is reached with 0.04 σ_k² to spare. The stop test
    passed at 170: the last half step's gain, 0.54 σ_k², read as 0.24 from the bf16 product's estimate (under
    σ_k²/4), and the Ritz values were still 1.36 σ_k² short of the σᵢ² up to the rank."""
    from spectra.bench.svd import make_matrix

    d = make_matrix("bf16", 1024, 2816, seed=4)
    taus = (0.5, 0.9, 0.95, 0.99)
    fast = sketch.energy_sketch(d, energy=0.9, thresholds=taus, total_energy=sketch.squared_norm(d),
                                low=d.bfloat16())
    lam = np.linalg.svd(d.double().numpy(), compute_uv=False) ** 2  # σᵢ², float64
    cum = np.cumsum(lam) / lam.sum()
    exact = int(np.searchsorted(cum, 0.9) + 1)
    assert exact == 168 and cum[exact - 1] - 0.9 < 0.05 * lam[exact - 1] / lam.sum()  # the near tie
    assert fast.method == "adaptive-bf16"
    assert exact <= metrics.energy_rank(fast, 0.9) <= exact + 1  # the Ritz values' rank: never below
    assert metrics.energy_rank(fast, 0.5) == int(np.searchsorted(cum, 0.5) + 1)
    assert np.all(fast.values.double().numpy() ** 2 <= lam[: fast.k] * (1 + 1e-6))  # lower bounds


def test_the_values_half_a_step_back_are_exact_where_the_bf16_estimate_is_not():
    """The stop test measures a half step's gain against σ(Qᵀ A W), from the exact Z = Aᵀ Q: float64's to
    1e-6 σ₁² and below the Ritz values of Q index by index. The bf16 step's own estimate σ(R) (negative control),
    which the test used, is 5e-4–1.5e-3 off in the top σᵢ² and even exceeds Ritz values it must lie under."""
    for d in (_with_tail(400, 1100, rank=8, tail=0.03), _with_tail(400, 1100, rank=8, tail=0.0, seed=1)):
        low = d.bfloat16()
        g = torch.Generator().manual_seed(0)
        Q, _ = torch.linalg.qr(d @ torch.randn(1100, 32, generator=g))
        W, _ = sketch._orth(sketch.thin_product(low.T, Q.bfloat16()).float())  # a bf16 step, as energy_sketch's
        Q, R = sketch._orth(sketch.thin_product(low, W.bfloat16()).float())  # (400, 32), (32, 32)
        Q, _ = torch.linalg.qr(Q)  # as the check takes it
        before = sketch._ritz_before(sketch._ritz_product(d, Q), W).numpy()
        x, q, w = d.double().numpy(), Q.double().numpy(), W.double().numpy()
        reference = np.linalg.svd(q.T @ x @ w, compute_uv=False)  # float64
        ritz = np.linalg.svd(q.T @ x, compute_uv=False)
        np.testing.assert_allclose(before**2, reference**2, rtol=0, atol=1e-6 * reference[0] ** 2)
        assert np.all(before <= ritz * (1 + 1e-6))
        estimate = torch.linalg.svdvals(R.double()).numpy()
        assert np.abs(estimate[:8] ** 2 - reference[:8] ** 2).max() > 1e-4 * reference[0] ** 2
        assert np.any(estimate > ritz)


def test_energy_sketch_of_a_zero_matrix_is_the_whole_zero_spectrum():
    """As full_svd gives it: every value (0), complete; before, one value and complete=False."""
    for dtype in (torch.bfloat16, torch.float16):
        fast = sketch.energy_sketch(torch.zeros(300, 200), energy=0.9, thresholds=(0.5, 0.99), total_energy=0.0,
                                    sketch_dtype=dtype)
        exact = full_svd(torch.zeros(300, 200))
        assert fast.complete and fast.k == exact.k == 200 and not fast.values.any()
        assert fast.captured_fraction == 1.0
        assert metrics.energy_ranks(fast, (0.5, 0.9, 0.99)) == metrics.energy_ranks(exact, (0.5, 0.9, 0.99)) \
            == {0.5: 0, 0.9: 0, 0.99: 0}


def _decaying(m, n, *, rms, seed=0):
    """A ΔW with σᵢ = e^(−i/8) (rank 60) scaled so its typical entry is `rms`."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, 60, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, 60, generator=g))
    d = u * torch.exp(-torch.arange(60) / 8.0) @ v.T
    return d * (rms / float(d.pow(2).mean().sqrt()))


@pytest.mark.parametrize("rms", [1e-6, 1e-8, 1e3])
def test_float16_sketch_gives_the_float32_ranks_at_any_scale(rms):
    """float16 holds 6e-5 … 65504: without scaling, a 1e-8 ΔW flushed to zero (the sketch fell back to a
    full SVD) and a 1e3 one overflowed in its first Gaussian product (LinAlgError on NaN)."""
    d = _decaying(500, 800, rms=rms)
    total = sketch.squared_norm(d)
    runs = {dt: sketch.energy_sketch(d, energy=0.9, thresholds=(0.5, 0.99), total_energy=total, block=16,
                                     sketch_dtype=dt) for dt in (None, torch.float16)}
    half, single = runs[torch.float16], runs[None]
    assert half.method == "adaptive-fp16" and half.total_energy == total  # no fall-back, the caller's total
    for tau in (0.5, 0.9, 0.99):
        assert metrics.energy_rank(half, tau) == metrics.energy_rank(single, tau) is not None
    exact = full_svd(d.double()).values[:5].numpy()
    np.testing.assert_allclose(half.values[:5].double().numpy(), exact, rtol=1e-4)  # unscaled back


def test_basis_grows_to_fit_the_rank_estimate():
    for k in (1, 7, 40, 50, 97, 300):
        l = sketch._basis_for(k)
        assert l % 16 == 0 and l - max(8, l // 4) >= 1.1 * k  # holds k with 10 % to spare
        smaller = l - 16
        assert smaller - max(8, smaller // 4) < 1.1 * k  # and is the smallest such multiple of 16
    assert sketch._basis_for(50) == 80  # not 128: a doubling from 64 would waste 3/8 of the GEMM work


def test_energy_sketch_past_its_first_block_still_gets_the_rank():
    """A rank just above the first block's usable part (48 of 64) grows the basis to fit it."""
    w, t = bf16_pair(700, 1500, rank=50, rel=1e-2)
    d = t - w
    total = sketch.squared_norm(d)
    exact = full_svd(d.double())
    assert 48 < metrics.energy_rank(exact, 0.9) < 80
    fast = sketch.energy_sketch(d, energy=0.9, total_energy=total, block=64)
    assert fast.method == "adaptive-bf16"
    assert abs(metrics.energy_rank(fast, 0.9) - metrics.energy_rank(exact, 0.9)) <= 1
    assert np.all(fast.values.double().numpy() <= exact.values[: fast.k].numpy() * (1 + 1e-5))


def test_energy_sketch_falls_back_to_full_for_a_flat_spectrum():
    d = torch.randn(256, 300)  # white noise: the 90 % rank is most of the matrix
    fast = sketch.energy_sketch(d, energy=0.9, total_energy=sketch.squared_norm(d), block=16)
    assert fast.method == "adaptive-bf16->full"
    assert metrics.energy_rank(fast, 0.9) == metrics.energy_rank(full_svd(d.double()), 0.9)


def test_top_values_resolve_outliers():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(500, 800, generator=g) * 0.02
    u, _ = torch.linalg.qr(torch.randn(500, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(800, 4, generator=g))
    w += u * torch.tensor([8.0, 6.0, 5.0, 4.0]) @ v.T
    top = sketch.top_values(w, 4)
    np.testing.assert_allclose(top.numpy(), np.linalg.svd(w.double().numpy(), compute_uv=False)[:4], rtol=1e-3)


def test_top_values_are_lower_bounds_and_depth_helps():
    """Ritz values never exceed the true σ; the Krylov depth is what resolves values past the first block."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(600, 1500, generator=g) / 1500**0.5
    u, _ = torch.linalg.qr(torch.randn(600, 8, generator=g))
    v, _ = torch.linalg.qr(torch.randn(1500, 8, generator=g))
    w = (w + u * torch.tensor([8.0, 6, 5, 4, 3.5, 3, 2.8, 2.6]) @ v.T).bfloat16()
    ref = np.linalg.svd(w.double().numpy(), compute_uv=False)[:8]
    errors = {}
    for depth in (0, 2):
        top = sketch.top_values(w, 8, n_iter=depth).double().numpy()
        assert np.all(top <= ref * (1 + 3e-4))  # lower bounds, up to the bf16 Ritz product's ~1e-4
        errors[depth] = np.max(np.abs(top - ref)[:4] / ref[:4])  # the four ≥ 2.5× the bulk edge (1.6)
    assert errors[2] < 1e-3 < errors[0]  # no Krylov depth: one Gaussian block is not enough


@pytest.mark.parametrize("short,k", [(5, 16), (30, 16), (40, 16), (300, 280)])
def test_top_values_fill_a_small_short_side(short, k):
    """Where the Krylov blocks would pass the short side, the last one is cut and the values are exact
    (up to the bf16 Ritz product); an all-zero weight gives zeros."""
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(short, 3000, generator=g) * torch.linspace(2, 0.1, short)[:, None]).bfloat16()
    top = sketch.top_values(w, k).double().numpy()
    ref = np.linalg.svd(w.double().numpy(), compute_uv=False)[:k]
    np.testing.assert_allclose(top, ref, rtol=3e-3)
    assert not sketch.top_values(torch.zeros(short, 3000, dtype=torch.bfloat16), k).any()


def test_block_squared_norm_refuses_misuse():
    acc = sketch.BlockSquaredNorm(3 * 4096)
    acc.add(torch.ones(4096 + 5))  # a partial block may only come last
    with pytest.raises(ValueError, match="partial block"):
        acc.add(torch.ones(4096))
    acc = sketch.BlockSquaredNorm(4096)
    with pytest.raises(ValueError, match="past the end"):
        acc.add(torch.ones(4097))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_squared_norm_of_half_precision_is_exact_upcast(storage):
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(333, 1001, generator=g) * 0.02).to(storage)  # > 2¹⁶ elements: chunked, odd tail
    expected = float((w.double() ** 2).sum())
    assert sketch.squared_norm(w) == pytest.approx(expected, rel=2e-6)  # fp32 blocks: ~7e-7 on bf16 values
    assert sketch.squared_norm(w) == pytest.approx(sketch.squared_norm(w.float()), rel=1e-12)


def test_noise_floor_from_stored_weights_equals_upcast():
    base, tuned = bf16_pair(300, 500, rank=4, rel=1e-2)
    kw = dict(base_dtype=torch.bfloat16, tuned_dtype=torch.bfloat16, max_elements=1 << 14)
    stored = sketch.sampled_noise_floor(base.bfloat16(), tuned.bfloat16(), **kw)
    upcast = sketch.sampled_noise_floor(base, tuned, **kw)
    assert stored == upcast


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_noise_floor_of_stored_half_weights_over_every_exponent_equals_the_float64_reference(storage):
    """The exponent histogram read from the 16-bit patterns (bf16) or after an up-cast (fp16)
    gives exactly the reference's mean ulp² on entries from subnormal to large, zeros and
    negatives included."""
    g = torch.Generator().manual_seed(3)
    low = -40.0 if storage == torch.bfloat16 else -7.0  # into each format's subnormals
    x = torch.randn(400, 300, generator=g) * torch.logspace(low, 3, 300)
    x[0, :7] = 0.0
    base, tuned = x.to(storage), (x * 1.001).to(storage)
    exact = metrics.rounding_noise_floor(base.double(), tuned.double(), base_dtype=storage, tuned_dtype=storage)
    stored = sketch.sampled_noise_floor(base, tuned, base_dtype=storage, tuned_dtype=storage)
    assert stored.variance == pytest.approx(exact.variance, rel=1e-12)
    assert stored == sketch.sampled_noise_floor(base.float(), tuned.float(), base_dtype=storage, tuned_dtype=storage)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mean_ulp_squared_counts_inf_and_nan_as_exact(dtype):
    # Σ 2^(2e) of an inf or NaN entry is inf: those entries count as zeros (the pairing rejects them anyway)
    x = (torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    clean = x.clone()
    x[3, 4], x[7, 1], x[9, 9] = math.inf, -math.inf, math.nan
    clean[3, 4] = clean[7, 1] = clean[9, 9] = 0.0
    for storage in (torch.bfloat16, torch.float16):
        got = sketch.mean_ulp_squared(x, storage)
        assert math.isfinite(got) and got == sketch.mean_ulp_squared(clean, storage) > 0


@pytest.mark.parametrize("tall", [False, True])
def test_top_values_of_a_bf16_weight_match_float64(tall):
    """A weight as stored (bf16, possibly a transposed view) gives the values of its float32 up-cast."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(500, 900, generator=g) * 0.02
    u, _ = torch.linalg.qr(torch.randn(500, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(900, 4, generator=g))
    w = (w + u * torch.tensor([8.0, 6.0, 5.0, 4.0]) @ v.T).bfloat16()
    w = w.T.contiguous() if tall else w
    for view in (w, w.T):
        top = sketch.top_values(view, 4)
        np.testing.assert_allclose(top.numpy(), np.linalg.svd(w.double().numpy(), compute_uv=False)[:4], rtol=1e-3)
        np.testing.assert_allclose(top.numpy(), sketch.top_values(view.float(), 4).numpy(), rtol=3e-4)  # bf16 Ritz


def test_bf16_ritz_values_are_the_float32_ones_within_its_rounding():
    """The one-GEMM bf16 Rayleigh–Ritz against the float32 product on the same basis."""
    g = torch.Generator().manual_seed(5)
    A = (torch.randn(400, 1500, generator=g) * 0.02).bfloat16()
    Q, _ = torch.linalg.qr(torch.randn(400, 24, generator=g))
    exact = sketch._ritz(A.float(), Q).numpy()
    np.testing.assert_allclose(sketch._ritz(A, Q).numpy(), exact, rtol=1e-6)  # _ritz itself stays exact for bf16
    fast = sketch._ritz_bf16(A, Q).numpy()
    err = np.abs(fast / exact - 1).max()
    assert 1e-7 < err < 3e-4  # really the bf16 product, and within its rounding
    scaled = sketch._ritz_bf16(A, Q * 1.001).numpy()  # negative control: a 1e-3 error is caught at this tolerance
    assert np.abs(scaled / exact - 1).max() > 3e-4


@pytest.mark.parametrize("transposed", [False, True])
def test_ritz_values_in_either_layout_match_float64(transposed):
    """σ(Qᵀ A) from A stored as is or as a transposed view (the GEMM follows the layout)."""
    g = torch.Generator().manual_seed(7)
    A = torch.randn(1200, 300, generator=g).T if transposed else torch.randn(300, 1200, generator=g)  # (300, 1200)
    assert A.is_contiguous() is not transposed
    Q, _ = torch.linalg.qr(torch.randn(300, 20, generator=g))
    reference = np.linalg.svd(Q.double().numpy().T @ A.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(sketch._ritz(A, Q).numpy(), reference, rtol=1e-5)
    wrong = np.linalg.svd(Q.double().numpy()[:, 1:].T @ A.double().numpy(), compute_uv=False)  # negative control
    assert not np.allclose(sketch._ritz(A, Q).numpy()[:19], wrong, rtol=1e-3)


@pytest.mark.parametrize("tall", [False, True])
def test_energy_sketch_basis_is_orthonormal_on_the_short_side_and_gives_its_values(tall):
    """``basis`` (short, l): orthonormal, and the top of σ(Qᵀ A) on it, in float64, are the values returned."""
    w, t = bf16_pair(600, 900, rank=12, rel=1e-2)
    d = (t - w).T.contiguous() if tall else t - w
    fast = sketch.energy_sketch(d, energy=0.9, thresholds=(0.5, 0.9), total_energy=sketch.squared_norm(d), block=32)
    q = fast.basis.double()
    assert not fast.complete and q.shape[0] == 600 and fast.k < q.shape[1] < 600
    np.testing.assert_allclose((q.T @ q).numpy(), np.eye(q.shape[1]), atol=1e-6)
    side = d.double().T if tall else d.double()  # (600, 900): the basis's side first
    ritz = np.linalg.svd((q.T @ side).numpy(), compute_uv=False)
    np.testing.assert_allclose(fast.values.double().numpy(), ritz[:fast.k], rtol=1e-5)


def test_energy_sketch_whose_basis_spans_the_short_side_returns_the_whole_spectrum():
    d = torch.randn(48, 300, generator=torch.Generator().manual_seed(3))  # short side 48 < the first block of 64
    fast = sketch.energy_sketch(d, energy=0.9, total_energy=sketch.squared_norm(d), block=64)
    assert fast.complete and fast.k == 48 and fast.method == "adaptive-bf16"
    assert fast.basis is None  # the whole side: nothing to start a residual from that the values do not give
    np.testing.assert_allclose(fast.values.double().numpy(), np.linalg.svd(d.double().numpy(), compute_uv=False),
                               rtol=1e-5)


def test_energy_sketch_takes_a_precomputed_bf16_copy():
    """`low` (A rounded to bf16 by the caller) gives the same result as rounding inside; a wrong one is refused."""
    g = torch.Generator().manual_seed(11)
    for shape in ((300, 700), (700, 300)):
        A = (torch.randn(shape[0], 20, generator=g) @ torch.randn(20, shape[1], generator=g)
             + 0.05 * torch.randn(shape, generator=g))
        total = sketch.squared_norm(A)
        inside = sketch.energy_sketch(A, energy=0.9, total_energy=total, block=32)
        given = sketch.energy_sketch(A, energy=0.9, total_energy=total, block=32, low=A.to(torch.bfloat16))
        assert torch.equal(inside.values, given.values) and inside.n_iter == given.n_iter
    with pytest.raises(ValueError, match="low is"):
        sketch.energy_sketch(A, energy=0.9, total_energy=total, low=A.T.to(torch.bfloat16))
    with pytest.raises(ValueError, match="low is"):
        sketch.energy_sketch(A, energy=0.9, total_energy=total, low=A.half())
