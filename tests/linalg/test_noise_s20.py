"""A small ΔW's rounding noise against its own simulated threshold (noise.rounding_edge_factor), not a Gaussian's.

bf16 rounding noise is uniform in ±ulp/2 with each element's own exponent: a scale mixture whose top singular value
sits higher and spreads wider than Gaussian noise's of the same mean variance at small sizes, so pure noise passed
the Tracy–Widom threshold several times as often as Gaussian noise does. References: i.i.d. Gaussian noise of the
same shape (numpy), whose rate is what the threshold is calibrated for; float64 numpy SVD of the pure noise; the
floor's variance from sampled_noise_floor. Seeds are fixed; rates are counted over them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectra.errors import ConfigError
from spectra.linalg import noise
from spectra.linalg.sketch import sampled_noise_floor


def _sv(x: np.ndarray) -> np.ndarray:
    return np.linalg.svd(x, compute_uv=False)


def _top(x: np.ndarray) -> float:
    return float(_sv(x)[0])


def _pure_noise(m: int, n: int, seed: int, *, sides: str, quantile: float = 0.99):
    """(pure rounding noise in float64, the floor's bare edge, its factor) for a Gaussian-like weight (std 0.02).

    "one": base float32, tuned its bf16 rounding (ΔW is the tuned side's rounding alone); "two": both bf16, rounded
    from a float64 master and master + a rank-2 update of a few ulps (the noise is ΔW − δ, both roundings in it)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.02
    if sides == "one":
        base, tuned = w.float(), w.float().to(torch.bfloat16)
        base_dtype, pure = torch.float32, tuned.double() - base.double()
    else:
        left = torch.linalg.qr(torch.randn(m, 2, generator=g, dtype=torch.float64))[0]
        right = torch.linalg.qr(torch.randn(n, 2, generator=g, dtype=torch.float64))[0]
        delta = left @ right.T
        delta = delta * 0.01 * float(w.norm()) / float(delta.norm())
        base, tuned = w.to(torch.bfloat16), (w + delta).to(torch.bfloat16)
        base_dtype, pure = torch.bfloat16, tuned.double() - base.double() - delta
    floor = sampled_noise_floor(base, tuned, base_dtype=base_dtype, tuned_dtype=torch.bfloat16)
    factor = noise.rounding_edge_factor(tuned, tuned_dtype=torch.bfloat16, base=base, base_dtype=base_dtype,
                                        quantile=quantile)
    return pure.numpy(), floor.mp_edge, factor


# (shape, seeds, sides): measured at 0.99 over 300 seeds, bare Gaussian threshold / simulated one / Gaussian noise:
# one side 7.3 % / 0.7 % / 1.3 % (16×16), 5.0 / 1.0 / 0.7 % (64×64); two sides 16 / 2.3 / 1.3 %, 10 / 0.3 / 0.7 %
CASES = [((16, 16), 200, "one"), ((16, 16), 200, "two"), ((64, 64), 100, "one"), ((64, 64), 100, "two")]


@pytest.mark.parametrize("shape, seeds, sides", CASES)
def test_pure_rounding_noise_passes_its_threshold_no_more_often_than_gaussian_noise(shape, seeds, sides):
    """Pure bf16 rounding noise passes edge × factor (the 0.99 margin, for counts a test can see) at most 1.5 points
    above i.i.d. Gaussian noise's rate at the Gaussian threshold, same shape and seeds. Negative control: at the
    Gaussian threshold alone the same noise passes ≥ 3× as often as the Gaussian noise, and ≥ 3 %."""
    m, n = shape
    rng = np.random.default_rng(1234 + m)
    gaussian_threshold = noise.tracy_widom_edge(math.sqrt(m) + math.sqrt(n), shape, quantile=0.99)
    gaussian = sum(_top(rng.standard_normal(shape)) > gaussian_threshold for _ in range(seeds)) / seeds
    simulated = bare = 0
    for seed in range(seeds):
        pure, edge, factor = _pure_noise(m, n, 5000 * m + seed, sides=sides)
        assert factor >= 1.0
        simulated += noise.rank_above(_sv(pure), edge * factor, shape, quantile=0.99) > 0
        bare += noise.rank_above(_sv(pure), edge, shape, quantile=0.99) > 0
    assert simulated / seeds <= gaussian + 0.015, (simulated, seeds, gaussian)
    assert bare / seeds >= max(3 * gaussian, 0.03), (bare, seeds, gaussian)


@pytest.mark.parametrize("shape, seeds", [((16, 16), 100), ((64, 64), 40), ((64, 160), 30)])
def test_pure_rounding_noise_at_the_default_margin(shape, seeds):
    """At the default 0.999 margin at most one seed's pure two-sided noise passes edge × factor (measured 0.7 %, 0,
    0.7 % over 300 seeds at 16×16, 64×64, 64×256; Gaussian noise 0–0.3 %; the bare threshold 8.3 %, 2.7 %, 2.3 %)."""
    m, n = shape
    passed = 0
    for seed in range(seeds):
        pure, edge, factor = _pure_noise(m, n, 77 + seed, sides="two", quantile=noise.EDGE_QUANTILE)
        passed += noise.rank_above(_sv(pure), edge * factor, shape) > 0
    assert passed <= 1


def _planted(m: int, n: int, seed: int, strength: float, rank: int = 3):
    """ΔW of two bf16 releases rounded from a float64 master (std 0.02) and master + a rank-`rank` δ of equal
    singular values `strength`× the floor's bare edge; returns ΔW's float64 singular values, the edge, the factor."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.02
    left = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
    base = w.to(torch.bfloat16)
    floor = sampled_noise_floor(base, base, base_dtype=torch.bfloat16, tuned_dtype=torch.bfloat16)
    tuned = (w + strength * floor.mp_edge * left @ right.T).to(torch.bfloat16)
    factor = noise.rounding_edge_factor(tuned, tuned_dtype=torch.bfloat16, base=base)
    return _sv((tuned.double() - base.double()).numpy()), floor.mp_edge, factor


@pytest.mark.parametrize("shape, strength, seeds", [((16, 16), 2.0, 60), ((64, 64), 1.5, 30), ((64, 160), 1.5, 20)])
def test_a_planted_rank_above_the_floor_is_still_counted(shape, strength, seeds):
    """Negative control on the raised threshold: three directions at `strength`× the edge (2× at 16×16, where
    the factor reaches ~1.2 on top of the 1.151 margin; 1.5× above) are all counted in every seed, and no more than
    three in ≥ 90 % of them."""
    m, n = shape
    exact = 0
    for seed in range(seeds):
        values, edge, factor = _planted(m, n, 300 + seed, strength)
        counted = noise.rank_above(values, edge * factor, shape)
        assert counted >= 3, (seed, values[:4] / edge, factor)
        exact += counted == 3
    assert exact / seeds >= 0.9


def test_the_factor_follows_the_exponents_spread_and_costs_nothing_on_large_matrices():
    """Weights of one binade (every ulp equal: i.i.d. uniform noise, as light-tailed as a Gaussian's at the edge) get
    a factor of 1; Gaussian-like weights (ulps spread over many binades), both sides' rounding, > 1.04 at 32×32
    (measured 1.07–1.20 over six seeds; the fine-tune's side alone 1.02–1.11). The factor is a fixed number (seeded)
    and ≥ 1. Above SIMULATED_MAX_ELEMENTS it is 1.0 without reading the weights (a meta tensor would fail any read)."""
    g = torch.Generator().manual_seed(3)
    flat = (1.0 + torch.rand(32, 32, generator=g, dtype=torch.float64)).to(torch.bfloat16)  # all in [1, 2)
    spread = (0.02 * torch.randn(32, 32, generator=g, dtype=torch.float64)).to(torch.bfloat16)
    assert noise.rounding_edge_factor(flat, tuned_dtype=torch.bfloat16, base=flat) == 1.0
    both = noise.rounding_edge_factor(spread, tuned_dtype=torch.bfloat16, base=spread)
    assert both > 1.04
    assert noise.rounding_edge_factor(spread, tuned_dtype=torch.bfloat16, base=spread) == both
    assert noise.rounding_edge_factor(spread, tuned_dtype=torch.bfloat16) >= 1.0
    assert noise.rounding_edge_factor(spread, tuned_dtype=torch.bfloat16, quantile=None) >= 1.0
    side = int(math.isqrt(noise.SIMULATED_MAX_ELEMENTS)) + 1
    big = torch.empty(side, side, device="meta", dtype=torch.bfloat16)
    assert noise.rounding_edge_factor(big, tuned_dtype=torch.bfloat16, base=big) == 1.0
    assert noise.rounding_edge_factor(torch.zeros(16, 16), tuned_dtype=torch.bfloat16) == 1.0  # exact zeros: no noise


def test_rank_above_draws_the_factor_only_where_it_can_change_the_count():
    """edge_factor as a function is called only where a value lies between the Gaussian threshold (2.302 for edge 2
    at 16×16) and FACTOR_CAP× it; the factor moves the threshold; one outside [1, FACTOR_CAP] is refused."""
    calls = []

    def factor(value):
        return lambda: calls.append(value) or value

    assert noise.rank_above(np.array([5.0, 2.2, 1.0]), 2.0, (16, 16), edge_factor=factor(1.2)) == 1
    assert calls == []  # 5.0 is above 1.5 × 2.302, 2.2 below 2.302: no factor can change the count
    assert noise.rank_above(np.array([5.0, 2.5, 1.0]), 2.0, (16, 16), edge_factor=factor(1.2)) == 1  # 2.5 < 2.763
    assert noise.rank_above(np.array([5.0, 2.5, 1.0]), 2.0, (16, 16), edge_factor=factor(1.0)) == 2
    assert calls == [1.2, 1.0]
    assert noise.rank_above(np.array([5.0, 2.5, 1.0]), 2.0, (16, 16), edge_factor=1.0) == 2  # the default
    for bad in (0.9, noise.FACTOR_CAP + 0.1):
        with pytest.raises(ConfigError, match="edge_factor"):
            noise.rank_above(np.array([5.0, 2.5]), 2.0, (16, 16), edge_factor=bad)
