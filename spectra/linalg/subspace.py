"""Comparing subspaces: how far apart two sets of singular vectors are, and how much of
ΔW a given subspace holds.

Matrices are (out_features, in_features). A *basis* is a (dim, r) tensor whose columns
span the subspace; it is orthonormalised here at its numerical rank (:func:`orthonormal_basis`),
so any spanning set works, a LoRA factor with zero or dependent columns included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spectra.errors import ConfigError
from spectra.linalg.krylov import krylov_block
from spectra.linalg.partial import EXACT_BELOW, krylov_triplets, lowrank_svd, products64, ritz_bounds, times64
from spectra.linalg.svd import Spectrum, frobenius_energy, full_svd

__all__ = [
    "basis_rtol", "orthonormal_basis", "factor_svd", "principal_angles", "grassmann_distance",
    "subspace_similarity", "similarity_matrix",
    "captured_energy", "captured_energies", "best_rank_energy", "amplification_factor", "Intruders",
    "intruder_reference", "intruder_dimensions",
]

# Certified intruder decisions (see intruder_dimensions). A decision needs the vectors only to
# the margin between |cos| and ε (~1e-2 and up), so the Krylov runs take float32 (3–10× faster
# here than float64) and every vector's error is then bounded in float64. Their values stop
# changing at float32's resolution (~1e-6) before the vectors stop improving, so the runs take a
# fixed number of steps: 30 brought every top-22 vector of a 2048×5632 Marchenko–Pastur bulk
# (gaps of 0.1 % at its edge) within sin θ ≤ 3e-3; stopping once the values had converged to
# 1e-5 (15 steps) left them at 0.3–2. A space stays within half the short side (beyond it a
# full SVD is as cheap), and with fewer than 8 steps room the full decompositions are taken.
_INTRUDER_STEPS = 30
_INTRUDER_MIN_STEPS = 8
_LANCZOS_STEPS = 64  # most Lanczos steps per undecided direction before the full decompositions
_LANCZOS_CHECK = 4  # steps between evaluations of the Gauss-rule bound
_BREAKDOWN = 1e-12  # β_t below this × max|α| ends a recurrence: its Krylov space is invariant
_QUADRATURE_SLACK = 1e-10  # added to every atom bound: rounding of float64 Lanczos with full re-orthogonalisation


def _check_basis(X, name: str) -> None:
    """A (dim, r) floating tensor, dim ≥ 1; r = 0 is the zero subspace (what a zero factor spans)."""
    if not isinstance(X, torch.Tensor) or X.ndim != 2 or X.shape[0] == 0:
        raise ConfigError(f"`{name}` must be a 2-D tensor (dim, r), dim ≥ 1, whose columns span a subspace.")
    if X.shape[1] > X.shape[0]:
        raise ConfigError(f"`{name}` has more columns ({X.shape[1]}) than its dimension ({X.shape[0]}).")
    if not X.dtype.is_floating_point:
        raise ConfigError(f"`{name}` must be floating point, got {X.dtype}.")
    _check_finite(X, name)


def _check_pair(A, B) -> None:
    _check_basis(A, "A")
    _check_basis(B, "B")
    if A.shape[0] != B.shape[0]:
        raise ConfigError(f"bases live in different spaces: `A` has dim {A.shape[0]}, `B` has {B.shape[0]}.")


def basis_rtol(X: torch.Tensor) -> float:
    """Relative tolerance under which a singular value of `X` (dim, r) counts as zero.

    max(dim, r)·ε₆₄: the float64 SVD's own error (numpy.linalg.matrix_rank's default
    tolerance), whatever X's stored dtype. The stored factors are the adapter exactly (PEFT
    computes with those numbers), so a zero or duplicated column stays exactly that in any
    dtype; a tolerance of the storage rounding (√r·ε/2: 3 % of σ₁ for a bfloat16 factor at
    r = 16, 6 % at r = 64) had reported the small but real directions of bf16 adapters as
    unused (a review: 47 of 64 for a B whose σ decays to 3 % of σ₁).
    """
    dim, r = X.shape
    return max(dim, r) * torch.finfo(torch.float64).eps


def orthonormal_basis(X: torch.Tensor, *, rtol: float | None = None) -> torch.Tensor:
    """An orthonormal basis of span(X) with as many columns as X's numerical rank.

    The left singular vectors of X (float64) whose σᵢ exceed ``rtol``·σ₁. A plain QR would
    not do: for a rank-deficient X (a LoRA ``B`` whose zero-initialised columns never
    trained, duplicated columns) its Q still has r orthonormal columns, the extra ones
    arbitrary, and every measure would lend the subspace directions it does not have.

    Parameters
    ----------
    X : torch.Tensor, shape (dim, r)
        Thin (r ≤ dim): its SVD costs O(dim·r²), and only X is copied to float64.
    rtol : float, optional
        Relative tolerance in [0, 1); default :func:`basis_rtol` of `X` (float64's SVD error).

    Returns
    -------
    torch.Tensor, shape (dim, k), float64
        k ≤ r the numerical rank; k = 0 for a zero X.
    """
    _check_basis(X, "X")
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < 1):
        raise ConfigError(f"`rtol` must be a float in [0, 1), got {rtol!r}.")
    return _orthonormal(X, rtol)


def _orthonormal(X: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    if X.shape[1] == 0:
        return X.double()
    U, S, _ = torch.linalg.svd(X.double(), full_matrices=False)  # (dim, r), (r,) descending
    tol = (basis_rtol(X) if rtol is None else rtol) * S[0]
    return U[:, :int((S > tol).sum())]  # (dim, k)


def factor_svd(L: torch.Tensor, R: torch.Tensor, *, scale: float = 1.0) -> Spectrum:
    """SVD of a factored update s·L Rᵀ (a LoRA ``s·B A``: L = B, R = Aᵀ), cut at its numerical rank.

    Its k triplets span the update's own column space (``U``) and row space (``Vh.T``).
    These lie inside span(L) and span(R) but are smaller when L Rᵀ has lower rank than
    either: a zero column of B leaves the matching row of A unused, so span(Aᵀ) then
    overstates the row space even though A has full rank. Past k, the vectors of
    :func:`~spectra.linalg.partial.lowrank_svd` belong to zero singular values and are
    arbitrary, so they are dropped.

    A σᵢ counts as zero at or below |s|·σ₁(L)·σ₁(R)·(rtol_L + rtol_R), the rtols from
    :func:`basis_rtol` of each factor: the float64 decomposition's own error, as the stored
    factors are the update exactly.

    Parameters
    ----------
    L : torch.Tensor, shape (m, r)
    R : torch.Tensor, shape (n, r)
    scale : float, default 1.0
        The LoRA scaling s = α/r (α/√r with rsLoRA).

    Returns
    -------
    Spectrum
        ``method="lowrank-qr"``, k ≤ min(m, n, r) values and vectors in float64 (k = 0 for a
        zero update), ``total_energy`` = ‖s·L Rᵀ‖_F², ``complete`` when k = min(m, n).
    """
    F = lowrank_svd(L, R, scale=scale)  # checks both factors
    top = [float(torch.linalg.matrix_norm(X.double(), ord=2)) for X in (L, R)]  # σ₁ of each thin factor
    tol = abs(scale) * top[0] * top[1] * (basis_rtol(L) + basis_rtol(R))
    k = int((F.values > tol).sum())
    return Spectrum(F.values[:k], F.total_energy, F.shape, F.method, U=F.U[:, :k], Vh=F.Vh[:k],
                    complete=k == min(F.shape))


def _check_rank(r, limit: int, name: str = "rank") -> int:
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= limit:
        raise ConfigError(f"`{name}` must be an int in [1, {limit}], got {r!r}.")
    return r


# ---------------------------------------------------------------------------- angles


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles between span(A) and span(B), ascending, in radians.

    Q_A, Q_B are orthonormal bases at the numerical ranks p', q' of A and B
    (:func:`orthonormal_basis`), so a dependent or zero column adds no angle: a zero
    column used to add one to an arbitrary direction. Cosines come from the singular values
    of Q_Aᵀ Q_B; angles below π/4 are taken from the sines (singular values of
    (I − Q_A Q_Aᵀ) Q_B) so small angles stay accurate (Björck & Golub; Knyazev & Argentati).

    Parameters
    ----------
    A : torch.Tensor, shape (dim, p)
    B : torch.Tensor, shape (dim, q)

    Returns
    -------
    torch.Tensor, shape (min(p', q'),), float64
        min(p, q) angles when both have full column rank; none when either is zero.

    References
    ----------
    .. [1] Å. Björck and G. H. Golub, "Numerical methods for computing angles between
       linear subspaces", Math. Comp. 27(123), 1973.
    .. [2] A. V. Knyazev and M. E. Argentati, "Principal angles between subspaces in an
       A-based scalar product", SIAM J. Sci. Comput. 23(6), 2002.
    """
    _check_pair(A, B)
    return _principal_angles(_orthonormal(A), _orthonormal(B))


def _principal_angles(Qa: torch.Tensor, Qb: torch.Tensor) -> torch.Tensor:
    if Qa.shape[1] < Qb.shape[1]:
        Qa, Qb = Qb, Qa  # p ≥ q: q angles
    cos = torch.linalg.svdvals(Qa.T @ Qb).clamp(0.0, 1.0)  # (p, q) -> (q,) descending
    sin = torch.linalg.svdvals(Qb - Qa @ (Qa.T @ Qb)).clamp(0.0, 1.0).flip(0)  # (q,) ascending
    theta = torch.where(cos > 1 / math.sqrt(2), torch.arcsin(sin), torch.arccos(cos))
    return theta


def grassmann_distance(A: torch.Tensor, B: torch.Tensor) -> float:
    """Geodesic distance on the Grassmannian, ‖θ‖₂ over the principal angles.

    For subspaces of unequal dimensions p' ≠ q' it is ‖θ‖₂ over the min(p', q') angles:
    the distance from the smaller subspace to the nearest subspace of its size inside the
    larger (Ye & Lim 2016, arXiv:1407.0900, δ). Their other conventions count π/2 for each
    of the |p' − q'| missing dimensions; a user comparing adapters of different ranks gets 0
    here when the smaller one's span lies inside the larger's.

    References
    ----------
    .. [1] A. Edelman, T. A. Arias, S. T. Smith, "The geometry of algorithms with
       orthogonality constraints", SIAM J. Matrix Anal. Appl. 20(2), 1998.
    .. [2] K. Ye and L.-H. Lim, "Schubert varieties and distances between subspaces of
       different dimensions", SIAM J. Matrix Anal. Appl. 37(3), 2016.
    """
    return float(torch.linalg.vector_norm(principal_angles(A, B)))


# ---------------------------------------------------------------------------- LoRA φ


def subspace_similarity(U_A: torch.Tensor, U_B: torch.Tensor, i: int, j: int) -> float:
    """LoRA-paper similarity φ(A, B, i, j) = ‖U_Aⁱᵀ U_Bʲ‖_F² / min(i, j) ∈ [0, 1].

    Parameters
    ----------
    U_A : torch.Tensor, shape (dim, ≥ i)
        Singular vectors of A (columns, by decreasing σ), orthonormal: columns that are not
        (a LoRA factor itself, say) raise :class:`ConfigError`, since φ of them can exceed 1;
        take their singular vectors or :func:`orthonormal_basis` first.
    U_B : torch.Tensor, shape (dim, ≥ j)
    i, j : int
        How many leading columns of each to compare.

    References
    ----------
    .. [1] E. J. Hu et al., "LoRA: Low-rank adaptation of large language models",
       ICLR 2022. arXiv:2106.09685, §7.2, eq. (4).
    """
    _check_pair(U_A, U_B)
    _check_rank(i, U_A.shape[1], "i")
    _check_rank(j, U_B.shape[1], "j")
    _check_orthonormal(U_A[:, :i], "U_A")
    _check_orthonormal(U_B[:, :j], "U_B")
    return float(_similarity_matrix(U_A[:, :i], U_B[:, :j])[i - 1, j - 1])


def similarity_matrix(U_A: torch.Tensor, U_B: torch.Tensor, max_i: int | None = None,
                      max_j: int | None = None) -> torch.Tensor:
    """φ(A, B, i, j) for every 1 ≤ i ≤ max_i, 1 ≤ j ≤ max_j, as a heatmap matrix.

    Returns
    -------
    torch.Tensor, shape (max_i, max_j), float64
        Entry [i-1, j-1] is φ(A, B, i, j) (Hu et al. 2021, arXiv:2106.09685, §7.2).

    `U_A` and `U_B` must have orthonormal columns, as in :func:`subspace_similarity`.
    """
    _check_pair(U_A, U_B)
    max_i = U_A.shape[1] if max_i is None else _check_rank(max_i, U_A.shape[1], "max_i")
    max_j = U_B.shape[1] if max_j is None else _check_rank(max_j, U_B.shape[1], "max_j")
    _check_orthonormal(U_A[:, :max_i], "U_A")
    _check_orthonormal(U_B[:, :max_j], "U_B")
    return _similarity_matrix(U_A[:, :max_i], U_B[:, :max_j])


def _check_orthonormal(U: torch.Tensor, name: str) -> None:
    """Raise unless max|UᵀU − I| is within rounding of U's dtype (1e-3, or 8·ε for 16-bit types).

    Singular vectors from any LAPACK or Krylov path sit far inside it (~√dim·ε); a factor
    that merely spans a subspace (norms ≠ 1, correlated columns) is far outside.
    """
    tol = max(1e-3, 8 * torch.finfo(U.dtype).eps)
    Ud = U.double()
    off = float((Ud.T @ Ud - torch.eye(U.shape[1], dtype=torch.float64, device=U.device)).abs().max()) \
        if U.shape[1] else 0.0
    if off > tol:
        raise ConfigError(f"`{name}`'s columns are not orthonormal (max |UᵀU − I| = {off:.3g} > {tol:.3g}): φ "
                          "compares singular vectors; pass the SVD's U (or V) or orthonormal_basis(X) of a factor.")


def _similarity_matrix(Ua: torch.Tensor, Ub: torch.Tensor) -> torch.Tensor:
    C2 = (Ua.double().T @ Ub.double()) ** 2  # (i, dim) @ (dim, j) -> (i, j)
    cum = C2.cumsum(0).cumsum(1)  # ‖U_Aⁱᵀ U_Bʲ‖_F² for every (i, j)
    i = torch.arange(1, Ua.shape[1] + 1, dtype=torch.float64, device=cum.device)[:, None]
    j = torch.arange(1, Ub.shape[1] + 1, dtype=torch.float64, device=cum.device)[None, :]
    return cum / torch.minimum(i, j)


# ---------------------------------------------------------------------------- energy


def captured_energy(delta: torch.Tensor, *, U: torch.Tensor | None = None, V: torch.Tensor | None = None) -> float:
    """Fraction of ‖ΔW‖_F² inside a column space and/or a row space.

    ‖P_U ΔW P_V‖_F² / ‖ΔW‖_F², with P the orthogonal projector on span(U) (out side)
    and span(V) (in side), each taken at its numerical rank (:func:`orthonormal_basis`):
    a zero or dependent column adds nothing to the space. For a LoRA adapter
    ΔW_ad = s·B A, ``U=B`` (out, r) and ``V=A.T`` (in, r) give the spans of the factors;
    the update's own column and row spaces, smaller when B A has lower rank than B or A
    (a zero column of B leaves its row of A unused), are ``factor_svd(B, A.T).U`` and
    ``.Vh.T``, which ``spectra verify`` uses (through :func:`captured_energies`).

    Parameters
    ----------
    delta : torch.Tensor, shape (out, in)
        Any floating dtype; read by row blocks up-cast to float64, never copied whole.
    U : torch.Tensor, shape (out, r), optional
    V : torch.Tensor, shape (in, r), optional
        At least one of `U`, `V`. A basis with no columns is the zero subspace (captures 0).

    Returns
    -------
    float in [0, 1]
        Compare with :func:`best_rank_energy` at the same rank (Eckart–Young).
    """
    if U is None and V is None:
        raise ConfigError("captured_energy needs a column space `U`, a row space `V`, or both.")
    column, row, both = _captured(delta, U, V)
    return both if U is not None and V is not None else column if U is not None else row


def captured_energies(delta: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[float, float, float]:
    """:func:`captured_energy` in span(U), in span(V) and in both, from one pass over ΔW.

    Parameters
    ----------
    delta : torch.Tensor, shape (out, in)
    U : torch.Tensor, shape (out, p)
    V : torch.Tensor, shape (in, q)

    Returns
    -------
    (column, row, both) : tuple of float in [0, 1]
        ‖P_U ΔW‖_F², ‖ΔW P_V‖_F² and ‖P_U ΔW P_V‖_F², each over ‖ΔW‖_F².
    """
    return _captured(delta, U, V)


def _captured(delta: torch.Tensor, U: torch.Tensor | None, V: torch.Tensor | None) -> tuple[float, float, float]:
    """(column, row, both) fractions for `U`, `V` either of which may be None (the zero subspace there)."""
    if not isinstance(delta, torch.Tensor) or delta.ndim != 2:
        raise ConfigError("`delta` must be a 2-D tensor (out, in).")
    _check_finite(delta, "delta")
    spaces = []
    for X, name, dim in ((U, "U", 0), (V, "V", 1)):
        if X is None:  # no space on this side: a basis with no columns
            spaces.append(torch.zeros(delta.shape[dim], 0, dtype=torch.float64, device=delta.device))
            continue
        _check_basis(X, name)
        if X.shape[0] != delta.shape[dim]:
            side = ("out", "in")[dim]
            raise ConfigError(f"`{name}` has {X.shape[0]} rows but `delta` has {side}={delta.shape[dim]}.")
        spaces.append(_orthonormal(X))
    Qu, Qv = spaces  # (out, p'), (in, q') orthonormal
    delta = _in_square_range(delta)
    total = frobenius_energy(delta)
    if total == 0:
        return 0.0, 0.0, 0.0
    # ΔW Q_V (out, q') and ΔWᵀ Q_U (in, p'), ΔW read once by row blocks in float64; their norms are those
    # of ΔW P_V and P_U ΔW
    DQv, DtQu = products64(delta, Qu, Qv)
    both = Qu.T @ DQv  # (p', out) @ (out, q') -> (p', q'): same norm as P_U ΔW P_V
    return float((DtQu**2).sum()) / total, float((DQv**2).sum()) / total, float((both**2).sum()) / total


def _check_finite(t: torch.Tensor, name: str) -> None:
    """One reduction pass: min and max propagate NaN and are ±Inf when any entry is. ``isfinite(t).all()``
    materialised |t| and three boolean masks, 1.75× a float32 (out, in) at once."""
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise ConfigError(f"`{name}` holds NaN or Inf values.")


def _in_square_range(t: torch.Tensor) -> torch.Tensor:
    """`t` times a power of two (exact) that brings a float64 tensor's largest |entry| from beyond 2^±400 to ~1, so
    that its squares sum in float64's normal range: 1e155 had overflowed to a NaN fraction, 1e-170 lost the small
    values' squares to subnormals (−0.67 on a rank-5 energy). Ratios of energies do not change. Any other tensor is
    returned as it is; a scaled one is a copy."""
    if t.dtype != torch.float64 or t.numel() == 0:
        return t
    lo, hi = torch.aminmax(t)
    top = max(-float(lo), float(hi))
    if top == 0 or 2.0**-400 <= top <= 2.0**400:
        return t
    e = -math.frexp(top)[1]  # top · 2ᵉ in [½, 1)
    half = e // 2  # in two steps: 2ᵉ alone may pass float64's range (e up to 1074)
    return t * 2.0**half * 2.0**(e - half)


def _check_given(F: Spectrum, name: str, shape, vectors: int) -> None:
    """A decomposition handed in must be of this matrix and hold the vectors used."""
    if F.U is None or F.Vh is None:
        raise ConfigError(f"`{name}` has no singular vectors; pass full_svd(..., compute_vectors=True).")
    if tuple(F.shape) != tuple(shape):
        raise ConfigError(f"`{name}` decomposes a {tuple(F.shape)} matrix, not this {tuple(shape)} one.")
    if F.U.shape[1] < vectors:
        raise ConfigError(f"`{name}` holds {F.U.shape[1]} singular vectors; {vectors} are needed here.")


def best_rank_energy(delta: torch.Tensor, rank: int) -> float:
    """Eckart–Young optimum: the largest fraction of ‖ΔW‖_F² any rank-`rank` matrix
    captures, Σ_{i≤r} σᵢ² / Σ σᵢ².

    References
    ----------
    .. [1] C. Eckart and G. Young, "The approximation of one matrix by another of lower
       rank", Psychometrika 1(3), 1936.
    """
    if not isinstance(delta, torch.Tensor) or delta.ndim != 2:
        raise ConfigError("`delta` must be a 2-D tensor (out, in).")
    _check_rank(rank, min(delta.shape))
    _check_finite(delta, "delta")
    F = full_svd(_in_square_range(delta), dtype=torch.float64)
    return 0.0 if F.total_energy == 0 else float((F.values[:rank].double() ** 2).sum()) / F.total_energy


def amplification_factor(delta: torch.Tensor | None, W: torch.Tensor, rank: int, *,
                         svd: Spectrum | None = None, rounded_energy: float | None = None) -> float:
    """‖ΔW‖_F / ‖Uᵀ W V‖_F, U, V the top-`rank` singular vectors of ΔW.

    How strongly the update amplifies directions that W itself barely uses. Hu et al.
    report ≈ 21.5 for GPT-3 layer 48 W_q at r = 4 (‖ΔW‖_F = 6.91, ‖UᵀWV‖_F = 0.32).
    With ``delta = W`` it is 1/√(Eckart–Young energy at `rank`).

    Parameters
    ----------
    delta : torch.Tensor, shape (out, in), or None
        None when `svd` is given: ‖ΔW‖_F² is then its ``total_energy`` (a LoRA update
        s·B A need not be formed: pass :func:`factor_svd` of its factors).
    W : torch.Tensor, shape (out, in)
        Usually W_base (the paper's W_q). Read by row blocks up-cast to float64.
    rank : int
        At most ΔW's :func:`numerical_rank`, where its singular vectors are determined; a
        larger one is refused (a zero ΔW gives 0 at any rank).
    svd : Spectrum, optional
        A decomposition of `delta` with vectors, when already computed.
    rounded_energy : float, optional
        For a ΔW taken as the difference of two stored weights, ‖W‖_F²: the rounding ΔW
        carries is theirs (see :func:`numerical_rank`). None: ΔW's own (an exact update).

    Returns
    -------
    float (inf when W has no component in that subspace)

    References
    ----------
    .. [1] Hu et al. 2021, arXiv:2106.09685, §7.3 and Table 7.
    """
    given = svd is not None and svd.U is not None
    if delta is None and not given:
        raise ConfigError("amplification_factor needs `delta`, or its decomposition `svd` with vectors.")
    for name, t in (("delta", delta), ("W", W)):
        if t is None and name == "delta":
            continue
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise ConfigError(f"`{name}` must be a 2-D tensor (out, in).")
    if delta is not None and delta.shape != W.shape:
        raise ConfigError(f"`delta` {tuple(delta.shape)} and `W` {tuple(W.shape)} differ in shape.")
    _check_rank(rank, min(W.shape))
    if delta is not None:
        _check_finite(delta, "delta")
    _check_finite(W, "W")
    if given:
        _check_given(svd, "svd", W.shape, rank)
        F = svd
    else:
        F = full_svd(delta, compute_vectors=True, dtype=torch.float64)
    top = float(F.values[0]) if F.values.numel() else 0.0
    if top == 0.0:
        return 0.0  # whatever the (arbitrary) vectors of a zero ΔW
    fro = top * math.sqrt(_energy_over_top(F, F.total_energy))  # ‖ΔW‖_F, where its square underflows too
    numerical = numerical_rank(F, W.shape, dtype=None if delta is None else _held(delta),
                               rounded_energy=rounded_energy)
    if rank > numerical:  # the vectors past it belong to zero singular values: LAPACK's arbitrary choice
        raise ConfigError(f"`rank` {rank} passes ΔW's numerical rank {numerical}: its singular vectors beyond "
                          f"that are arbitrary, and so would the factor be. Pass rank ≤ {numerical}.")
    U, Vh = F.U[:, :rank].double(), F.Vh[:rank].double()  # (out, r), (r, in)
    WV = times64(W, Vh.T)  # (out, r): W read once by row blocks in float64, never copied whole
    proj = U.T @ WV  # (r, out) @ (out, r) -> (r, r)
    den = float(torch.linalg.matrix_norm(proj))
    return math.inf if den == 0 else fro / den


# ---------------------------------------------------------------------------- intruders


@dataclass(frozen=True)
class Intruders:
    """Intruder dimensions of W_tuned relative to W_base.

    Attributes
    ----------
    indices : tuple of int
        0-based positions j among the top-k singular vectors of W_tuned that are intruders.
    max_cos : torch.Tensor, shape (k,)
        max_i |cos(y_j, x_i)| over every singular vector x_i of W_base with a nonzero value
        (0 for a zero base), per top-k y_j, with ``method="full"``. With
        ``method="certified"`` a bound on the same side of ε as that maximum: a lower bound
        ≥ ε for a direction the base has, an upper bound < ε for an intruder (so
        ``max_cos < epsilon`` marks the intruders either way). NaN where y_j's own value is
        zero (W_tuned's rank is below k): no direction of W_tuned, no intruder.
    k : int
    epsilon : float
    side : str
    method : {"full", "certified"}
        ``"full"``: from full decompositions of both weights; ``"certified"``: every
        decision proved from a few triplets (see :func:`intruder_dimensions`).
    """

    indices: tuple[int, ...]
    max_cos: torch.Tensor
    k: int
    epsilon: float
    side: str
    method: str = "full"

    @property
    def count(self) -> int:
        return len(self.indices)


def _krylov_steps(k: int, short: int) -> int:
    """Steps of an intruder Krylov run for the top k of a matrix with short side `short`."""
    return min(_INTRUDER_STEPS, short // (2 * krylov_block(k, short)) - 1)


def intruder_reference(W_base: torch.Tensor, *, k: int = 10, exact_below: int = EXACT_BELOW,
                       random_state: int = 0) -> Spectrum:
    """The decomposition of W_base that :func:`intruder_dimensions` starts from.

    Compute it once and pass it as ``base_svd`` to every call against the same base.

    Parameters
    ----------
    W_base : torch.Tensor, shape (out, in)
    k : int, default 10
        Top tuned vectors that will be examined.
    exact_below : int, default EXACT_BELOW
        Short side at or below which the full decomposition is returned.
    random_state : int, default 0
        Seed of the Krylov start block.

    Returns
    -------
    Spectrum
        With vectors: the float64 full decomposition (``complete``) for small matrices,
        else the top 2k + 2 triplets by float32 block Krylov — the base direction that a tuned
        top-k vector follows sits among them even when k others intrude above it, and the
        last one bounds the others' gaps.
    """
    short = min(W_base.shape)
    _check_rank(k, short, "k")
    K = 2 * k + 2
    if short <= exact_below or _krylov_steps(K, short) < _INTRUDER_MIN_STEPS:
        return full_svd(W_base, compute_vectors=True, dtype=torch.float64)
    return krylov_triplets(W_base.float(), K, steps=_krylov_steps(K, short), random_state=random_state)


def intruder_dimensions(
    W_base: torch.Tensor,
    W_tuned: torch.Tensor,
    *,
    k: int = 10,
    epsilon: float = 0.5,
    side: str = "left",
    base_svd: Spectrum | None = None,
    tuned_svd: Spectrum | None = None,
    exact_below: int = EXACT_BELOW,
    random_state: int = 0,
) -> Intruders:
    """Top-k singular vectors of W_tuned that resemble no singular vector of W_base.

    y_j (j ≤ k) is an intruder if max_i |cos(y_j, x_i)| < ε over all singular vectors
    x_i of W_base (same side).

    Only vectors of a nonzero singular value count, on both sides (nonzero: above
    max(m, n)·eps·σ₁ of the decomposition, as ``matrix_rank`` counts). Those of a zero
    value are an arbitrary basis of a null space, so against a rank-deficient W_base the
    published definition would turn on LAPACK's choice of basis; here a tuned direction
    inside the base's null space is an intruder (max |cos| = 0 against a zero base). A
    y_j beyond W_tuned's own rank is no intruder.

    Small matrices (short side ≤ `exact_below`), or a complete `base_svd`, take full
    float64 decompositions. Larger ones decide every y_j without W_base's full
    decomposition, exactly as the full one would unless max_i |cos| lies within the
    vectors' certified errors of ε:

    - the top k + 1 tuned and the top K base triplets (:func:`intruder_reference`) come
      from float32 block Krylov, re-orthonormalised in float64; each vector's error is
      bounded by its residual against the float64 weight over its gap
      (:func:`~spectra.linalg.partial.ritz_bounds`: a chord ‖ỹ − y‖ ≤ √2·sin θ);
    - not an intruder when max_{i<K} |cos(ỹ_j, x̃_i)| minus both vectors' errors is ≥ ε
      (a lower bound of the maximum over all x_i);
    - an intruder when the largest possible mass of ỹ_j on any one base direction,
      bounded from a few Lanczos steps on W_base W_baseᵀ started at ỹ_j (the
      Chebyshev–Markov–Stieltjes inequalities for its Gauss quadrature), leaves the
      maximum < ε after adding ỹ_j's error. On the long side of a rectangular W_base
      (left of a tall one, right of a wide one) ỹ_j is first projected onto the base
      vectors' span by a Householder QR of W_base;
    - any direction neither proves sends the whole call to the full decompositions.

    Parameters
    ----------
    W_base, W_tuned : torch.Tensor, shape (out, in)
    k : int, default 10
        Top singular vectors of W_tuned examined (PEFT's ``top_k`` default).
    epsilon : float, default 0.5
        Cosine threshold (PEFT's default).
    side : {"left", "right"}, default "left"
        Compare left (out-space) or right (in-space) singular vectors.
    base_svd : Spectrum, optional
        A decomposition of `W_base` with vectors: complete (every vector: decided from
        it), or its top K ≥ k + 1 triplets, e.g. :func:`intruder_reference`'s.
    tuned_svd : Spectrum, optional
        The top ≥ k triplets of `W_tuned`, taken as exact.
    exact_below : int, default EXACT_BELOW
        Short side at or below which full decompositions are used when `base_svd` is not given.
    random_state : int, default 0
        Seed of the Krylov start blocks.

    Returns
    -------
    Intruders

    References
    ----------
    .. [1] R. Shuttleworth, J. Andreas, A. Torralba, P. Sharma, "LoRA vs full
       fine-tuning: an illusion of equivalence", 2024. arXiv:2410.21228, §4.
    .. [2] G. H. Golub, G. Meurant, "Matrices, Moments and Quadrature with
       Applications", Princeton University Press, 2010 (Gauss quadrature of a spectral
       measure from the Lanczos tridiagonal).
    .. [3] G. Szegő, "Orthogonal Polynomials", AMS, 1939, §3.41 (the
       Chebyshev–Markov–Stieltjes separation theorem).
    """
    for name, t in (("W_base", W_base), ("W_tuned", W_tuned)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise ConfigError(f"`{name}` must be a 2-D tensor (out, in).")
    if W_base.shape != W_tuned.shape:
        raise ConfigError(f"`W_base` {tuple(W_base.shape)} and `W_tuned` {tuple(W_tuned.shape)} differ in shape.")
    short = min(W_base.shape)
    _check_rank(k, short, "k")
    if not (0.0 < float(epsilon) < 1.0):
        raise ConfigError(f"`epsilon` must be in (0, 1), got {epsilon!r}.")
    if side not in ("left", "right"):
        raise ConfigError(f"`side` must be 'left' or 'right', got {side!r}.")
    _check_finite(W_base, "W_base")
    _check_finite(W_tuned, "W_tuned")
    if base_svd is not None:  # every vector, or the top k + 1 or more (a partial one is certified)
        _check_given(base_svd, "base_svd", W_base.shape, short if base_svd.complete else min(k + 1, short))
    if tuned_svd is not None:
        _check_given(tuned_svd, "tuned_svd", W_tuned.shape, k)
    Fb = base_svd if base_svd is not None else intruder_reference(W_base, k=k, exact_below=exact_below,
                                                                  random_state=random_state)
    if not Fb.complete:
        found = _certified_intruders(W_base, W_tuned, Fb, tuned_svd, k, float(epsilon), side, random_state)
        if found is not None:
            return found
        Fb = full_svd(W_base, compute_vectors=True, dtype=torch.float64)  # some direction undecided
    Ft = tuned_svd if tuned_svd is not None else full_svd(W_tuned, compute_vectors=True, dtype=torch.float64)
    # vectors of a zero singular value are any basis of a null space: only the rank's are the weight's
    X = _side(Fb, side)[:, :numerical_rank(Fb, W_base.shape, dtype=_held(W_base))]  # (dim, r)
    Y = _side(Ft, side)[:, :k]  # (dim, k)
    max_cos = (X.T @ Y).abs().amax(0) if X.shape[1] else Y.new_zeros(k)  # (r, k) -> (k,)
    max_cos[numerical_rank(Ft, W_tuned.shape, dtype=_held(W_tuned)):] = math.nan  # no direction of W_tuned
    idx = tuple(int(j) for j in torch.nonzero(max_cos < epsilon).flatten())
    return Intruders(idx, max_cos, k, float(epsilon), side)


# how far above the rounding noise's largest singular value a value must lie to count (a float32 product's entries
# err by up to ~√r·eps, not eps: a margin of 100)
_RANK_SLACK = 100.0


def numerical_rank(F: Spectrum, shape: tuple[int, ...] | None = None, *, dtype: torch.dtype | None = None,
                   rounded_energy: float | None = None) -> int:
    """How many of `F`'s values stand above the rounding noise of the matrix as held.

    Rounding every entry of an (m, n) matrix M to relative precision eps adds noise E whose
    largest singular value is about eps·rms·(√m + √n) (the Marchenko–Pastur edge), rms the
    root mean square of the entries rounded: M's own (``F.total_energy``), or, for a ΔW that
    is the difference of two stored weights, the weights' (`rounded_energy` = ‖W‖_F²: their
    rounding is what ΔW carries, ~1e-7·|W| in float32, far above a small update's own). A
    value under ``_RANK_SLACK`` times that edge is zero to the matrix's precision: its vectors
    are an arbitrary basis of a null space, or directions of the rounding, not of the weight.
    eps is `dtype`'s, the precision the matrix was held in (a float32 ΔW decomposed in
    float64: float32's), else that of the values; (m, n) is `shape`, else ``F.shape``.
    Computed relative to σ₁, so a float64 matrix whose energy underflows keeps its cut.

    ``matrix_rank``'s max(m, n)·eps·σ₁ is far coarser for a well-spread matrix (4.9e-4·σ₁ at
    4096² in float32, which dropped a trained adapter's weak direction at 1e-4·σ₁).
    """
    values = F.values.double()
    if not values.numel() or float(values[0]) <= 0.0:
        return 0
    m, n = F.shape if shape is None else shape
    eps = torch.finfo(F.values.dtype if dtype is None else dtype).eps
    relative = _energy_over_top(F, F.total_energy if rounded_energy is None else rounded_energy)
    cut = _RANK_SLACK * eps * math.sqrt(relative / (m * n)) * (math.sqrt(m) + math.sqrt(n))  # over σ₁
    return int((values / float(values[0]) > cut).sum())


def _energy_over_top(F: Spectrum, energy: float) -> float:
    """`energy` (a ‖·‖_F²) over F's σ₁², from F's values themselves where the energy underflowed (a float64
    matrix of entries near 1e-170, whose squares are 0); F's σ₁ > 0."""
    top = float(F.values[0])
    ratio = float(energy) / top**2 if float(energy) > 0 else math.nan
    return ratio if math.isfinite(ratio) else float(((F.values.double() / top) ** 2).sum())


def _held(W: torch.Tensor) -> torch.dtype:
    """The precision a weight's values are held to, for :func:`numerical_rank`: its dtype, float32 at least (bf16
    weights are read into float32 exactly, and their rank is judged at that arithmetic's rounding)."""
    return torch.promote_types(W.dtype, torch.float32)


def _side(F: Spectrum, side: str) -> torch.Tensor:
    """Singular vectors of one side as float64 columns: U (out, ·) or V (in, ·)."""
    return F.U.double() if side == "left" else F.Vh.T.double()


def _certified_intruders(W_base, W_tuned, Fb: Spectrum, tuned_svd, k: int, epsilon: float, side: str,
                         random_state: int) -> Intruders | None:
    """Intruders decided from a few triplets (see :func:`intruder_dimensions`), or None if any is undecided."""
    chord = math.sqrt(2.0)  # ‖x − x̃‖ ≤ √2·sin θ for the better-signed of ±x̃
    if numerical_rank(Fb, W_base.shape, dtype=_held(W_base)) < Fb.k:
        return None  # a null space among the base triplets: only the full decomposition sets it apart
    if tuned_svd is not None:
        Ft, ey = tuned_svd, torch.zeros(k, dtype=torch.float64, device=W_base.device)
    else:
        short = min(W_tuned.shape)
        Ft = _orthonormal_triplets(krylov_triplets(W_tuned.float(), k + 1, steps=_krylov_steps(k + 1, short),
                                                   random_state=random_state))
        ey = chord * ritz_bounds(W_tuned, Ft).vector_sin[:k]
    if numerical_rank(Ft, W_tuned.shape, dtype=_held(W_tuned)) < k:
        return None  # W_tuned's top k reach its null space, which the full path leaves out
    Y = _side(Ft, side)[:, :k]
    Fb = _orthonormal_triplets(Fb)
    K = Fb.k - 1  # the last triplet only bounds the gaps of the others
    X, ex = _side(Fb, side)[:, :K], chord * ritz_bounds(W_base, Fb).vector_sin[:K]
    low = ((X.T @ Y).abs() - ex[:, None]).amax(0) - ey  # (K, k) -> (k,): max_i |cos(y_j, x_i)| ≥ low
    high = torch.full_like(low, math.inf)  # max_i |cos(y_j, x_i)| ≤ high
    open_ = low < epsilon
    if bool(open_.any()):
        if bool((ey[open_] >= epsilon).any()):
            return None  # y_j itself too uncertain to be proved an intruder
        reach = (epsilon - ey[open_]) ** 2  # the most mass on one base direction that leaves y_j an intruder
        S, project = _side_operator(W_base, side)  # a float64 QR only where a direction is open
        mass = _largest_atom(S, project(Y[:, open_]), reach)
        high[open_] = torch.sqrt(mass) + ey[open_]
    intruder = high < epsilon
    if not bool((intruder | (low >= epsilon)).all()):
        return None
    max_cos = torch.where(intruder, high, low)
    idx = tuple(int(j) for j in torch.nonzero(intruder).flatten())
    return Intruders(idx, max_cos, k, epsilon, side, method="certified")


def _orthonormal_triplets(F: Spectrum) -> Spectrum:
    """`F` with its vectors re-orthonormalised in float64 (QR, signs kept), as :func:`ritz_bounds` needs.

    A float32 Krylov run leaves them orthonormal to ~1e-7; each moves by about that much.
    """
    def orth(X: torch.Tensor) -> torch.Tensor:  # (dim, k), columns
        Q, R = torch.linalg.qr(X.double())
        return Q * torch.where(R.diagonal() < 0, -1.0, 1.0)

    return Spectrum(F.values.double(), F.total_energy, F.shape, F.method, U=orth(F.U), Vh=orth(F.Vh.T).T,
                    tolerance=F.tolerance, n_iter=F.n_iter, complete=F.complete)


def _side_operator(W: torch.Tensor, side: str):
    """S (d, e), d ≤ e, whose left singular vectors are W's `side` vectors up to a map `project` (dim, c) -> (d, c).

    The side's vectors are the left singular vectors of X = W (left) or Wᵀ (right). When X
    is wide or square they span its whole space and S = X, as stored (:func:`_gram_times`
    reads it in float64 by row blocks). When X (dim, e) is tall, its e left singular
    vectors span only range(X) = range(Q), X = Q R: they are Q times those of R (e, e), so
    inner products with them are those of Qᵀy with R's (Householder QR of X in float64;
    Qᵀ applied without forming Q).
    """
    X = W if side == "left" else W.T
    if X.shape[0] <= X.shape[1]:
        return X, lambda Y: Y
    dim, e = X.shape
    # geqrf overwrites a column-major float64 copy of X in place (out=); torch.geqrf(X.double()) copied that
    # copy again: 4× a float32 X at once instead of 2×
    reflectors = torch.empty(e, dim, dtype=torch.float64, device=X.device).T.copy_(X)  # (dim, e), column-major
    tau = reflectors.new_empty(e)
    torch.geqrf(reflectors, out=(reflectors, tau))
    R = reflectors[:e].triu()  # (e, e)
    return R, lambda Y: torch.ormqr(reflectors, tau, Y, left=True, transpose=True)[:e]  # Qᵀ Y, (e, c)


def _gram_times(S: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """S Sᵀ Z (d, c) in float64 for S (d, e) in any floating dtype and Z (d, c) float64.

    Two passes over S's storage (:func:`~spectra.linalg.partial.times64`), up-cast by row
    blocks: no float64 copy of S.
    """
    return times64(S, times64(S, Z, transpose=True))  # (d, e) @ ((e, d) @ (d, c))


def _largest_atom(S: torch.Tensor, Z: torch.Tensor, reach: torch.Tensor) -> torch.Tensor:
    """Upper bounds on max_i ⟨x_i, z⟩², x_i the left singular vectors of S (d, e), d ≤ e, per column z of Z (d, c).

    ⟨x_i, z⟩² are the atoms of the spectral measure μ = Σᵢ ⟨xᵢ, z⟩² δ(σᵢ²) of G = S Sᵀ
    (total mass ‖z‖²; a repeated σ pools its atoms, which only raises the bound). t steps
    of Lanczos on G from z/‖z‖ (full re-orthogonalisation, float64) give the t-point Gauss
    rule of μ: nodes θ_1 < … < θ_t (eigenvalues of the tridiagonal T_t) and weights
    w_l = ‖z‖²·(first component of T_t's l-th eigenvector)². With F the distribution of μ,
    Σ_{l<j} w_l ≤ F(θ_j − 0) ≤ F(θ_j) ≤ Σ_{l≤j} w_l (Chebyshev–Markov–Stieltjes), so an
    atom in (θ_{j−1}, θ_j] is ≤ w_{j−1} + w_j, one below θ_1 ≤ w_1, one above θ_t ≤ w_t.
    A spread-out μ (an intruder) has no large weights after a few steps; an atom ≥ ε² never
    lets the bound fall below it. Columns stop once their bound is below `reach` (c,); the
    others run to ``_LANCZOS_STEPS``, unless one stalls above its reach (under 10 % lower
    than four steps before): that direction stays undecided, so the caller falls back and
    the rest need not be sharpened. Every bound returned is valid whenever the run stops;
    each carries ``_QUADRATURE_SLACK`` for rounding.
    """
    d, c = Z.shape
    mass = (Z**2).sum(0)  # (c,)
    bound = mass.clone()  # no atom exceeds the total mass
    previous = torch.full_like(mass, math.inf)  # the bound at the last check
    steps = min(_LANCZOS_STEPS, d)
    Q = Z.new_zeros(steps + 1, d, c)  # Lanczos vectors, one recurrence per column
    Q[0] = Z / mass.sqrt().clamp(min=torch.finfo(Z.dtype).tiny)
    alpha, beta = Z.new_zeros(steps, c), Z.new_zeros(steps, c)
    live = (mass > reach) & (mass > 0)
    for t in range(steps):
        if not bool(live.any()):
            break
        w = _gram_times(S, Q[t])  # (d, e) @ (e, d) @ (d, c) -> (d, c)
        if t:
            w -= beta[t - 1] * Q[t - 1]
        alpha[t] = (Q[t] * w).sum(0)
        w -= alpha[t] * Q[t]
        for _ in range(2):  # full re-orthogonalisation: twice is enough
            w -= torch.einsum("tdc,tc->dc", Q[:t + 1], torch.einsum("tdc,dc->tc", Q[:t + 1], w))
        beta[t] = torch.linalg.vector_norm(w, dim=0)
        ended = beta[t] <= _BREAKDOWN * alpha[: t + 1].abs().amax(0)  # an invariant space: the rule is μ itself
        Q[t + 1] = torch.where(ended, 0.0, w / beta[t].clamp(min=torch.finfo(w.dtype).tiny))
        check = live & ended if (t + 1) % _LANCZOS_CHECK and t + 1 < steps else live
        if bool(check.any()):
            bound[check] = _gauss_atom_bound(alpha[: t + 1, check], beta[:t, check], mass[check])
            if bool(((bound[check] > reach[check]) & (bound[check] > 0.9 * previous[check])).any()):
                break  # stalled above its reach: undecidable here
            previous[check] = bound[check]
        live &= ~ended & (bound > reach)
    return bound


def _gauss_atom_bound(alpha: torch.Tensor, beta: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """max_l (w_l + w_{l+1}) of the Gauss rules of c tridiagonals (diagonals `alpha` (t, c), `beta` (t-1, c) beside)."""
    t, c = alpha.shape
    T = torch.diag_embed(alpha.T)  # (c, t, t)
    if t > 1:
        T = T + torch.diag_embed(beta.T, 1) + torch.diag_embed(beta.T, -1)
    _, vecs = torch.linalg.eigh(T)  # nodes ascending
    w = mass[:, None] * vecs[:, 0, :] ** 2  # (c, t) Gauss weights
    pairs = w if t == 1 else w[:, 1:] + w[:, :-1]
    return pairs.amax(1) + _QUADRATURE_SLACK
