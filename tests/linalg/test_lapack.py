"""In-place symmetric eigenvalues (torch's own LAPACK via ctypes) against torch.linalg.eigvalsh."""

from __future__ import annotations

import pytest
import torch

from spectra.linalg import lapack

needs_lapack = pytest.mark.skipif(lapack._dsyevd() is None, reason="this torch build exports no LAPACK symbols")


def symmetric(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n + 3, generator=g, dtype=torch.float64)
    return X @ X.T - 0.5 * n * torch.eye(n, dtype=torch.float64)  # indefinite: negative eigenvalues too


@needs_lapack
@pytest.mark.parametrize("n", [1, 2, 17, 300])
@pytest.mark.parametrize("lower", [True, False])
def test_matches_torch_eigvalsh_reading_one_triangle(n, lower):
    S = symmetric(n, seed=n)
    G = S.clone()
    garbage = torch.triu(torch.full_like(G, 1e6), 1) if lower else torch.tril(torch.full_like(G, 1e6), -1)
    G += garbage  # the other triangle must not be read
    expected = torch.linalg.eigvalsh(S)
    got = lapack.eigvalsh_(G, lower=lower)
    assert got is not None and got.dtype == torch.float64 and got.shape == (n,)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))
    if n > 2:
        assert not torch.equal(G, S + garbage), "G should have been used as LAPACK's workspace (in place)"


def test_declines_what_it_cannot_do_in_place_and_leaves_it_untouched():
    S = symmetric(8, seed=0)
    for G in (S.float(), S.T.contiguous()[:, :7], S.as_strided((8, 8), (1, 8)), torch.empty(0, 0, dtype=torch.float64)):
        before = G.clone()
        if G.is_contiguous() and G.dtype == torch.float64 and G.dim() == 2 and G.shape[0] == G.shape[1] and G.numel():
            continue
        assert lapack.eigvalsh_(G) is None
        assert torch.equal(G, before)


@needs_lapack
def test_full_spectrum_gram_route_uses_it(monkeypatch):
    """_gram_svdvals gives the same values through the in-place route and torch's copying one."""
    from spectra.linalg import svd

    g = torch.Generator().manual_seed(3)
    M = torch.randn(120, 200, generator=g)
    in_place = svd._gram_svdvals(M)
    declined = []
    monkeypatch.setattr(lapack, "eigvalsh_", lambda G, lower=True: declined.append(lower))  # returns None
    copying = svd._gram_svdvals(M)
    assert declined == [False]  # the copying route was taken, asked for the upper triangle
    torch.testing.assert_close(in_place, copying, rtol=1e-12, atol=1e-12 * float(copying[0]))


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("lower", [True, False])
def test_gram_singular_values_are_the_svd_values(monkeypatch, in_place, lower):
    """σ(M) from G = M Mᵀ, in place or through torch's eigvalsh, against float64 LAPACK's SVD of M."""
    import numpy as np

    if not in_place:
        monkeypatch.setattr(lapack, "eigvalsh_", lambda G, lower=True: None)
    g = torch.Generator().manual_seed(2)
    u = torch.linalg.qr(torch.randn(60, 40, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(90, 40, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -3, 40, dtype=torch.float64)
    M = (u * s) @ v.T  # (60, 90), rank 40, σ from 1 to 1e-3, then exact zeros
    G = M @ M.T
    G = torch.tril(G) if lower else torch.triu(G)  # only the named triangle may be read
    values = lapack.gram_singular_values(G, lower=lower)
    reference = np.linalg.svd(M.numpy(), compute_uv=False)
    assert values.shape == (60,) and bool((values[:-1] >= values[1:]).all())  # descending
    np.testing.assert_allclose(values[:40].numpy(), reference[:40], rtol=1e-8)  # ~eps·(σ₁/σᵢ)² at σᵢ ≥ 1e-3
    assert float(values[40:].max()) < 1e-6  # the null space: rounding-level, clipped at 0, never NaN
