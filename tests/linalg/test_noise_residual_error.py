"""noise.residual_error: when auto's floor may take ΔW's residual from its singular values instead of a float64 pass.

‖ΔW‖_F² − Σ_{i≤k} σ̂ᵢ² is trusted where its estimated error (the total's, the values' round-off at the probabilistic
σ₁·√max(m, n)·eps32 each, and twice the energy sketch's estimated energy shortfall) stays under a tenth of the
threshold's energy. Reference: numpy's float64 SVD of the same float32 ΔW. Negative controls: numpy's worst-case
tolerance σ₁·max(m, n)·eps, which decided before, would have run the float64 pass here; the largest value error
(the Spectrum's ``tolerance``) in place of the energy-weighted one overstates the shortfall; and a residual of ~1e-14
of ‖ΔW‖² (an fp32 fine-tune's rounding under a large update) still goes to the float64 pass
(tests/test_analysis_noise_mixed.py)."""

from __future__ import annotations

import dataclasses
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


@pytest.mark.parametrize("shape", [(16, 32), (256, 256), (64, 4096), (4096, 64)])
def test_highest_threshold_is_gavish_donohos_or_the_tracy_widom_edge(shape):
    both, _ = _floors(shape, 1e-10, 1e-10)
    gd = metrics.gavish_donoho(torch.ones(3), shape, sigma=both.sigma).threshold
    high = noise.highest_threshold(both, shape)
    assert high == pytest.approx(max(noise.tracy_widom_edge(both.mp_edge, shape), gd), rel=1e-12)
    assert both.mp_edge < high <= 1.5 * both.mp_edge


def test_floors_under_the_values_round_off_are_not_weighed(monkeypatch):
    """An fp32 pair: both hypotheses' thresholds lie far below the values' numerical tolerance, so no count can
    differ between them; auto keeps the larger floor with no σ̂ and no float64 pass (on an fp32 copy of the
    llama-110m pair: 24 passes, 1.5 of 6.2 s at one thread, every count the same without them). Negative control:
    with the tolerance under those thresholds it measures σ̂ as before."""
    shape = (300, 500)
    delta = (flat_update(shape, 4, seed=1, scale=1.0)
             + 1e-10 * torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).float()
    values = torch.linalg.svdvals(delta.double())
    fro2 = float((delta.double() ** 2).sum())
    both, exact = _floors(shape, 1e-18, 1e-18)  # fp32 roundings of weights ~1e-2
    numerical = float(values[0]) * max(shape) * EPS32
    assert noise.highest_threshold(both, shape) < numerical
    called = []
    real = noise.residual_energy
    monkeypatch.setattr(noise, "residual_energy", lambda *a, **kw: called.append(a) or real(*a, **kw))
    floor = noise.settle_floor("auto", both, exact, values, shape, total_energy=fro2, numerical=numerical,
                               delta=delta)
    assert floor == dataclasses.replace(both, base_rounding="counted") and floor.sigma_residual is None
    assert not called
    measured = noise.settle_floor("auto", both, exact, values, shape, total_energy=fro2, delta=delta)
    assert measured.sigma_residual is not None and called  # numerical 0: the residual is taken, from ΔW


