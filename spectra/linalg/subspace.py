"""Comparing subspaces: how far apart two sets of singular vectors are, and how much of
ΔW a given subspace holds.

Matrices are (out_features, in_features). A *basis* is a (dim, r) tensor whose columns
span the subspace; it is orthonormalised here, so any full-column-rank basis works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spectra.errors import ConfigError
from spectra.linalg.svd import Spectrum, _full_svd, frobenius_energy

__all__ = [
    "principal_angles", "grassmann_distance", "subspace_similarity", "similarity_matrix",
    "captured_energy", "best_rank_energy", "amplification_factor", "Intruders", "intruder_dimensions",
]


def _check_basis(X, name: str) -> None:
    if not isinstance(X, torch.Tensor) or X.ndim != 2 or min(X.shape) == 0:
        raise ConfigError(f"`{name}` must be a non-empty 2-D tensor (dim, r) whose columns span a subspace.")
    if X.shape[1] > X.shape[0]:
        raise ConfigError(f"`{name}` has more columns ({X.shape[1]}) than its dimension ({X.shape[0]}).")
    if not X.dtype.is_floating_point:
        raise ConfigError(f"`{name}` must be floating point, got {X.dtype}.")


def _check_pair(A, B) -> None:
    _check_basis(A, "A")
    _check_basis(B, "B")
    if A.shape[0] != B.shape[0]:
        raise ConfigError(f"bases live in different spaces: `A` has dim {A.shape[0]}, `B` has {B.shape[0]}.")


def _orthonormal(X: torch.Tensor) -> torch.Tensor:
    Q, _ = torch.linalg.qr(X.double())  # (dim, r) -> (dim, r)
    return Q


def _check_rank(r, limit: int, name: str = "rank") -> int:
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= limit:
        raise ConfigError(f"`{name}` must be an int in [1, {limit}], got {r!r}.")
    return r


# ---------------------------------------------------------------------------- angles


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles between span(A) and span(B), ascending, in radians.

    Cosines come from the singular values of Q_Aᵀ Q_B; angles below π/4 are taken
    from the sines (singular values of (I − Q_A Q_Aᵀ) Q_B) so small angles stay
    accurate (Björck & Golub; Knyazev & Argentati).

    Parameters
    ----------
    A : torch.Tensor, shape (dim, p)
    B : torch.Tensor, shape (dim, q)

    Returns
    -------
    torch.Tensor, shape (min(p, q),), float64

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

    References
    ----------
    .. [1] A. Edelman, T. A. Arias, S. T. Smith, "The geometry of algorithms with
       orthogonality constraints", SIAM J. Matrix Anal. Appl. 20(2), 1998.
    """
    return float(torch.linalg.vector_norm(principal_angles(A, B)))


# ---------------------------------------------------------------------------- LoRA φ


