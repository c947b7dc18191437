"""auto's choice of floor where the residual is below float32's resolution of ‖ΔW‖²: a bf16 base fine-tuned from its
stored values and saved in fp32, with a large update (‖ΔW‖/‖W‖ 0.1, 0.5). ‖ΔW‖² − Σσᵢ² from float32 values was
round-off 1000× the fp32 rounding and picked "counted", a floor 65,600× too high; the residual now comes from the
matrix in float64. Reference: the float64 std of ΔW_stored − δ for the planted δ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spectra.analysis import AnalysisConfig, analyze
from spectra.linalg import metrics, noise
from tests.models import flat_update

Q = "model.layers.0.self_attn.q_proj"
RANK = 6


def _pair(tmp_path, scenario: str, rel: float):
    """256×512 W (float64 master), base stored in bf16; δ of rank 6 with ‖δ‖ = rel·‖W‖; the fine-tune starts from
    the stored base (A) or the master (B) and is stored in fp32."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.02
    update = flat_update((256, 512), RANK, seed=1, scale=1.0)
    delta = update * rel * float(w.norm()) / float(update.norm())
    base = w.to(torch.bfloat16)
    tuned = ((base.double() if scenario == "A" else w) + delta).to(torch.float32)
    for side, weight in (("b", base), ("t", tuned)):
        (tmp_path / side).mkdir()
        save_file({Q + ".weight": weight.contiguous()}, tmp_path / side / "model.safetensors")
    return tmp_path / "b", tmp_path / "t", float((tuned.double() - base.double() - delta).std())


def _noise(b, t, **config):
    (row,) = analyze(b, t, AnalysisConfig(**config), cache_dir=False, progress=False).modules
    return row["noise"]


@pytest.mark.parametrize("rel", [0.1, 0.5])
def test_auto_resolves_the_fine_tunes_rounding_under_a_large_update(tmp_path, rel):
    b, t, true = _pair(tmp_path, "A", rel)
    row = _noise(b, t)
    assert row["base_rounding"] == "exact" and row["rank_above"] == RANK
    assert row["sigma"] == pytest.approx(true, rel=0.05)
    assert row["sigma_residual"] == pytest.approx(true, rel=0.1)
    wide = _noise(b, t, dtype="float64")  # float64 values resolved it before: unchanged
    assert wide["base_rounding"] == "exact" and wide["sigma"] == pytest.approx(row["sigma"], rel=1e-6)
    assert wide["sigma_residual"] == pytest.approx(true, rel=0.1)


def test_a_master_rounded_base_still_counts_under_a_large_update(tmp_path):
    """Negative control: B holds the base's bf16 rounding (σ_b ≫ σ_t); auto keeps counting it."""
    b, t, true = _pair(tmp_path, "B", 0.5)
    row = _noise(b, t)
    assert row["base_rounding"] == "counted" and row["rank_above"] == RANK
    assert row["sigma"] == pytest.approx(true, rel=0.05) and row["sigma_residual"] == pytest.approx(true, rel=0.05)


def test_residual_energy_matches_float64_numpy_and_the_values_alone_are_not_trusted():
    torch.manual_seed(0)
    signal = flat_update((96, 160), 3, seed=2, scale=1.0)
    delta = (signal + 1e-9 * torch.randn(96, 160, dtype=torch.float64)).float()
    s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    reference = float(np.sum(s[3:] ** 2))  # float64 LAPACK on the same float32 matrix
    assert noise.residual_energy(delta, 3) == pytest.approx(reference, rel=1e-6)
    assert noise.residual_energy(delta, 0) == pytest.approx(float(np.sum(s ** 2)), rel=1e-12)
    # settle_floor on float32 values: the residual (~1e-14 of ‖ΔW‖²) is unresolved; without ΔW: counted, no σ̂
    values = torch.linalg.svdvals(delta)
    fro2 = float((delta.double() ** 2).sum())
    var_t, var_b = 1e-18, 1e-10  # an fp32 fine-tune's rounding, a bf16 base's
    both = metrics.NoiseFloor(var_t + var_b, (var_t + var_b) ** 0.5, 0.0, (var_t + var_b) ** 0.5 * (96 ** 0.5 + 160 ** 0.5),
                              None, "bfloat16", "float32", tuned_variance=var_t)
    exact = metrics.NoiseFloor(var_t, var_t ** 0.5, 0.0, var_t ** 0.5 * (96 ** 0.5 + 160 ** 0.5), None, "bfloat16",
                               "float32", base_rounding="exact", tuned_variance=var_t)
    blind = noise.settle_floor("auto", both, exact, values, (96, 160), total_energy=fro2)
    assert blind.base_rounding == "counted" and blind.sigma_residual is None
    seen = noise.settle_floor("auto", both, exact, values, (96, 160), total_energy=fro2, delta=delta)
    assert seen.base_rounding == "exact"
    assert seen.sigma_residual ** 2 == pytest.approx(reference / (93 * 157), rel=1e-6)


