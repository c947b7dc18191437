"""covariance_root(C) is C's own PSD square root, without the ridge: ‖M·C^{1/2}‖_F = ‖M X‖_F / √N.

The reference is float64 numpy on the tokens themselves (X (in, N), C = X Xᵀ / N) and scipy's sqrtm on a
full-rank C. The negative control is whitening's root, C_ε^{1/2}, which adds the ridge ε·(tr C / in)·I and so
gives an update the inputs never see a norm of its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from spectra.calibration import covariance_root, whitening
from spectra.errors import ConfigError


def _tokens(d_in: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((d_in, n))  # (in, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_root_gives_the_rms_output_change_on_the_tokens(dtype):
    X = _tokens(8, 3)  # (8, 3): C of rank 3, five directions the inputs never visit
    C = X @ X.T / X.shape[1]
    M = np.random.default_rng(1).standard_normal((5, 8))  # (out, in)
    root = covariance_root(torch.tensor(C, dtype=dtype))
    assert root.dtype == torch.float64 and root.shape == (8, 8)
    R = root.numpy()
    np.testing.assert_allclose(R, R.T, atol=1e-12)
    tol = 1e-12 if dtype == torch.float64 else 1e-6  # C itself rounded to float32
    np.testing.assert_allclose(R @ R, C, atol=tol * np.abs(C).max())
    reference = np.linalg.norm(M @ X) / np.sqrt(X.shape[1])  # ‖M X‖_F / √N
    np.testing.assert_allclose(np.linalg.norm(M @ R), reference, rtol=tol)
    # an update the inputs never see (rows in C's null space) has no norm: no ridge adds one
    null = scipy.linalg.null_space(X.T).T  # (5, 8), orthogonal to every token
    # (float32's rounding of C leaves those directions eigenvalues ~1e-7·λ_max, roots ~3e-4·‖C^{1/2}‖)
    assert np.linalg.norm(null @ R) < (1e-6 if dtype == torch.float64 else 1e-3) * np.linalg.norm(R)

    # negative control: the ridged root of whitening does give it one, ε·(tr C / in) per direction
    ridged, _, _ = whitening(torch.tensor(C, dtype=dtype), epsilon=1e-2)
    ridge = 1e-2 * np.trace(C) / C.shape[0]
    np.testing.assert_allclose(np.linalg.norm(null @ ridged.numpy()), np.sqrt(5 * ridge), rtol=1e-3 if dtype == torch.float32 else 1e-8)


def test_root_matches_scipy_sqrtm_on_a_full_rank_covariance():
    X = _tokens(6, 40, seed=2)
    C = X @ X.T / X.shape[1]  # full rank
    np.testing.assert_allclose(covariance_root(torch.tensor(C)).numpy(), scipy.linalg.sqrtm(C).real, atol=1e-10)


def test_a_covariance_that_is_not_square_is_refused():
    with pytest.raises(ConfigError, match=r"square \(in, in\).*\(3, 4\)"):
        covariance_root(torch.zeros(3, 4))
