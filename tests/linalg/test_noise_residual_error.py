"""noise.residual_error: when auto's floor may take ΔW's residual from its singular values instead of a float64 pass.

‖ΔW‖_F² − Σ_{i≤k} σ̂ᵢ² is trusted where its estimated error (the total's, the values' round-off at the probabilistic
σ₁·√max(m, n)·eps32 each, and twice the energy sketch's estimated energy shortfall) stays under a tenth of the
threshold's energy. Reference: numpy's float64 SVD of the same float32 ΔW. Negative controls: numpy's worst-case
tolerance σ₁·max(m, n)·eps, which decided before, would have run the float64 pass here; the largest value error
(the Spectrum's ``tolerance``) in place of the energy-weighted one overstates the shortfall; and a residual of ~1e-14
of ‖ΔW‖² (an fp32 fine-tune's rounding under a large update) still goes to the float64 pass
(tests/test_analysis_noise_mixed.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectra.linalg import metrics, noise, sketch
from tests.models import flat_update

EPS32 = float(torch.finfo(torch.float32).eps)


def _floors(shape, var_t: float, var_b: float):
    edge = lambda v: math.sqrt(v) * (math.sqrt(shape[0]) + math.sqrt(shape[1]))  # noqa: E731
    both = metrics.NoiseFloor(var_t + var_b, math.sqrt(var_t + var_b), 0.0, edge(var_t + var_b), None, "bfloat16",
                              "bfloat16", tuned_variance=var_t)
    exact = metrics.NoiseFloor(var_t, math.sqrt(var_t), 0.0, edge(var_t), None, "bfloat16", "bfloat16",
                               base_rounding="exact", tuned_variance=var_t)
    return both, exact


@pytest.mark.parametrize("shape", [(4000, 500), (500, 4000)])
@pytest.mark.parametrize("nu", [2e-4, 4e-4])
def test_the_values_residual_is_trusted_where_its_estimated_error_resolves_the_threshold(shape, nu, monkeypatch):
    """Rank 8 over a noise bulk of 0.1–0.5 % of the energy, noise std ν on both sides' hypotheses: the residual
    from the sketch's values is within residual_error of numpy's float64 tail, settle_floor takes it without
    the float64 pass, and decides as that tail does."""
    signal = flat_update(shape, 8, seed=3, scale=1.0) * math.sqrt(8)  # 8 values of ~2.8
    delta = (signal + nu * torch.randn(*shape, generator=torch.Generator().manual_seed(7),
                                       dtype=torch.float64)).float()
    s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    fro2 = sketch.squared_norm(delta)  # as analyze sums it
    spec = sketch.energy_sketch(delta, energy=0.9, total_energy=fro2)
    both, exact = _floors(shape, nu ** 2 / 2, nu ** 2 / 2)  # σ̂² = ν²: the two-sided hypothesis
    edge = max(both.mp_edge, 0.0)
    values = spec.values.double().numpy()
    top = values[values > edge]
    k, (m, n) = top.size, shape
    assert k == 8
    error = noise.residual_error(top, float(values[0]), shape, total_energy=fro2, tolerance=spec.tolerance,
                                 energy_error=spec.energy_error)
    reference = float(np.sum(s[k:] ** 2))
    from_values = fro2 - float(np.sum(top ** 2))
    assert abs(from_values - reference) <= error  # measured 0.1 of it
    threshold = math.sqrt(exact.variance * both.variance)
    limit = 0.1 * threshold * (m - k) * (n - k)
    assert error < limit / 3
    worst = 2.0 * float(values[0]) * max(m, n) * EPS32 * float(top.sum())  # numpy matrix_rank's tolerance
    assert worst > limit  # negative control: what decided before would have run the float64 pass
    widest = (2 * spec.tolerance + spec.tolerance ** 2) * float(np.sum(top ** 2))
    assert spec.energy_error < widest  # and the largest value error in place of the energy's overstates it

    called = []
    monkeypatch.setattr(noise, "residual_energy", lambda *a, **kw: called.append(a) or 0.0)
    floor = noise.settle_floor("auto", both, exact, spec, shape, total_energy=fro2, delta=delta)
    assert not called
    assert abs(floor.sigma_residual ** 2 * (m - k) * (n - k) - reference) <= error
    counted = metrics.counts_base_rounding(reference / ((m - k) * (n - k)), tuned_variance=exact.variance,
                                           base_variance=both.variance - exact.variance)
    assert floor.base_rounding == ("counted" if counted else "exact")


def test_a_residual_below_the_totals_resolution_goes_to_the_float64_pass():
    """Negative control at the other end: a residual of ~1e-14 of ‖ΔW‖² is under the total's own error alone."""
    delta = (flat_update((96, 160), 3, seed=2, scale=1.0)
             + 1e-9 * torch.randn(96, 160, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).float()
    values = torch.linalg.svdvals(delta).double().numpy()
    fro2 = float((delta.double() ** 2).sum())
    error = noise.residual_error(values[:3], float(values[0]), (96, 160), total_energy=fro2)
    assert error >= noise.TOTAL_ENERGY_ERROR * fro2
    assert error > 1e6 * float(np.sum(np.linalg.svd(delta.double().numpy(), compute_uv=False)[3:] ** 2))


def test_each_part_of_the_estimate():
    top = np.array([2.0, 1.0])
    eps = EPS32
    assert noise.residual_error(top, 2.0, (400, 100), total_energy=10.0) == pytest.approx(
        2e-6 * 10.0 + 2 * 2.0 * 20.0 * eps * 3.0)
    assert noise.residual_error(top, 2.0, (400, 100), total_energy=10.0, tolerance=0.01) == pytest.approx(
        2e-6 * 10.0 + 2 * 2.0 * 20.0 * eps * 3.0 + (0.02 + 1e-4) * 5.0)
    # an estimated energy shortfall replaces the tolerance's bound, counted twice
    assert noise.residual_error(top, 2.0, (400, 100), total_energy=10.0, tolerance=0.01, energy_error=1e-5) == (
        pytest.approx(2e-6 * 10.0 + 2 * 2.0 * 20.0 * eps * 3.0 + 2e-5))
