"""A few singular triplets of a large matrix, with their accuracy checked after the fact.

Subspace measures (φ, principal angles and amplification factors of Hu et al. 2021,
arXiv:2106.09685; intruder dimensions of Shuttleworth et al. 2024, arXiv:2410.21228)
read a handful of singular vectors of matrices whose full SVD with vectors takes seconds
to minutes (O(m·n·min(m, n)) in float64). Four tools replace it:

- :func:`lowrank_svd` — the exact SVD of a thin product s·L·Rᵀ (a LoRA update s·B·A)
  from two thin QRs and an r×r SVD: O((m + n)·r²).
- :func:`ritz_bounds` — residual norms of computed singular triplets and, by Wedin's
  sin θ theorem, bounds on the angle between each computed vector (or each top-j
  subspace) and the exact one.
- :func:`krylov_triplets` — Ritz triplets from a fixed number of block Lanczos steps
  (:class:`~spectra.linalg.krylov.BlockLanczos`), with no convergence tests on the way.
- :func:`top_svd` — the top-k triplets in float64: a full decomposition for matrices
  with min(m, n) ≤ :data:`EXACT_BELOW`, else a float64 block Krylov space checked by
  :func:`ritz_bounds` until every top-j subspace (j ≤ k) is certified to an angle of
  :data:`ANGLE_TOL`, and the full decomposition when it cannot be (σ_j ≈ σ_{j+1}: a
  subspace that rounding alone could turn).

The bounds assume, as every Krylov method does, that no singular value was missed
(the random start block is not orthogonal to its vectors; probability one in exact
arithmetic): then the true σ_j lies within the residual ρ_j of the computed σ̃_j.

References
----------
.. [1] P.-Å. Wedin, "Perturbation bounds in connection with singular value
   decomposition", BIT 12, 1972.
.. [2] G. W. Stewart, J.-G. Sun, "Matrix Perturbation Theory", Academic Press, 1990,
   §V.4 (residual bounds for singular subspaces).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spectra.errors import ConfigError
from spectra.linalg.krylov import BlockLanczos, krylov_block
from spectra.linalg.sketch import thin_product
from spectra.linalg.svd import Spectrum, frobenius_energy, full_svd

__all__ = ["EXACT_BELOW", "ANGLE_TOL", "RitzBounds", "lowrank_svd", "ritz_bounds", "krylov_triplets", "top_svd",
           "products64", "times64"]

# Short side at or below which subspace measures take full float64 decompositions. There a
# full SVD with vectors costs ≤ 0.2 s (512×1376, measured here), and the Krylov paths, kept to
# spaces of half the short side, have hardly room for the steps they need (verify's measures of
# a 512×1376 module: 0.94 s with full SVDs, 0.71 s with the adapter's from its factors and the
# rest full; 640×1728: 1.00 vs 0.95 s; 1024×2816: 6.7 vs 1.25 s, certified).
EXACT_BELOW = 512
# Largest sin θ between a certified top-j subspace and the exact one: φ entries then move by
# ≤ 2·ANGLE_TOL and principal angles by ≤ ANGLE_TOL rad (5.7e-5°, below the 1e-4° printed).
ANGLE_TOL = 1e-6
# When top_svd checks its Krylov space. Measured (k = 65, 2048² and 2048×5632): the worst top-j
# bound fell below 1e-6 by step 14 on power laws σᵢ = i^−0.5 … i^−1.2 and on a power law over
# a noise floor starting past j = 64, by step 10 on exponential decay; by step 18 all were at
# 1e-10 or below. A check costs about two steps (an SVD of the projection, 2 products with k + 1).
# With φ reaching into a noise bulk (planted rank 8 on Marchenko–Pastur noise, 2048×5632, k = 64),
# 51 of the 64 top-j bounds were still infinite (gap below the residual) at step 14, 22 at step
# 20: more than half infinite at the second check ends the run there.
_KRYLOV_CHECKS = (10, 14, 20)
_KRYLOV_MIN_STEPS = 8  # fewer fit only in short sides below 576: decompose fully


@dataclass(frozen=True)
class RitzBounds:
    """A-posteriori error bounds of k computed singular triplets (σ̃ᵢ, ũᵢ, ṽᵢ) of a matrix M.

    Attributes
    ----------
    residuals : torch.Tensor, shape (k,), float64
        ρᵢ = (‖M ṽᵢ − σ̃ᵢ ũᵢ‖² + ‖Mᵀ ũᵢ − σ̃ᵢ ṽᵢ‖²)^½; some singular value of M lies within
        ρᵢ of σ̃ᵢ.
    vector_sin : torch.Tensor, shape (k,), float64
        Bound on sin of the angle between ũᵢ (and ṽᵢ) and the exact i-th singular vector:
        ρᵢ / δᵢ, δᵢ a lower bound of the distance from σ̃ᵢ to every other singular value.
        ``inf`` where δᵢ is not positive or unknown (the last triplet: nothing bounds
        σ_{k+1} from above).
    subspace_sin : torch.Tensor, shape (k,), float64
        Bound on the largest principal angle's sine between the computed top-j left (and
        right) singular subspaces and the exact ones, j = 1 … k: (Σ_{i≤j} ρᵢ²)^½ / δ_j with
        δ_j = σ̃_j − (σ̃_{j+1} + ρ_{j+1}). ``inf`` where δ_j ≤ 0 and for j = k.
    """

    residuals: torch.Tensor
    vector_sin: torch.Tensor
    subspace_sin: torch.Tensor


def lowrank_svd(L: torch.Tensor, R: torch.Tensor, *, scale: float = 1.0) -> Spectrum:
    """Exact SVD of ``scale · L @ R.T`` without forming it, in float64.

    With thin QRs L = Q_L T_L and R = Q_R T_R, s·L Rᵀ = Q_L (s·T_L T_Rᵀ) Q_Rᵀ, so the SVD
    P Σ Wᵀ of the small core gives U = Q_L P and V = Q_R W: O((m + n)·r²) work, exact to
    float64 rounding (backward stable, like a full SVD of the formed product).

    Parameters
    ----------
    L : torch.Tensor, shape (m, r)
        Left factor (a LoRA ``B``, (out, r)).
    R : torch.Tensor, shape (n, r)
        Right factor (a LoRA ``A.T``, (in, r)).
    scale : float, default 1.0
        The LoRA scaling s = α/r (α/√r for rsLoRA).

    Returns
    -------
    Spectrum
        ``method="lowrank-qr"``, min(m, n, r) values and vectors (the rest of the spectrum
        is exactly zero), ``total_energy`` = ‖s·L Rᵀ‖_F² = Σσᵢ², ``complete`` when
        min(m, n, r) = min(m, n).
    """
    for name, t in (("L", L), ("R", R)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or min(t.shape) == 0 or not t.dtype.is_floating_point:
            raise ConfigError(f"`{name}` must be a non-empty floating 2-D tensor (dim, r).")
        if not bool(torch.isfinite(t).all()):
            raise ConfigError(f"`{name}` holds NaN or Inf values.")
    if L.shape[1] != R.shape[1]:
        raise ConfigError(f"`L` has {L.shape[1]} columns and `R` {R.shape[1]}: not factors of one product.")
    if not math.isfinite(scale):
        raise ConfigError(f"`scale` must be finite, got {scale!r}.")
    Ql, Tl = torch.linalg.qr(L.double())  # (m, p), (p, r), p = min(m, r)
    Qr, Tr = torch.linalg.qr(R.double())  # (n, q), (q, r)
    core = scale * (Tl @ Tr.T)  # (p, r) @ (r, q) -> (p, q)
    P, S, Wh = torch.linalg.svd(core, full_matrices=False)  # (p, s), (s,), (s, q)
    shape = (int(L.shape[0]), int(R.shape[0]))
    return Spectrum(S, float((S**2).sum()), shape, "lowrank-qr", U=Ql @ P, Vh=Wh @ Qr.T,
                    complete=S.numel() == min(shape))


def ritz_bounds(M: torch.Tensor, F: Spectrum) -> RitzBounds:
    """Residuals of the triplets in `F` against `M`, and the angle bounds they imply.

    Wedin's theorem in residual form [1]_ [2]_: for approximate triplets (Ũ_j, Σ̃_j, Ṽ_j),
    Ũ_j and Ṽ_j orthonormal, with residuals R = M Ṽ_j − Ũ_j Σ̃_j, S = Mᵀ Ũ_j − Ṽ_j Σ̃_j,
    if every σ̃ in Σ̃_j lies at least δ > 0 from every singular value of M outside the
    top j (and δ ≤ min Σ̃_j), then (‖sin Φ‖_F² + ‖sin Θ‖_F²)^½ ≤ (‖R‖_F² + ‖S‖_F²)^½ / δ,
    Φ and Θ the principal angles of the left and right subspaces. Some singular value lies
    within ρᵢ of each σ̃ᵢ; with no value missed it is σᵢ, so σ_{j+1} ≤ σ̃_{j+1} + ρ_{j+1} and
    σ_{i−1} ≥ σ̃_{i−1} − ρ_{i−1}: δ_j = σ̃_j − σ̃_{j+1} − ρ_{j+1} for the top-j subspace, and
    δᵢ = min(σ̃_{i−1} − ρ_{i−1} − σ̃ᵢ, σ̃ᵢ − σ̃_{i+1} − ρ_{i+1}) for the i-th vector alone.

    Parameters
    ----------
    M : torch.Tensor, shape (m, n)
    F : Spectrum
        k ≥ 1 triplets of `M` with vectors orthonormal to float64 precision (those of a
        float32 run: re-orthonormalise them first), values descending.

    Returns
    -------
    RitzBounds

    References
    ----------
    .. [1] Wedin 1972, BIT 12.
    .. [2] Stewart & Sun 1990, §V.4.
    """
    if F.U is None or F.Vh is None:
        raise ConfigError("ritz_bounds needs singular vectors; pass a Spectrum with compute_vectors=True.")
    if tuple(F.shape) != tuple(M.shape):
        raise ConfigError(f"the triplets decompose a {tuple(F.shape)} matrix, not this {tuple(M.shape)} one.")
    U, S, Vh = F.U.double(), F.values.double(), F.Vh.double()  # (m, k), (k,), (k, n)
    MV, MtU = products64(M, U, Vh.T)
    left = MV - U * S  # (m, k)
    right = MtU - Vh.T * S  # (n, k)
    rho = torch.sqrt((left**2).sum(0) + (right**2).sum(0))  # (k,)
    inf, unknown = torch.full_like(S[:1], math.inf), torch.full_like(S[:1], math.nan)
    below = torch.cat([S[:-1] - (S[1:] + rho[1:]), unknown])  # σ̃ᵢ − (upper bound of σ_{i+1}); none for i = k
    above = torch.cat([inf, (S[:-1] - rho[:-1]) - S[1:]])  # (lower bound of σ_{i−1}) − σ̃ᵢ
    gap = torch.minimum(above, below)  # NaN (unknown) propagates
    vector = torch.where(gap > 0, rho / gap, math.inf)
    subspace = torch.where(below > 0, torch.sqrt(torch.cumsum(rho**2, 0)) / below, math.inf)
    return RitzBounds(rho, vector, subspace)


def products64(M: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M V, Mᵀ U) in float64 for M (m, n), U (m, k), V (n, k) float64.

    A float32 (or half) M is up-cast by row blocks of ≤ 8 MB (exactly: every float32 is a
    float64), so the products equal those with a whole float64 copy up to summation order,
    without that copy (2× the float32 M) and 1.2–1.6× faster (2048×5632, k = 21). A side
    not wanted takes a basis with no columns (k = 0).
    """
    if M.dtype == torch.float64:
        return thin_product(M, V), thin_product(M.T, U)  # (Uᵀ M)ᵀ for a row-major M
    rows = max(1, (8 << 20) // (8 * M.shape[1]))
    MV = U.new_empty(M.shape[0], V.shape[1])
    UtM = U.new_zeros(U.shape[1], M.shape[1])  # (k, n)
    U, V = U.contiguous(), V.contiguous()
    buffer = U.new_empty(min(rows, M.shape[0]), M.shape[1])  # one up-cast block, reused: never two at once
    for i in range(0, M.shape[0], rows):
        block = buffer[:min(rows, M.shape[0] - i)].copy_(M[i:i + rows])
        torch.mm(block, V, out=MV[i:i + rows])
        UtM.addmm_(U[i:i + rows].T, block)
    return MV, UtM.T


def times64(A: torch.Tensor, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """A X, or Aᵀ X, in float64 for X float64: :func:`products64` on A's storage (A, or M for a view A = Mᵀ)."""
    if not A.is_contiguous() and A.T.is_contiguous():  # A = Mᵀ: A X = Mᵀ X, Aᵀ X = M X
        A, transpose = A.T, not transpose
    if transpose:
        return products64(A, X, X.new_zeros(A.shape[1], 0))[1]  # (n, c)
    return products64(A, X.new_zeros(A.shape[0], 0), X)[0]  # (m, c)


def krylov_triplets(M: torch.Tensor, k: int, *, steps: int, random_state: int = 0) -> Spectrum:
    """The top-`k` Ritz triplets of `M` from `steps` block Lanczos steps, in M's precision.

    No convergence is tested on the way, unlike :func:`~spectra.linalg.svd.randomized_svd`
    with a `tol` (whose test, an SVD of the projection, costs as much as a step once the
    space holds ~1000 columns): for callers that judge the result by :func:`ritz_bounds`.

    Parameters
    ----------
    M : torch.Tensor, shape (m, n)
        float32 or float64.
    k : int
        Triplets wanted; the space grows to at least k columns whatever `steps` says.
    steps : int
        Block steps beyond the first (block width :func:`~spectra.linalg.krylov.krylov_block`);
        fewer where the space fills min(m, n).
    random_state : int, default 0
        Seed of the Gaussian start block.

    Returns
    -------
    Spectrum
        ``method="krylov"``, values (Ritz values: lower bounds of the top k) and vectors in
        M's dtype, ``n_iter`` the blocks built; where no block fits beside k columns
        (k + b > min(m, n)), the full decomposition's top k instead.
    """
    if not isinstance(M, torch.Tensor) or M.ndim != 2 or M.dtype not in (torch.float32, torch.float64):
        raise ConfigError("`M` must be a 2-D float32 or float64 tensor.")
    short = min(M.shape)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= short:
        raise ConfigError(f"`k` must be an int in [1, {short}] for shape {tuple(M.shape)}, got {k!r}.")
    b = krylov_block(k, short)
    if k + b > short:
        F = full_svd(M, compute_vectors=True)
        return Spectrum(F.values[:k], F.total_energy, F.shape, F.method, U=F.U[:, :k], Vh=F.Vh[:k],
                        complete=k == short)
    lan = _lanczos(M, b, max(steps, -(-k // b)), random_state)
    while not lan.full:
        lan.step()
    return _triplets(lan, M, k, frobenius_energy(M))


def _lanczos(M: torch.Tensor, b: int, steps: int, random_state: int, *, energy: float | None = None,
             float64: bool = False) -> BlockLanczos:
    """A block Lanczos process on M's wide orientation with room for `steps` blocks (and one more).

    ``float64``: float64 bases over a lower-precision M, multiplied by row blocks of its storage
    up-cast (:func:`times64`): no float64 copy of M. ``energy``: ‖M‖_F², when known.
    """
    A = M.T if M.shape[0] > M.shape[1] else M  # (short, long)
    gen = torch.Generator(device=M.device).manual_seed(int(random_state))
    scale = None if energy is None else math.sqrt(energy)
    if float64 and A.dtype != torch.float64:
        return BlockLanczos(A, b, gen, max_dim=(steps + 1) * b, scale=scale, dtype=torch.float64,
                            times=lambda X, transpose: times64(A, X, transpose))
    return BlockLanczos(A, b, gen, max_dim=(steps + 1) * b, scale=scale)


def _triplets(lan: BlockLanczos, M: torch.Tensor, k: int, energy: float) -> Spectrum:
    """The top-k Ritz triplets of the space `lan` has built, in M's (out, in) orientation; ‖M‖_F² = `energy`."""
    U, Vh = lan.vectors(k)  # (short, k), (k, long)
    if M.shape[0] > M.shape[1]:
        U, Vh = Vh.T, U.T
    shape = (int(M.shape[0]), int(M.shape[1]))
    return Spectrum(lan.ritz_values()[:k].to(lan.dtype), energy, shape, "krylov", U=U, Vh=Vh,
                    n_iter=lan.d // lan.b, complete=k == min(shape))


def top_svd(M: torch.Tensor, k: int, *, exact_below: int = EXACT_BELOW, angle_tol: float = ANGLE_TOL,
            random_state: int = 0) -> Spectrum:
    """The top-`k` singular triplets of `M` in float64, every top-j subspace certified.

    Matrices with min(m, n) ≤ `exact_below`, or too small for a Krylov space of
    ``_KRYLOV_MIN_STEPS`` blocks within half their short side, take
    :func:`~spectra.linalg.svd.full_svd` (float64, every triplet). Larger ones grow a
    float64 block Krylov space and, after steps 10, 14 and 20 (or the last that fits
    in half the short side), check the top k + 1 Ritz triplets: the first whose
    :func:`ritz_bounds` put every top-j subspace (j ≤ k, left and right) within
    `angle_tol` of the exact one is returned; if none does (or, from step 14, most top-j
    gaps are still unresolved: a noise bulk), the full decomposition is taken after all.
    So every top-j subspace (all that φ, principal angles, captured energies and
    amplification factors read) is the full decomposition's to within `angle_tol`, and
    each value to within its residual (in practice ρ²/gap).

    Parameters
    ----------
    M : torch.Tensor, shape (m, n)
    k : int
        Triplets wanted, 1 ≤ k ≤ min(m, n).
    exact_below : int, default EXACT_BELOW
        Short side at or below which the full decomposition is taken at once.
    angle_tol : float, default ANGLE_TOL
        Largest sin θ allowed between a computed and the exact top-j subspace.
    random_state : int, default 0
        Seed of the Krylov start block.

    Returns
    -------
    Spectrum
        The full decomposition (``method`` from :func:`~spectra.linalg.svd.full_svd`,
        every triplet), or the top k with ``method="krylov"`` and ``tolerance`` the largest
        relative residual ρᵢ/σ̃ᵢ (a bound on the values' relative error).
    """
    short = min(M.shape)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= short:
        raise ConfigError(f"`k` must be an int in [1, {short}] for shape {tuple(M.shape)}, got {k!r}.")
    if not 0.0 < angle_tol < 1.0:
        raise ConfigError(f"`angle_tol` must be in (0, 1), got {angle_tol!r}.")
    b = krylov_block(k + 1, short)
    last = min(_KRYLOV_CHECKS[-1], short // (2 * b) - 1)  # ≤ short/2 columns: beyond, a full SVD is as cheap
    if short > exact_below and last >= _KRYLOV_MIN_STEPS:
        energy = frobenius_energy(M)
        # float64 bases; M as stored, multiplied by row blocks up-cast: a float64 copy of a float32 M was 2× its size
        lan = _lanczos(M, b, last, random_state, energy=energy, float64=True)
        for step in range(1, last + 1):
            lan.step()
            if (step in _KRYLOV_CHECKS or step == last) and lan.d > k:
                F = _triplets(lan, M, k + 1, energy)
                bounds = ritz_bounds(M, F)
                if float(bounds.subspace_sin[:k].max()) <= angle_tol:
                    values = F.values[:k]
                    rel = float((bounds.residuals[:k] / values.clamp(min=torch.finfo(values.dtype).tiny)).max())
                    return Spectrum(values, F.total_energy, F.shape, "krylov", U=F.U[:, :k], Vh=F.Vh[:k],
                                    tolerance=rel, n_iter=step, complete=k == short)
                if step >= _KRYLOV_CHECKS[1] and int(torch.isinf(bounds.subspace_sin[:k]).sum()) > k // 2:
                    break  # most gaps still unresolved after 14 steps: a noise bulk, go full now
    return full_svd(M, compute_vectors=True, dtype=torch.float64)