@pytest.mark.parametrize("scenario, expected", [("A", "exact"), ("B", "counted")])
def test_the_library_floor_decides_as_the_analysis_does(tmp_path, scenario, expected):
    """metrics.rounding_noise_floor(base_rounding="auto") takes the analysis's decision (noise.settle_floor, which
    falls back to ΔW in float64 where the values cannot resolve the residual): given float32 values of ΔW, A is the
    fine-tune's rounding alone and B (the base's rounding really in ΔW) counts the base, σ within 5 % of the truth."""
    from safetensors.torch import load_file

    b, t, true = _pair(tmp_path, scenario, 0.5)
    base, tuned = load_file(b / "model.safetensors")[Q + ".weight"], load_file(t / "model.safetensors")[Q + ".weight"]
    s = torch.linalg.svdvals(tuned.float() - base.float())  # float32 values: too coarse for the residual here
    floor = metrics.rounding_noise_floor(base, tuned, s=s, base_rounding="auto")
    # (no rank: under A the fp32 floor lies below float32 svdvals' own round-off, which the analysis cuts at its
    # numerical tolerance and this function, given bare values, does not)
    assert floor.base_rounding == expected
    assert floor.sigma == pytest.approx(true, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_energy_over_several_row_chunks_matches_float64_numpy(dtype):
    """3000×700: chunks of 1497, 1497 and 6 rows through the reused float64 buffer; the subspace steps but the last
    run in ΔW's dtype. A planted rank-5 signal over a 1e-8 floor, residual ~1e-10 of ‖ΔW‖²: without the last step in
    float64 the float32 iterate's round-off left 1.1e-3 of it too much (measured); with it, 6e-14."""
    signal = flat_update((3000, 700), 5, seed=3, scale=1.0)
    delta = (signal + 1e-8 * torch.randn(3000, 700, generator=torch.Generator().manual_seed(4),
                                         dtype=torch.float64)).to(dtype)
    s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    assert noise.residual_energy(delta, 5) == pytest.approx(float(np.sum(s[5:] ** 2)), rel=1e-6)
    assert noise.residual_energy(delta, 0) == pytest.approx(float(np.sum(s ** 2)), rel=1e-12)
    # negative control: a Q_k one direction short leaves the fifth value's energy in the residual
    assert noise.residual_energy(delta, 4) == pytest.approx(float(np.sum(s[4:] ** 2)), rel=1e-6)
    assert noise.residual_energy(delta, 4) > 1e6 * noise.residual_energy(delta, 5)


@pytest.mark.parametrize("shape", [(3000, 700), (700, 3000), (900, 900)])
def test_residual_energy_from_the_sketch_basis_matches_float64_numpy(shape, monkeypatch):
    """The energy sketch's basis (on ΔW's shorter side: columns' for 3000×700, rows' for 700×3000) replaces the
    float32 iteration: the residual is numpy's float64 one, and settle_floor given the sketch's Spectrum decides
    and measures as from bare values. Negative control: where the signal stands only ~12× above the noise's top
    value (one float64 step then restores a missing direction by ~150×, from float32's ~1e-7), a basis with one
    signal direction taken out leaves that direction's energy (1) in the residual: the basis is what is used."""
    from spectra.linalg import sketch

    signal = flat_update(shape, 5, seed=3, scale=1.0)
    delta = (signal + 1e-8 * torch.randn(*shape, generator=torch.Generator().manual_seed(4),
                                         dtype=torch.float64)).float()
    u, s, vh = np.linalg.svd(delta.double().numpy(), full_matrices=False)
    reference = float(np.sum(s[5:] ** 2))
    fro2 = float((delta.double() ** 2).sum())
    spec = sketch.energy_sketch(delta, energy=0.9, total_energy=fro2, sketch_dtype=torch.float32)
    short = min(shape)
    assert spec.basis is not None and spec.basis.shape[0] == short
    assert noise.residual_energy(delta, 5, basis=spec.basis) == pytest.approx(reference, rel=1e-6)

    noisy = (signal + 1e-3 * torch.randn(*shape, generator=torch.Generator().manual_seed(5),
                                         dtype=torch.float64)).float()
    u, s, vh = np.linalg.svd(noisy.double().numpy(), full_matrices=False)
    loud = sketch.energy_sketch(noisy, energy=0.5, total_energy=float((noisy.double() ** 2).sum()),
                                sketch_dtype=torch.float32)  # (0.9 lies in the noise, past the sketch's reach)
    assert loud.basis is not None
    assert noise.residual_energy(noisy, 5, basis=loud.basis) == pytest.approx(float(np.sum(s[5:] ** 2)), rel=1e-6)
    top = torch.from_numpy(u[:, 0] if shape[0] <= shape[1] else vh[0]).float()[:, None]  # on the basis's side
    without = loud.basis
    for _ in range(2):  # twice: once leaves ~5e-4 of it in float32, which the steps below would amplify ~5000×
        without = torch.linalg.qr(without - top @ (top.T @ without)).Q
    assert noise.residual_energy(noisy, 5, basis=without) > float(np.sum(s[5:] ** 2)) + 0.9 * s[0] ** 2
    noisy_view = noisy.T.contiguous().T  # read from its stored layout, the basis still on ΔW's side (900×900 too)
    assert noise.residual_energy(noisy_view, 5, basis=loud.basis) == pytest.approx(float(np.sum(s[5:] ** 2)), rel=1e-6)
    assert noise.residual_energy(noisy_view, 5, basis=without) > float(np.sum(s[5:] ** 2)) + 0.9 * s[0] ** 2
    view = delta.T.contiguous().T  # Conv1D's layout: ΔW a transposed view of its stored (in, out) tensor
    assert noise.residual_energy(view, 5, basis=spec.basis) == pytest.approx(reference, rel=1e-6)
    with pytest.raises(ValueError, match="shorter side(.|\n)*basis=None"):  # and what to pass instead
        noise.residual_energy(delta, 5, basis=torch.linalg.qr(torch.randn(sum(shape), 16)).Q)  # neither side

    var_t, var_b = 1e-18, 1e-10  # an fp32 fine-tune's rounding, a bf16 base's: the residual needs ΔW in float64
    edge = lambda v: v ** 0.5 * (shape[0] ** 0.5 + shape[1] ** 0.5)  # noqa: E731
    both = metrics.NoiseFloor(var_t + var_b, (var_t + var_b) ** 0.5, 0.0, edge(var_t + var_b), None, "bfloat16",
                              "float32", tuned_variance=var_t)
    exact = metrics.NoiseFloor(var_t, var_t ** 0.5, 0.0, edge(var_t), None, "bfloat16", "float32",
                               base_rounding="exact", tuned_variance=var_t)
    bare = noise.settle_floor("auto", both, exact, spec.values, shape, total_energy=fro2, delta=delta)
    given = []  # the basis settle_floor hands residual_energy
    real = noise.residual_energy
    monkeypatch.setattr(noise, "residual_energy", lambda *a, basis=None, **kw: given.append(basis) or real(
        *a, basis=basis, **kw))
    seeded = noise.settle_floor("auto", both, exact, spec, shape, total_energy=fro2, delta=delta)
    assert len(given) == 1 and given[0] is spec.basis
    assert seeded.base_rounding == bare.base_rounding == "exact"
    assert seeded.sigma_residual == pytest.approx(bare.sigma_residual, rel=1e-6)
    assert seeded.sigma_residual ** 2 == pytest.approx(reference / ((shape[0] - 5) * (shape[1] - 5)), rel=1e-6)


@pytest.mark.parametrize("shape", [(768, 3072), (3072, 768)])
def test_residual_energy_outside_most_of_the_space_is_the_float64_tail(shape):
    """A float32 pair's ΔW: every value above the numerical tolerance, k = min(m, n) − 40. A subspace iteration of
    that width inside the noise bulk left 5.9–6.4 % too much residual (measured before the float64 tail was taken
    here); the residual is now numpy's float64 tail to 1e-9."""
    g = torch.Generator().manual_seed(0)
    delta = (torch.randn(shape[0], 16, generator=g) @ torch.randn(16, shape[1], generator=g)) * 1e-4
    delta += torch.randn(*shape, generator=g) * 1e-6
    s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    k = min(shape) - 40
    assert noise.residual_energy(delta, k) == pytest.approx(float(np.sum(s[k:] ** 2)), rel=1e-9)
    assert noise.residual_energy(delta, min(shape)) == 0.0