def subspace_similarity(U_A: torch.Tensor, U_B: torch.Tensor, i: int, j: int) -> float:
    """LoRA-paper similarity φ(A, B, i, j) = ‖U_Aⁱᵀ U_Bʲ‖_F² / min(i, j) ∈ [0, 1].

    Parameters
    ----------
    U_A : torch.Tensor, shape (dim, ≥ i)
        Singular vectors of A (columns, by decreasing σ); orthonormal is assumed.
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
    return float(_similarity_matrix(U_A[:, :i], U_B[:, :j])[i - 1, j - 1])


def similarity_matrix(U_A: torch.Tensor, U_B: torch.Tensor, max_i: int | None = None,
                      max_j: int | None = None) -> torch.Tensor:
    """φ(A, B, i, j) for every 1 ≤ i ≤ max_i, 1 ≤ j ≤ max_j, as a heatmap matrix.

    Returns
    -------
    torch.Tensor, shape (max_i, max_j), float64
        Entry [i-1, j-1] is φ(A, B, i, j) (Hu et al. 2021, arXiv:2106.09685, §7.2).
    """
    _check_pair(U_A, U_B)
    max_i = U_A.shape[1] if max_i is None else _check_rank(max_i, U_A.shape[1], "max_i")
    max_j = U_B.shape[1] if max_j is None else _check_rank(max_j, U_B.shape[1], "max_j")
    return _similarity_matrix(U_A[:, :max_i], U_B[:, :max_j])


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
    and span(V) (in side). For a LoRA adapter ΔW ≈ s·B A, pass ``U=B`` (out, r) and
    ``V=A.T`` (in, r).

    Parameters
    ----------
    delta : torch.Tensor, shape (out, in)
    U : torch.Tensor, shape (out, r), optional
    V : torch.Tensor, shape (in, r), optional
        At least one of `U`, `V`.

    Returns
    -------
    float in [0, 1]
        Compare with :func:`best_rank_energy` at the same rank (Eckart–Young).
    """
    if not isinstance(delta, torch.Tensor) or delta.ndim != 2:
        raise ConfigError("`delta` must be a 2-D tensor (out, in).")
    if U is None and V is None:
        raise ConfigError("captured_energy needs a column space `U`, a row space `V`, or both.")
    _check_finite(delta, "delta")
    D = delta.double()
    if U is not None:
        _check_basis(U, "U")
        if U.shape[0] != D.shape[0]:
            raise ConfigError(f"`U` has {U.shape[0]} rows but `delta` has out={D.shape[0]}.")
        Qu = _orthonormal(U)
        D = Qu.T @ D  # (r, out) @ (out, in) -> (r, in); same norm as P_U ΔW
    if V is not None:
        _check_basis(V, "V")
        if V.shape[0] != delta.shape[1]:
            raise ConfigError(f"`V` has {V.shape[0]} rows but `delta` has in={delta.shape[1]}.")
        Qv = _orthonormal(V)
        D = D @ Qv  # (·, in) @ (in, r) -> (·, r)
    total = frobenius_energy(delta)
    return 0.0 if total == 0 else float((D**2).sum()) / total


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ConfigError(f"`{name}` holds NaN or Inf values.")


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
    F = _full_svd(delta, compute_vectors=False, work=torch.float64)
    return 0.0 if F.total_energy == 0 else float((F.values[:rank].double() ** 2).sum()) / F.total_energy


