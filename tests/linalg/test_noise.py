"""Whether the base's rounding is under ΔW: the residual test, the floor of each hypothesis, the forced options.

References are float64: the true rounding noise ΔW_stored − δ of a planted δ, and numpy's SVD.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from spectra.errors import ConfigError
from spectra.linalg import metrics, noise
from spectra.linalg.sketch import sampled_noise_floor
from spectra.linalg.svd import Spectrum

M, N, RANK = 256, 384, 6


def _planted(seed: int = 0, rel: float = 0.01, tail: float = 0.0):
    """Weights W (float64, off the bf16 grid) and a rank-6 update δ at ‖δ‖ = rel·‖W‖ (a few bf16 ulps per
    element), plus white noise of std `tail`·σ_t, σ_t the fine-tune's bf16 rounding std (`tail` > 0: full rank)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(M, N, generator=g, dtype=torch.float64) * 0.02
    U = torch.linalg.qr(torch.randn(M, RANK, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(N, RANK, generator=g, dtype=torch.float64))[0]
    d = (U * torch.linspace(3, 1, RANK, dtype=torch.float64)) @ V.T
    d = d * rel * W.norm() / d.norm()
    if tail:
        sigma_t = math.sqrt(float((metrics.ulp(W, torch.bfloat16) ** 2).mean()) / 12)
        d = d + tail * sigma_t * torch.randn(M, N, generator=g, dtype=torch.float64)
    return W, d


def _pair(scenario: str, W, d, dtype=torch.bfloat16):
    """(A) the fine-tune started from the base's stored values: base = round(W), tuned = round(base + δ).
    (B) both rounded from a finer master: base = round(W), tuned = round(W + δ)."""
    base = W.to(dtype)
    tuned = ((base.double() if scenario == "A" else W) + d).to(dtype)
    return base, tuned


def _true_std(base, tuned, d) -> float:
    return float((tuned.double() - base.double() - d).std())


@pytest.mark.parametrize("scenario, expected", [("A", "exact"), ("B", "counted")])
def test_auto_finds_which_roundings_are_in_the_delta(scenario, expected):
    """A: ΔW holds the fine-tune's rounding alone, B both. "auto" tells them apart from ΔW's residual, and its floor's
    σ is the true std of ΔW_stored − δ to 5 % (the two-sided floor sat √2 too high on A); the planted rank stands
    above it."""
    W, d = _planted()
    base, tuned = _pair(scenario, W, d)
    s = torch.linalg.svdvals(tuned.double() - base.double())
    floor = metrics.rounding_noise_floor(base, tuned, s=s, base_rounding="auto")
    true = _true_std(base, tuned, d)
    assert floor.base_rounding == expected
    assert floor.sigma == pytest.approx(true, rel=0.05)
    assert floor.rank == RANK
    assert floor.sigma_residual == pytest.approx(true, rel=0.05)  # the residual measures the noise itself
    counted = metrics.rounding_noise_floor(base, tuned, s=s)  # negative control for A: the old floor
    if scenario == "A":
        assert counted.sigma / true == pytest.approx(math.sqrt(2), rel=0.05)


def test_a_broad_full_rank_tail_above_the_rounding_keeps_the_base_counted():
    """Negative control: a fine-tune from the base's stored values whose update has a white, full-rank part at 1.5×
    the rounding's std (below the edge, so not signal to the floor). Its residual is above both hypotheses, and
    "auto" must not lower the floor on it: the base's rounding stays counted."""
    W, d = _planted(tail=1.5)
    base, tuned = _pair("A", W, d)
    s = torch.linalg.svdvals(tuned.double() - base.double())
    floor = metrics.rounding_noise_floor(base, tuned, s=s, base_rounding="auto")
    assert floor.base_rounding == "counted"
    assert floor.sigma_residual > floor.sigma  # the tail is in the residual


def test_signal_above_the_edge_in_every_direction_counts_the_base():
    """Every singular value above the two-sided edge: nothing is left to measure the noise by, and the floor
    stays the higher one (the residual is None)."""
    W, _ = _planted()
    g = torch.Generator().manual_seed(1)
    big = torch.randn(M, N, generator=g, dtype=torch.float64) * 0.02  # a full-rank update as large as W
    base, tuned = _pair("A", W, big)
    s = torch.linalg.svdvals(tuned.double() - base.double())
    floor = metrics.rounding_noise_floor(base, tuned, s=s, base_rounding="auto")
    assert floor.rank == min(M, N) and floor.base_rounding == "counted" and floor.sigma_residual is None


@pytest.mark.parametrize("scenario", ["A", "B"])
def test_forced_options_are_honoured(scenario):
    W, d = _planted()
    base, tuned = _pair(scenario, W, d)
    s = torch.linalg.svdvals(tuned.double() - base.double())
    exact = metrics.rounding_noise_floor(base, tuned, s=s, base_rounding="exact")
    counted = metrics.rounding_noise_floor(base, tuned, s=s, base_rounding="counted")
    ulp_t = float((metrics.ulp(tuned, torch.bfloat16) ** 2).mean()) / 12  # float64 references, per side
    ulp_b = float((metrics.ulp(base, torch.bfloat16) ** 2).mean()) / 12
    assert (exact.base_rounding, counted.base_rounding) == ("exact", "counted")
    assert exact.variance == pytest.approx(ulp_t, rel=1e-12) and exact.tuned_variance == exact.variance
    assert counted.variance == pytest.approx(ulp_t + ulp_b, rel=1e-12)
    assert exact.mp_edge == pytest.approx(math.sqrt(ulp_t) * (math.sqrt(M) + math.sqrt(N)), rel=1e-12)
    assert exact.sigma_residual is None and counted.sigma_residual is None  # nothing was decided from data


def test_float32_pair_floor_is_negligible_either_way():
    """float32 storage: every floor is ~1e-6 of the update's elements. "auto" still tells A from B; forcing "exact"
    on B (a wrong statement) puts its rounding above the floor, as the user asked (the analysis's numerical
    tolerance then keeps it out of the signal rank)."""
    W, d = _planted()
    element = float(d.std())
    for scenario, right in (("A", "exact"), ("B", "counted")):
        base, tuned = _pair(scenario, W, d, dtype=torch.float32)
        s = torch.linalg.svdvals(tuned.double() - base.double())
        floors = {c: metrics.rounding_noise_floor(base, tuned, s=s, base_rounding=c) for c in metrics.BASE_ROUNDING}
        assert all(f.sigma < 1e-5 * element for f in floors.values())
        assert floors["auto"].base_rounding == right and floors["auto"].rank == floors[right].rank == RANK
        assert floors["counted"].rank == RANK
    assert floors["exact"].rank > RANK  # B forced "exact": honoured


def test_residual_variance_matches_float64_numpy_on_whole_and_top_values():
    W, d = _planted(tail=1.0)
    D = (W + d).numpy() - W.numpy()
    s = np.linalg.svd(D, compute_uv=False)
    edge = float(s[RANK]) * 1.0001  # exactly RANK values above it
    k = int(np.sum(s > edge))
    expected = (float(np.sum(D * D)) - float(np.sum(s[:k] ** 2))) / ((M - k) * (N - k))
    whole = metrics.residual_variance(torch.from_numpy(s), (M, N), edge=edge)
    top = metrics.residual_variance(Spectrum(torch.from_numpy(s[:20]), float(np.sum(D * D)), False, "test", None),
                                    (M, N), edge=edge)
    assert k == RANK and whole == pytest.approx(expected, rel=1e-9) and top == pytest.approx(expected, rel=1e-9)
    assert metrics.residual_variance(torch.from_numpy(s), (M, N), edge=0.0) is None  # all above: unknown
    assert metrics.residual_variance(torch.zeros(5), (5, 7), edge=0.0) == 0.0  # the zero matrix


def test_the_rule_is_the_geometric_mean_of_the_two_hypotheses():
    t, b = 1.0, 3.0  # σ_t², σ_b²: threshold √(1·4) = 2
    assert metrics.counts_base_rounding(2.0, tuned_variance=t, base_variance=b)
    assert not metrics.counts_base_rounding(1.99, tuned_variance=t, base_variance=b)
    assert metrics.counts_base_rounding(None, tuned_variance=t, base_variance=b)


@pytest.mark.parametrize("scenario, expected", [("A", "exact"), ("B", "counted")])
def test_sampled_floor_settles_as_the_dense_reference(scenario, expected):
    """The analysis path (sampled floor, the fine-tune's own side, settle_floor) gives the dense reference's floor,
    from the whole spectrum and from its top 20 values with the exact ‖ΔW‖²."""
    W, d = _planted()
    base, tuned = _pair(scenario, W, d)
    delta = tuned.double() - base.double()
    s = torch.linalg.svdvals(delta)
    both = sampled_noise_floor(base, tuned, base_dtype=torch.bfloat16, tuned_dtype=torch.bfloat16)
    tuned_only = noise.tuned_side_floor(both, tuned, tuned_dtype=torch.bfloat16)
    reference = metrics.rounding_noise_floor(base, tuned, s=s, base_rounding="auto")
    fro2 = float((delta**2).sum())
    for values in (s, Spectrum(s[:20], fro2, False, "test", None)):
        floor = noise.settle_floor("auto", both, tuned_only, values, (M, N), total_energy=fro2)
        assert floor.base_rounding == expected == reference.base_rounding
        assert floor.sigma == pytest.approx(reference.sigma, rel=1e-9)
        assert floor.mp_edge == pytest.approx(reference.mp_edge, rel=1e-9)
        assert floor.sigma_residual == pytest.approx(reference.sigma_residual, rel=1e-6)
    kept = noise.settle_floor("auto", both, None, s, (M, N), total_energy=fro2, quantised=True)
    assert kept.base_rounding == "counted" and kept.sigma == both.sigma


def test_the_sampled_floor_keeps_the_fine_tunes_share_for_the_tuned_side_floor(monkeypatch):
    """sampled_noise_floor's tuned_variance is the fine-tune's ulp²/12 (against the dense ulp of metrics.ulp), and
    tuned_side_floor takes it instead of reading the tuned weight a second time."""
    W, d = _planted()
    base, tuned = _pair("A", W, d)
    both = sampled_noise_floor(base, tuned, base_dtype=torch.bfloat16, tuned_dtype=torch.bfloat16)
    u_t, u_b = metrics.ulp(tuned.float(), torch.bfloat16).double(), metrics.ulp(base.float(), torch.bfloat16).double()
    assert both.tuned_variance == pytest.approx(float((u_t**2).mean()) / 12, rel=1e-12)
    assert both.variance == pytest.approx(float((u_t**2).mean() + (u_b**2).mean()) / 12, rel=1e-12)
    fresh = noise.tuned_side_floor(replace(both, tuned_variance=None), tuned, tuned_dtype=torch.bfloat16)
    monkeypatch.setattr(noise, "mean_ulp_squared", lambda *a, **k: pytest.fail("sampled the tuned weight again"))
    reused = noise.tuned_side_floor(both, tuned, tuned_dtype=torch.bfloat16)
    assert reused == fresh


def test_bad_options_name_themselves():
    W, d = _planted()
    base, tuned = _pair("A", W, d)
    with pytest.raises(ConfigError, match="base_rounding"):
        metrics.rounding_noise_floor(base, tuned, base_rounding="maybe")
    with pytest.raises(ConfigError, match="pass `s`"):
        metrics.rounding_noise_floor(base, tuned, base_rounding="auto")
    both = sampled_noise_floor(base, tuned, base_dtype=torch.bfloat16, tuned_dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="base_rounding"):
        noise.settle_floor("sometimes", both, None, torch.ones(3), (M, N), total_energy=1.0)
    with pytest.raises(ConfigError, match="tuned_side_floor"):
        noise.settle_floor("exact", both, None, torch.ones(3), (M, N), total_energy=1.0)
