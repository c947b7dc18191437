"""The activation-weighted spectrum's energy is E‖ΔW x‖² over the calibration tokens, ridge or no ridge.

The reference is float64 numpy on the tokens themselves: Y = ΔW X (out, N), whose mean squared
column norm is E‖ΔW x‖² and whose singular values / √N are those of ΔW·C^{1/2}. The ridge
ε·(tr C / in)·I of C_ε only serves the inverse root of the data-optimal truncation; in the
spectrum it gave an update outside the data's span an energy of its own.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from spectra.calibration import CalibrationConfig, activation_row, collect_calibration, whitening
from tests.models import build_model, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
THRESHOLDS = (0.5, 0.9, 0.99)


def reference_ranks(values: np.ndarray, thresholds=THRESHOLDS) -> dict[str, int]:
    """Smallest k with Σ_{i≤k} σᵢ² ≥ τ·Σσᵢ² (0 for a zero spectrum), by float64 cumsum."""
    energy = values.astype(np.float64) ** 2
    if energy.sum() == 0:
        return {f"{t:g}": 0 for t in thresholds}
    cum = np.cumsum(energy) / energy.sum()
    return {f"{t:g}": int(np.argmax(cum >= t * (1 - 1e-12))) + 1 for t in thresholds}


def data_in_a_subspace(seed: int = 7, n_in: int = 24, seen: int = 10, tokens: int = 400):
    """Inputs X (in, N) spanning `seen` of `in` dimensions: (rng, X, C = X Xᵀ/N, basis B of the span, projector off it)."""
    rng = np.random.default_rng(seed)
    B = np.linalg.qr(rng.standard_normal((n_in, seen)))[0]  # (in, seen)
    X = B @ (rng.standard_normal((seen, tokens)) * np.linspace(3, 0.5, seen)[:, None])  # (in, N)
    return rng, X, X @ X.T / tokens, B, np.eye(n_in) - B @ B.T


def unseen_update(rng, B, P):
    return rng.standard_normal((16, 24)) @ P  # every row outside the data's span


def small_seen_large_unseen(rng, B, P):
    seen = (rng.standard_normal((16, 2)) @ rng.standard_normal((2, B.shape[1]))) @ B.T * 1e-3  # rank 2 on the data
    return seen + (rng.standard_normal((16, 6)) @ rng.standard_normal((6, 24))) @ P * 10  # rank 6, invisible to it


@pytest.mark.parametrize("make", [unseen_update, small_seen_large_unseen])
def test_energy_is_the_mean_squared_output_change_on_the_tokens(make):
    rng, X, C, B, P = data_in_a_subspace()
    D = make(rng, B, P)  # (out, in) float64
    Y = D @ X  # (out, N): the output change on every calibration token
    rms = math.sqrt(np.mean(np.sum(Y ** 2, axis=0)))
    values = np.linalg.svd(Y / math.sqrt(X.shape[1]), compute_uv=False)
    scale = np.linalg.norm(D) * math.sqrt(np.linalg.eigvalsh(C).max())  # what float64 rounding is relative to
    row = activation_row(torch.from_numpy(D), torch.from_numpy(C), tokens=X.shape[1], epsilon=1e-6,
                         thresholds=THRESHOLDS)
    if make is unseen_update:
        assert rms < 1e-13 * scale  # the reference is rounding
        assert row["rms_output_change"] < 1e-13 * scale
        assert row["energy_rank"] == {"0.5": 0, "0.9": 0, "0.99": 0}
    else:
        assert row["rms_output_change"] == pytest.approx(rms, rel=1e-9)
        assert row["energy_rank"] == reference_ranks(values) == {"0.5": 1, "0.9": 2, "0.99": 2}
        np.testing.assert_allclose(row["singular_values"][:2], values[:2], rtol=1e-9)
        assert max(row["singular_values"][2:]) < 1e-12 * values[0]
    # negative control: the ridge's root, as the spectrum used to be taken, gives the unseen part energy
    root, _, input_rank = whitening(torch.from_numpy(C), epsilon=1e-6)
    assert input_rank == 10
    ridged = math.sqrt(float(np.sum((D @ root.numpy()) ** 2)))
    assert ridged > 1e-4 * scale and ridged > 5 * rms  # ≈ √(ε·tr C / in)·‖ΔW‖_F for the unseen part


def random_lines(path, *, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            length = int(torch.randint(3, 20, (1,), generator=g))
            fh.write(json.dumps({"text": bytes(torch.randint(97, 123, (length,), generator=g).tolist()).decode()})
                     + "\n")
    return path


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ordinary_model_inputs_give_the_ridged_spectrum_to_1e6(family, tmp_path):
    """On a real model's inputs (LayerNorm/RMSNorm outputs, padded batches) dropping the ridge moves nothing that
    matters: singular values, rms and energy ranks as ΔW·C_ε^{1/2} gave them, to 1e-6; rms = √tr(ΔW C ΔWᵀ)."""
    import scipy.linalg

    base = save(build_model(family), tmp_path / "base", "safetensors")
    calibration = collect_calibration(base, random_lines(tmp_path / "calib.jsonl", n=24, seed=5),
                                      config=CalibrationConfig(batch_size=8))
    g = torch.Generator().manual_seed(0)
    checked = 0
    for name in sorted(calibration.groups):
        C = calibration.covariance(name).numpy()  # (in, in) float64
        D = (0.05 * torch.randn(16, C.shape[0], generator=g, dtype=torch.float64)).numpy()
        Ce = C + 1e-6 * np.trace(C) / C.shape[0] * np.eye(C.shape[0])
        ridged = np.linalg.svd(D @ scipy.linalg.sqrtm(Ce).real, compute_uv=False)
        row = activation_row(torch.from_numpy(D), torch.from_numpy(C), tokens=calibration.tokens(name),
                             epsilon=1e-6, thresholds=THRESHOLDS)
        got = np.array(row["singular_values"])
        # Weyl: D C_ε Dᵀ = D C Dᵀ + ridge·D Dᵀ moves each σ² by at most ridge·‖D‖₂² (small σ move most in σ)
        ridge = 1e-6 * np.trace(C) / C.shape[0]
        assert np.max(np.abs(got ** 2 - ridged ** 2)) <= ridge * np.linalg.norm(D, 2) ** 2 * (1 + 1e-6), name
        big = ridged >= 0.1 * ridged[0]
        assert np.max(np.abs(got - ridged)[big]) < 1e-6 * ridged[0], name
        assert row["rms_output_change"] == pytest.approx(math.sqrt(np.sum(ridged ** 2)), rel=1e-6)
        assert row["rms_output_change"] == pytest.approx(math.sqrt(np.trace(D @ C @ D.T)), rel=1e-10)
        assert row["energy_rank"] == reference_ranks(ridged), name
        checked += 1
    assert checked >= 8