def test_an_fp32_pair_analyses_to_the_same_counts_without_the_float64_residual(tmp_path, monkeypatch):
    """analyze on a float32 pair with rank-3 updates (ΔW's tail: float32 rounding, under the edge): no float64
    residual, and every count the same as when the hypotheses are weighed (highest_threshold made to clear the
    tolerance): the floor reported is the two-sided one, under the tolerance as the other, and σ̂ is left out."""
    import copy

    from spectra.analysis import AnalysisConfig, analyze
    from tests.models import add_to_parameter, build_model, save

    base = build_model("llama")
    tuned = copy.deepcopy(base)
    for i, name in enumerate(("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight")):
        shape = tuple(dict(tuned.named_parameters())[name].shape)
        add_to_parameter(tuned, name, flat_update(shape, 3, seed=i, scale=0.1))
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    called = []
    real = noise.residual_energy
    monkeypatch.setattr(noise, "residual_energy", lambda *a, **kw: called.append(a) or real(*a, **kw))

    def run():
        return {r["name"]: r for r in analyze(b, t, AnalysisConfig(), cache_dir=False, progress=False).modules
                if r.get("noise")}

    fast = run()
    assert not called
    monkeypatch.setattr(noise, "highest_threshold", lambda floor, shape: math.inf)
    weighed = run()
    assert called  # the negative control took the float64 residual
    assert fast.keys() == weighed.keys()
    planted = [n for n in fast if n.endswith(("layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"))]
    assert len(planted) == 2 and all(weighed[n]["noise"]["sigma_residual"] is not None for n in planted)
    for name, row in fast.items():
        if row["numerical_tolerance"]:  # (an unchanged module, ΔW = 0, has none: its σ̂ is 0 either way)
            assert row["noise"]["sigma_residual"] is None
        assert row["noise"]["rank_above"] == weighed[name]["noise"]["rank_above"], name
        if row["numerical_tolerance"]:  # the two-sided floor, at or above the one weighing picked; both under it
            assert row["noise"]["base_rounding"] == "counted" and row["noise"]["sigma"] >= weighed[name]["noise"]["sigma"]
            assert row["noise"]["mp_edge"] < row["numerical_tolerance"]
        for key in ("gd_rank", "energy_rank", "singular_values"):
            assert row[key] == weighed[name][key], (name, key)
    assert fast[planted[0]]["noise"]["rank_above"] == 3


@pytest.mark.parametrize("origin", ["stored base", "fp32 master"])
@pytest.mark.parametrize("rel", [1e-2, 0.1])
def test_auto_decides_on_a_bf16_pair_as_with_the_float64_residual(tmp_path, monkeypatch, origin, rel):
    """A one-module bf16 pair (1152×2048, past full_below: the energy sketch's values; a rank-32 update of 10⁻² or
    0.1 of ‖W‖), fine-tuned from the stored base or from its fp32 master: auto's choice from the values' residual
    is the one the float64 residual, forced, gives, and σ̂² is within 5 % of it (the README's sweep of 96 pairs,
    with a full-rank part in the update too: no choice changed, 2.2 % at most). Negative control: the two origins
    are told apart."""
    from safetensors.torch import save_file

    from spectra.analysis import AnalysisConfig, analyze

    name = "model.layers.0.self_attn.q_proj"
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1152, 2048, generator=g, dtype=torch.float64) * 0.02
    update = flat_update((1152, 2048), 32, seed=10, scale=1.0)
    base = w.to(torch.bfloat16)
    tuned = ((base.double() if origin == "stored base" else w) + update * rel * float(w.norm()) / float(update.norm()))
    for side, weight in (("b", base), ("t", tuned.to(torch.bfloat16))):
        (tmp_path / side).mkdir()
        save_file({name + ".weight": weight.contiguous()}, tmp_path / side / "model.safetensors")

    def run():
        (row,) = analyze(tmp_path / "b", tmp_path / "t", AnalysisConfig(), cache_dir=False, progress=False).modules
        assert row["method"] == "adaptive-bf16"
        return row["noise"]

    called = []
    real = noise.residual_energy
    monkeypatch.setattr(noise, "residual_energy", lambda *a, **kw: called.append(a) or real(*a, **kw))
    fast = run()
    assert not called
    monkeypatch.setattr(noise, "residual_error", lambda *a, **kw: math.inf)  # every residual from ΔW in float64
    forced = run()
    assert called
    assert fast["base_rounding"] == forced["base_rounding"] == ("exact" if origin == "stored base" else "counted")
    assert fast["sigma_residual"] ** 2 == pytest.approx(forced["sigma_residual"] ** 2, rel=0.05)