def amplification_factor(delta: torch.Tensor, W: torch.Tensor, rank: int, *, svd: Spectrum | None = None) -> float:
    """‖ΔW‖_F / ‖Uᵀ W V‖_F, U, V the top-`rank` singular vectors of ΔW.

    How strongly the update amplifies directions that W itself barely uses. Hu et al.
    report ≈ 21.5 for GPT-3 layer 48 W_q at r = 4 (‖ΔW‖_F = 6.91, ‖UᵀWV‖_F = 0.32).
    With ``delta = W`` it is 1/√(Eckart–Young energy at `rank`).

    Parameters
    ----------
    delta : torch.Tensor, shape (out, in)
    W : torch.Tensor, shape (out, in)
        Usually W_base (the paper's W_q).
    rank : int

    Returns
    -------
    float (inf when W has no component in that subspace)

    svd : Spectrum, optional
        A decomposition of `delta` with vectors, when already computed.

    References
    ----------
    .. [1] Hu et al. 2021, arXiv:2106.09685, §7.3 and Table 7.
    """
    for name, t in (("delta", delta), ("W", W)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise ConfigError(f"`{name}` must be a 2-D tensor (out, in).")
    if delta.shape != W.shape:
        raise ConfigError(f"`delta` {tuple(delta.shape)} and `W` {tuple(W.shape)} differ in shape.")
    _check_rank(rank, min(delta.shape))
    _check_finite(delta, "delta")
    _check_finite(W, "W")
    if svd is not None and svd.U is not None:
        _check_given(svd, "svd", delta.shape, rank)
        F = svd
    else:
        F = _full_svd(delta, compute_vectors=True, work=torch.float64)
    U, Vh = F.U[:, :rank].double(), F.Vh[:rank].double()  # (out, r), (r, in)
    proj = U.T @ W.double() @ Vh.T  # (r, out) @ (out, in) @ (in, r) -> (r, r)
    den = float(torch.linalg.matrix_norm(proj))
    return math.inf if den == 0 else math.sqrt(F.total_energy) / den


# ---------------------------------------------------------------------------- intruders


@dataclass(frozen=True)
class Intruders:
    """Intruder dimensions of W_tuned relative to W_base.

    Attributes
    ----------
    indices : tuple of int
        0-based positions j among the top-k singular vectors of W_tuned that are intruders.
    max_cos : torch.Tensor, shape (k,)
        max_i |cos(y_j, x_i)| over every singular vector x_i of W_base, per top-k y_j.
    k : int
    epsilon : float
    side : str
    """

    indices: tuple[int, ...]
    max_cos: torch.Tensor
    k: int
    epsilon: float
    side: str

    @property
    def count(self) -> int:
        return len(self.indices)


def intruder_dimensions(
    W_base: torch.Tensor,
    W_tuned: torch.Tensor,
    *,
    k: int = 10,
    epsilon: float = 0.5,
    side: str = "left",
    base_svd: Spectrum | None = None,
    tuned_svd: Spectrum | None = None,
) -> Intruders:
    """Top-k singular vectors of W_tuned that resemble no singular vector of W_base.

    y_j (j ≤ k) is an intruder if max_i |cos(y_j, x_i)| < ε over all singular vectors
    x_i of W_base (same side).

    Parameters
    ----------
    W_base, W_tuned : torch.Tensor, shape (out, in)
    k : int, default 10
        Top singular vectors of W_tuned examined (PEFT's ``top_k`` default).
    epsilon : float, default 0.5
        Cosine threshold (PEFT's default).
    side : {"left", "right"}, default "left"
        Compare left (out-space) or right (in-space) singular vectors.
    base_svd, tuned_svd : Spectrum, optional
        Full decompositions with vectors of `W_base` / `W_tuned`, when already computed.

    Returns
    -------
    Intruders

    References
    ----------
    .. [1] R. Shuttleworth, J. Andreas, A. Torralba, P. Sharma, "LoRA vs full
       fine-tuning: an illusion of equivalence", 2024. arXiv:2410.21228, §4.
    """
    for name, t in (("W_base", W_base), ("W_tuned", W_tuned)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise ConfigError(f"`{name}` must be a 2-D tensor (out, in).")
    if W_base.shape != W_tuned.shape:
        raise ConfigError(f"`W_base` {tuple(W_base.shape)} and `W_tuned` {tuple(W_tuned.shape)} differ in shape.")
    _check_rank(k, min(W_base.shape), "k")
    if not (0.0 < float(epsilon) < 1.0):
        raise ConfigError(f"`epsilon` must be in (0, 1), got {epsilon!r}.")
    if side not in ("left", "right"):
        raise ConfigError(f"`side` must be 'left' or 'right', got {side!r}.")
    _check_finite(W_base, "W_base")
    _check_finite(W_tuned, "W_tuned")
    # precomputed full decompositions (with vectors) of either side may be passed to save work
    if base_svd is not None:  # every singular vector of W_base, or an intruder may be one it lacks
        _check_given(base_svd, "base_svd", W_base.shape, min(W_base.shape))
    if tuned_svd is not None:
        _check_given(tuned_svd, "tuned_svd", W_tuned.shape, k)
    Fb = base_svd if base_svd is not None else _full_svd(W_base, compute_vectors=True, work=torch.float64)
    Ft = tuned_svd if tuned_svd is not None else _full_svd(W_tuned, compute_vectors=True, work=torch.float64)
    if side == "left":
        X, Y = Fb.U.double(), Ft.U[:, :k].double()  # (out, r), (out, k)
    else:
        X, Y = Fb.Vh.T.double(), Ft.Vh[:k].T.double()  # (in, r), (in, k)
    max_cos = (X.T @ Y).abs().amax(0)  # (r, k) -> (k,)
    idx = tuple(int(j) for j in torch.nonzero(max_cos < epsilon).flatten())
    return Intruders(idx, max_cos, k, float(epsilon), side)
