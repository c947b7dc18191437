"""Singular value decompositions of one weight update ΔW, shape (out_features, in_features).

Three ways to get a spectrum, all returning a :class:`Spectrum`:

- :func:`full_svd` — every singular value (and optionally the vectors). On CPU the
  values come from a float64 Gram matrix and a symmetric eigen-solve, which is faster
  than LAPACK's SVD on the wide matrices of transformer MLPs and accurate to ~1e-7
  relative on every σᵢ ≥ 1e-4·σ₁; vectors come from LAPACK gesdd.
- :func:`randomized_svd` — the top-k by a Halko–Martinsson–Tropp range finder with
  re-orthonormalised power (subspace) iterations, optionally stopped early once the
  top-k values have converged to a stated tolerance.
- :func:`adaptive_svd` — grows k block by block, reusing the subspace already found,
  until a requested fraction of ‖ΔW‖_F² is captured.

:func:`spectrum` with ``method="auto"`` picks between them and records its choice.
Because ‖ΔW‖_F² is known exactly, every :class:`Spectrum` carries it, so energy
fractions stay exact when only the top-k values are known.

References
----------
.. [1] N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness:
   probabilistic algorithms for constructing approximate matrix decompositions",
   SIAM Review 53(2), 2011. arXiv:0909.4061.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import math

import numpy as np
import torch

from spectra.errors import ConfigError
from spectra.linalg.krylov import BlockLanczos, krylov_block
from spectra.linalg.lapack import gram_singular_values

__all__ = ["Spectrum", "full_svd", "randomized_svd", "adaptive_svd", "spectrum", "frobenius_energy", "CONVERGED_TOL",
           "half_range_scale"]

# Relative convergence of the top singular values wherever a top-k is taken as exact enough
# (spectrum(n_components=…), extraction, calibrated truncation, adaptive_svd's default).
CONVERGED_TOL = 1e-4

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Spectrum:
    """Singular values (and optionally vectors) of one matrix of shape (out, in).

    Attributes
    ----------
    values : torch.Tensor, shape (k,)
        Singular values in descending order; all of them when ``complete``.
    total_energy : float
        ‖M‖_F² computed exactly (float64) from the matrix itself, so
        ``values**2 / total_energy`` are exact energy fractions even for top-k.
    shape : tuple of int
        (out, in) of the decomposed matrix.
    method : str
        Which path produced it: ``"full-gram"``, ``"full-gesdd"``, ``"full-torch"``,
        ``"randomized"``, ``"krylov"``, ``"adaptive"`` (``"adaptive->full"`` when it fell back),
        ``"adaptive-bf16"`` (``"adaptive-bf16->full"``; :func:`spectra.linalg.sketch.energy_sketch`, whose
        power steps ran in bf16; ``"adaptive-fp32"``, ``"adaptive-fp16"`` in those dtypes)
        or ``"lowrank-qr"`` (:func:`spectra.linalg.partial.lowrank_svd`).
    U : torch.Tensor or None, shape (out, k)
        Left singular vectors, when requested.
    Vh : torch.Tensor or None, shape (k, in)
        Right singular vectors (rows), when requested.
    tolerance : float
        Estimated largest relative error of ``values`` (0.0 for a full decomposition at
        working precision; for randomized paths an a-posteriori estimate from the
        convergence of the power iterations, ``nan`` when no iterations ran).
    n_iter : int
        Power iterations run (0 for full paths).
    complete : bool
        True when ``values`` is the whole spectrum (min(out, in) values).
    rank_bounds : dict of float to (int, int)
        Energy ranks known only as an interval, ``{τ: (lo, hi)}`` with lo ≤ rank ≤ hi; the
        values stop before such a τ, so :func:`~spectra.linalg.metrics.energy_rank` reads
        ``None`` there. Empty but for :func:`spectra.linalg.sketch.energy_sketch`.
    basis : torch.Tensor or None, shape (min(out, in), l)
        An orthonormal basis of the subspace whose Ritz values ``values`` are, on the
        matrix's shorter side (its rows' side, out, when out ≤ in): set by
        :func:`spectra.linalg.sketch.energy_sketch` when it stops short of the whole side,
        else None (also after its fall-back to a full decomposition). :func:`spectra.linalg.noise.residual_energy` starts from it.
    energy_error : float or None
        Estimated shortfall of Σ ``values``² below the same number of true σᵢ² (Ritz values are
        lower bounds): set by :func:`spectra.linalg.sketch.energy_sketch`, which weighs each value's
        own estimated error by its energy; None elsewhere, where (2·``tolerance`` + ``tolerance``²)·Σ ``values``²
        bounds it (:func:`spectra.linalg.noise.residual_error`).
    """

    values: torch.Tensor
    total_energy: float
    shape: tuple[int, int]
    method: str
    U: torch.Tensor | None = None
    Vh: torch.Tensor | None = None
    tolerance: float = 0.0
    n_iter: int = 0
    complete: bool = True
    rank_bounds: dict[float, tuple[int, int]] = field(default_factory=dict)
    basis: torch.Tensor | None = field(default=None, repr=False)
    energy_error: float | None = None

    @property
    def k(self) -> int:
        """Number of singular values held."""
        return int(self.values.numel())

    @property
    def captured_fraction(self) -> float:
        """Fraction of ‖M‖_F² in the values held: Σσᵢ² / ‖M‖_F² (1.0 when complete)."""
        if self.total_energy == 0.0:
            return 1.0
        return float((self.values.double() ** 2).sum()) / self.total_energy


# ---------------------------------------------------------------------------- validation


def _check_matrix(M, name: str = "M") -> float:
    """Validate `M` and return ‖M‖_F² (float64); its finiteness doubles as the NaN/Inf check."""
    _check_shape(M, name)
    energy = frobenius_energy(M)
    if not math.isfinite(energy):
        if bool(torch.isfinite(M).all()):
            raise ConfigError(f"`{name}` is too large: ‖{name}‖_F² overflows float64 (largest |entry| "
                              f"{float(M.abs().max()):.3g}); rescale it before the SVD.")
        raise ConfigError(f"`{name}` holds NaN or Inf; cannot take its SVD. Locate them with "
                          f"`torch.isfinite({name})`; in a weight update they come from a diverged fine-tune "
                          "or a bad save of one checkpoint.")
    return energy


def _check_shape(M, name: str = "M") -> None:
    if not isinstance(M, torch.Tensor):
        raise ConfigError(f"`{name}` must be a torch.Tensor, got {type(M).__name__}.")
    if M.ndim != 2:
        raise ConfigError(f"`{name}` must be 2-D (out_features, in_features), got shape {tuple(M.shape)}.")
    if M.dtype not in _FLOATS:
        raise ConfigError(f"`{name}` must be a floating tensor, got {M.dtype}.")
    if min(M.shape) == 0:
        raise ConfigError(f"`{name}` is empty (shape {tuple(M.shape)}).")


def _work_dtype(M: torch.Tensor, dtype) -> torch.dtype:
    """float64 stays float64, everything else computes in float32 unless `dtype` says otherwise."""
    if dtype is None:
        return torch.float64 if M.dtype == torch.float64 else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}.")
    return dtype


def _generator(random_state, device: torch.device) -> torch.Generator:
    """Turn `random_state` (None, int or torch.Generator) into a generator once, up front."""
    if isinstance(random_state, torch.Generator):
        return random_state
    if random_state is None:
        random_state = int(torch.randint(0, 2**62, (1,)).item())
    if not isinstance(random_state, (int, np.integer)) or isinstance(random_state, bool):
        raise ConfigError(f"`random_state` must be None, an int or a torch.Generator, got {random_state!r}.")
    gen = torch.Generator(device=device)
    gen.manual_seed(int(random_state))
    return gen


_NORM_CHUNK = 1 << 18  # float64 elements up-cast at a time by frobenius_energy (2 MB)


def frobenius_energy(M: torch.Tensor) -> float:
    """‖M‖_F² accumulated in float64 (exact to rounding of the sum).

    The reference norm: verification and the SVD paths use it. Whole-model analysis uses
    :func:`spectra.linalg.sketch.squared_norm` instead, float32 block norms summed in
    float64 (~1e-6 relative, ~3× faster again, no float64 copy at all).

    On the CPU, M is up-cast 2¹⁸ elements at a time into one reused float64 buffer (2 MB,
    cache-resident) and each piece summed by a float64 dot: ~10× faster than up-casting
    large row blocks, whose float64 copies go through memory.

    Parameters
    ----------
    M : torch.Tensor, any shape, any floating dtype

    Returns
    -------
    float
    """
    if M.numel() == 0:
        return 0.0
    if M.dim() == 2 and not M.is_contiguous() and M.T.is_contiguous():
        M = M.T  # the same entries; read in stored order
    if M.device.type != "cpu" or not M.is_contiguous():
        # Row chunks of ≤ 4M elements: the float64 up-cast never exceeds 32 MB.
        flat = M.reshape(M.shape[0], -1) if M.ndim else M.reshape(1, 1)
        rows = max(1, (4 << 20) // max(1, flat.shape[1]))
        return sum(float(torch.linalg.vector_norm(flat[i:i + rows], dtype=torch.float64)) ** 2
                   for i in range(0, flat.shape[0], rows))
    flat = M.reshape(-1)
    if flat.dtype == torch.float64:
        return float(torch.dot(flat, flat))
    step = min(_NORM_CHUNK, flat.numel())
    buffer = torch.empty(step, dtype=torch.float64)
    total = 0.0
    for i in range(0, flat.numel(), step):
        piece = buffer[: min(step, flat.numel() - i)]
        piece.copy_(flat[i:i + step])
        total += float(torch.dot(piece, piece))
    return total


# ---------------------------------------------------------------------------- full spectrum


def full_svd(
    M: torch.Tensor,
    *,
    compute_vectors: bool = False,
    dtype: torch.dtype | None = None,
) -> Spectrum:
    """Every singular value of `M`, and optionally its singular vectors.

    Parameters
    ----------
    M : torch.Tensor, shape (out, in)
        Any floating dtype, any device. bf16/fp16 are up-cast.
    compute_vectors : bool, default False
        Also return ``U`` (out, r) and ``Vh`` (r, in), r = min(out, in).
    dtype : torch.dtype, optional
        Working dtype of the returned values/vectors: float32 (default for every
        input but float64) or float64.

    Returns
    -------
    Spectrum
        ``complete=True``; ``method`` is ``"full-gram"`` (values only on CPU from data
        below float64: float64 Gram matrix of the short side + LAPACK ``syevd``),
        ``"full-gesdd"`` (CPU with vectors, or float64 data: LAPACK divide and conquer) or
        ``"full-torch"`` (other devices).

    Notes
    -----
    With vectors, float32 gesdd gives each σᵢ to LAPACK's absolute accuracy, ~1e-6·σ₁
    (so ~1e-6 relative already at σ₁/3); values alone (``full-gram``) are more accurate.
    The Gram route squares the condition number, but in float64 from float32 data it
    keeps a relative error ≲ 1e-7 on every σᵢ ≥ 1e-4·σ₁; values far below
    ~1e-7·σ₁ are rounding-level and returned as they come (clipped at 0). Float64 data
    would lose its own accuracy there (σ = 1e-12·σ₁ came back 2.4e-9·σ₁), so it goes
    through gesdd.
    """
    energy = _check_matrix(M)
    work = _work_dtype(M, dtype)
    return _full_svd(M, compute_vectors=compute_vectors, work=work, total_energy=energy)


def _full_svd(M: torch.Tensor, *, compute_vectors: bool, work: torch.dtype,
              total_energy: float | None = None) -> Spectrum:
    shape = (int(M.shape[0]), int(M.shape[1]))
    energy = frobenius_energy(M) if total_energy is None else total_energy
    if M.device.type != "cpu":
        A = M.to(work)
        if compute_vectors:
            U, S, Vh = torch.linalg.svd(A, full_matrices=False)
            return Spectrum(S, energy, shape, "full-torch", U=U, Vh=Vh)
        return Spectrum(torch.linalg.svdvals(A), energy, shape, "full-torch")
    if compute_vectors or M.dtype == torch.float64:  # float64 data keeps float64 accuracy: no squared condition
        import scipy.linalg

        A = M.detach().to(work).numpy()
        # LAPACK gets the tall orientation: gesdd of a wide matrix took 1.4–2.7× as long as of its
        # transpose here (256×2048: 28.8 against 10.7–17.2 ms; 2048×5632: 2.3 against 1.7 s)
        wide = A.shape[0] < A.shape[1]
        if wide:
            A = A.T  # M = (U S Vh)ᵀ = Vhᵀ S Uᵀ
        to = lambda x: torch.from_numpy(np.ascontiguousarray(x))  # noqa: E731
        if not compute_vectors:
            S = scipy.linalg.svd(A, compute_uv=False, lapack_driver="gesdd", check_finite=False)
            return Spectrum(to(S), energy, shape, "full-gesdd")
        U, S, Vh = scipy.linalg.svd(A, full_matrices=False, lapack_driver="gesdd", check_finite=False)
        if wide:
            U, Vh = Vh.T, U.T
        return Spectrum(to(S), energy, shape, "full-gesdd", U=to(U), Vh=to(Vh))
    S = _gram_svdvals(M)  # (min(out, in),) float64
    return Spectrum(S.to(work), energy, shape, "full-gram")


def _is_zero(M: torch.Tensor, total_energy: float) -> bool:
    """Whether M is exactly zero, given ‖M‖_F²: a zero norm is confirmed on the entries, since float64
    entries below ~1e-154 square to 0."""
    return total_energy == 0.0 and not bool(M.any())


def _zero_spectrum(M: torch.Tensor, k: int, *, method: str, compute_vectors: bool, work: torch.dtype) -> Spectrum:
    """The top-k of a zero matrix M (out, in), known without a decomposition.

    ‖M‖_F = 0 puts every σ at exactly 0 (``tolerance`` 0, as for :func:`full_svd`), and
    any orthonormal U, Vh are singular vectors of it: the first k unit vectors cost nothing.
    """
    shape = (int(M.shape[0]), int(M.shape[1]))
    U = Vh = None
    if compute_vectors:
        U = torch.eye(shape[0], k, dtype=work, device=M.device)  # (out, k)
        Vh = torch.eye(k, shape[1], dtype=work, device=M.device)  # (k, in)
    return Spectrum(torch.zeros(k, dtype=work, device=M.device), 0.0, shape, method, U=U, Vh=Vh,
                    complete=k == min(shape))


def _full_top(M: torch.Tensor, k: int | None, *, compute_vectors: bool, energy: float, method: str | None = None,
              n_iter: int = 0, rank_of=None) -> Spectrum:
    """A full decomposition of M (out, in) cut to its top k — or to ``rank_of(values)`` when given.

    The one fall-back of the randomized paths: `method` overrides the label (``None``
    keeps the full path's own, e.g. ``"full-gesdd"``).
    """
    F = _full_svd(M, compute_vectors=compute_vectors, work=M.dtype, total_energy=energy)
    k = rank_of(F.values) if rank_of is not None else (F.values.numel() if k is None else k)
    return Spectrum(F.values[:k], energy, F.shape, method or F.method, U=None if F.U is None else F.U[:, :k],
                    Vh=None if F.Vh is None else F.Vh[:k], n_iter=n_iter, complete=k == min(F.shape))


def gram_block_rows(short: int, long_: int) -> int:
    """Block rows of the triangular float64 Gram product: 4 to 8 blocks, each ≤ 16 MB in float64
    unless 8 blocks need more.

    More blocks save flops (the triangle of b blocks is (b + 1)/2b of the full product) but
    re-read more: each pair up-casts one block again. On 4096×11008, 16 MB blocks made 22 of
    them, and the full spectrum took 1.2× as long as with 8 (5.75 against 4.7 s). The two
    block buffers hold at most max(32 MB, half a float32 input).
    """
    return int(max(64, min(-(-short // 4), max((16 << 20) // max(1, long_ * 8), -(-short // 8)))))


def _gram_svdvals(M: torch.Tensor) -> torch.Tensor:
    """σ(M) as sqrt of eigenvalues of the float64 Gram matrix of the short side.

    Only the upper triangle of G = A Aᵀ is formed (block rows of A up-cast one pair at a
    time into two reused float64 buffers: about half the flops of the full product).
    The symmetric eigen-solve then reads that triangle in place (the MKL ``syevd`` torch
    links, called on G's own buffer by :func:`spectra.linalg.lapack.eigvalsh_`; 1.7×
    faster here than SciPy's OpenBLAS ``syevr``), so the peak extra memory is G plus two
    block rows: ≈ 2.5× a square float32 input, ≤ 1.5× for wide ones (torch's
    ``eigvalsh``, the fall-back where LAPACK is not exported, copies G: 4×).
    ~1e-9 relative error on every σᵢ ≥ 1e-4·σ₁.
    """
    A = M.detach()
    if A.shape[0] > A.shape[1]:
        A = A.T  # make it wide: (short, long)
    short, long_ = A.shape
    G = torch.zeros(short, short, dtype=torch.float64, device=A.device)  # (short, short), upper triangle
    rows = gram_block_rows(short, long_)  # several block rows, so the triangle saves flops
    # Two float64 block buffers, reused: fresh 16 MB up-casts per block fragment the heap
    # (measured: +1.5× the input of resident memory on 4096²).
    bufs = torch.empty(2, min(rows, short), long_, dtype=torch.float64, device=A.device)
    for i in range(0, short, rows):
        Ai = bufs[0, : min(rows, short - i)]
        Ai.copy_(A[i:i + rows])  # (rows, long)
        for j in range(i, short, rows):
            if j == i:
                Aj = Ai
            else:
                Aj = bufs[1, : min(rows, short - j)]
                Aj.copy_(A[j:j + rows])
            G[i:i + rows, j:j + rows].addmm_(Ai, Aj.T)  # BLAS writes into the strided view
    del bufs, Ai, Aj
    # The upper triangle, row-major, is LAPACK's (column-major) lower one: its faster sweep.
    return gram_singular_values(G, lower=False).cpu()  # MKL's syevd on G's own buffer: no copy of G


def half_range_scale(total_energy: float) -> float:
    """Power of two c that brings a matrix with ‖M‖_F² = `total_energy` into float16's range for a sketch.

    float16 holds 6.1e-5 … 65504 (normal): a ΔW of entries ~1e-6 rounds to its subnormals
    or to 0, and one of entries ~1e3 overflows in its first product with a Gaussian block.
    Scaled so that ‖c·M‖_F ≈ 2¹², every entry and every product with an orthonormal block
    stays below 2¹² (|Mq| ≤ ‖M‖₂), a Gaussian product (entries ~N(0, ‖row‖²)) below ~6·2¹²
    < 65504, and the typical entry, 2¹²/√(mn), is far above float16's normal minimum for
    any weight shape. A power of two, so c·M is exact (in float32: bar entries that fall
    below 2⁻¹²⁶, whose energy is < 2⁻²²⁸ of the total). 1.0 for a zero or non-finite total.
    """
    if not (0.0 < total_energy < math.inf):
        return 1.0
    return math.ldexp(1.0, 12 - math.ceil(0.5 * math.log2(total_energy)))


# ---------------------------------------------------------------------------- randomized


def randomized_svd(
    M: torch.Tensor,
    n_components: int,
    *,
    n_oversamples: int | None = None,
    n_iter: int | Literal["auto"] = "auto",
    tol: float | None = None,
    random_state: int | torch.Generator | None = None,
    compute_vectors: bool = True,
    sketch_dtype: torch.dtype | None = None,
    algorithm: Literal["auto", "subspace", "krylov"] = "auto",
    block_size: int | None = None,
) -> Spectrum:
    """Top-`n_components` SVD of `M` by randomized subspace iteration or block Krylov.

    ``algorithm="subspace"``: a Gaussian test matrix Ω (in, l), l = n_components +
    n_oversamples, is pushed through ``n_iter`` rounds of (M Mᵀ), re-orthonormalising
    by QR after every product (HMT Algorithm 4.4); the SVD of the small projection
    Qᵀ M gives the result (Rayleigh–Ritz).

    ``algorithm="krylov"``: randomized block Krylov — block Golub–Kahan–Lanczos
    bidiagonalisation from a Gaussian start block with full re-orthogonalisation
    [3]_. It keeps every block the power iterations would throw away, so the top
    singular values converge in far fewer products with M on slowly decaying spectra;
    the Ritz values come for free from the small block-bidiagonal projection after
    every step, so the run stops as soon as they have converged to `tol`.

    Works on tall and wide matrices; float32 stays float32.

    Parameters
    ----------
    M : torch.Tensor, shape (out, in)
    n_components : int
        Number k of singular triplets to return, 1 ≤ k ≤ min(out, in).
    n_oversamples : int, optional
        Extra sketch columns p. Default ``max(10, k // 2)``: slowly decaying spectra
        (fine-tuning updates) need a gap between σ_k and σ_{k+p} for fast convergence.
    n_iter : int or "auto", default "auto"
        Number of power iterations q (an upper bound when `tol` is set). ``"auto"``:
        7 when k < 0.1·min(out, in) else 4, as in scikit-learn; 30 when `tol` is set.
    tol : float, optional
        Stop early once the estimated relative error of every returned σᵢ is ≤ tol.
        The estimate extrapolates the change of the Ritz values between iterations
        geometrically (an Aitken-style estimate, trusted only from the second fit of the
        rate on: see ``_Convergence``), so it is cheap but not rigorous: against float64
        SVDs of planted-plus-noise, power-law, fast-decay and bf16-noise spectra
        (1024×1536 and 2048², tol = 1e-2 … 1e-4) it was never below 0.55× the true
        largest relative error (Krylov; 1.25× for subspace iteration), usually 2–10×
        above it. Where σ_k is near float32's resolution (σ_k ≲ 1e-3·σ₁ on a fast-decaying
        spectrum of a large matrix) the rounding of the Ritz values can exceed the floor
        the estimate assumes (8·eps·σ₁/σ_k) by 2–5×. A `tol` below that floor cannot be
        shown: block Krylov stops once two checks in a row extrapolate to under it, and
        ``tolerance`` reports the floor (a float64 matrix resolves more).
    random_state : int, torch.Generator or None
        Seed of the Gaussian test matrix. ``None`` draws a fresh seed.
    compute_vectors : bool, default True
        Return ``U`` (out, k) and ``Vh`` (k, in).
    sketch_dtype : torch.dtype, optional
        Run the power-iteration GEMMs in this dtype (e.g. ``torch.bfloat16`` to use
        AMX/tensor cores) until the Ritz values stop changing beyond that dtype's
        rounding noise; then iterations continue in working precision until `tol`
        holds (the accuracy guard). The final projection is always in working
        precision, so the error of the low-precision subspace enters only squared.
        A float16 copy is of M scaled by a power of two into float16's range
        (:func:`half_range_scale`), so tiny or large updates neither flush to zero nor
        overflow. Subspace iteration only.
    algorithm : {"auto", "subspace", "krylov"}, default "auto"
        ``"auto"`` takes ``"krylov"`` when `tol` is set (the run stops when the values
        have converged) and ``"subspace"`` when a fixed `n_iter` or a `sketch_dtype` is
        asked for; with `tol`, a full decomposition instead where the shortest Krylov
        run would cost over half its flops, or, values only, k > min(out, in)/8 (768×2304
        at k = 128 took 0.04 s so, against 0.04–0.09 s by Krylov). With
        ``"krylov"``, `n_iter` bounds the number of block steps beyond the first and
        `n_oversamples` is not used.
    block_size : int, optional
        Krylov block width b. Default ``clip(max(3k/16, min(k/4, 48)), 32, 128)``.

    Returns
    -------
    Spectrum
        ``method="randomized"`` (subspace) or ``"krylov"``, ``complete`` only when k = min(out, in);
        ``tolerance`` is the final relative-error estimate. A zero matrix gives k zeros
        (``tolerance`` 0) and unit vectors at no cost.

    References
    ----------
    .. [1] Halko, Martinsson & Tropp 2011, arXiv:0909.4061, Algorithms 4.3/4.4 and 5.1.
    .. [2] scikit-learn ``sklearn.utils.extmath.randomized_svd`` (defaults for ``n_iter``).
    .. [3] C. Musco, C. Musco, "Randomized block Krylov methods for stronger and faster
       approximate singular value decomposition", NeurIPS 2015, arXiv:1504.05477;
       J. A. Tropp, R. J. Webber, "Randomized algorithms for low-rank matrix
       approximation: design, analysis, and applications", 2023, arXiv:2306.12418, §11.
    """
    energy = _check_matrix(M)
    r = min(M.shape)
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or not 1 <= n_components <= r:
        raise ConfigError(f"`n_components` must be an int in [1, {r}] for shape {tuple(M.shape)}, got {n_components!r}.")
    k = int(n_components)
    if n_oversamples is None:
        n_oversamples = max(10, k // 2)
    if not isinstance(n_oversamples, (int, np.integer)) or n_oversamples < 0:
        raise ConfigError(f"`n_oversamples` must be a non-negative int, got {n_oversamples!r}.")
    if n_iter == "auto":
        n_iter = 30 if tol is not None else (7 if k < 0.1 * r else 4)
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 0:
        raise ConfigError(f"`n_iter` must be a non-negative int or 'auto', got {n_iter!r}.")
    if tol is not None and not (0.0 < float(tol) < 1.0):
        raise ConfigError(f"`tol` must be in (0, 1), got {tol!r}.")
    if sketch_dtype not in (None, torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ConfigError(f"`sketch_dtype` must be None or a float dtype, got {sketch_dtype!r}.")
    if algorithm not in ("auto", "subspace", "krylov"):
        raise ConfigError(f"`algorithm` must be one of auto, subspace, krylov; got {algorithm!r}.")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                                   or not 1 <= block_size <= r):
        raise ConfigError(f"`block_size` must be an int in [1, {r}], got {block_size!r}.")
    gen = _generator(random_state, M.device)
    work = _work_dtype(M, None)
    krylov = algorithm == "krylov" or (algorithm == "auto" and tol is not None and sketch_dtype is None)
    if _is_zero(M, energy):
        return _zero_spectrum(M, k, method="krylov" if krylov else "randomized", compute_vectors=compute_vectors,
                              work=work)
    if krylov:
        b = int(block_size) if block_size is not None else krylov_block(k, r)
        if k + b > r or (algorithm == "auto" and _krylov_outweighs_full(M.shape, k, b, compute_vectors)):
            # no room for a Krylov space beyond the answer, or its shortest run costs what a full decomposition does
            return _full_top(M.to(work), k, compute_vectors=compute_vectors, energy=energy)
        return _block_krylov(M.to(work), k, b, int(n_iter), tol, gen, compute_vectors, energy)
    l = min(r, k + int(n_oversamples))
    return _randomized_svd(M.to(work), k, l, int(n_iter), tol, gen, compute_vectors, sketch_dtype, energy)


def _krylov_outweighs_full(shape, k: int, b: int, compute_vectors: bool) -> bool:
    """Whether a full decomposition is the faster way to the top k: values only with k over an eighth of the short
    side, or the shortest block-Krylov run for the top k — ⌈k/b⌉ steps to hold k values, two more to check
    them — costing over half the flops of a full decomposition (the short side's Gram product plus ~9·short³ for
    the eigen-solve, 3.5× that with vectors: gesdd's measured cost over the values on 768×2304 and 4096²).

    A Krylov flop costs ~1.5× a full-spectrum flop in time (thin GEMMs, per-step Ritz values: see
    :func:`adaptive_svd`'s budget), so at half the flops the shortest run already takes ~¾ of the full
    path's time, and most runs take longer. On 768×2304 at k = 256, values only, the Krylov path took 0.43 s
    (power law, converged) and 0.18–0.22 s (planted and bf16: the space filled the matrix first, then the
    full decomposition) against 0.05–0.16 s full; at k = 64 it stays (the SVD bench: 0.03 s against 0.05 s).

    The flop rule alone let values-only runs at k = short/6 … short/4 through (tol 1e-3, 2 threads, 1024²,
    768×2304, 2048², 1024×2816): the steps a run takes (7–21) are 2–4× the shortest, most where k reaches into
    a flat tail (a planted rank plus noise, ΔW's usual form). Values only, Krylov over full took 1.7–3.1× the
    time there at k > short/8 (0.8–1.6× on a power law) and 0.3–1.0× at k ≤ short/8, hence the eighth, the
    cut :func:`compute_spectrum` makes too. With vectors the full path costs 3.5× more and Krylov took 0.1–0.8×
    its time up to k = short/6 (1.1–1.3× at short/4 planted, 0.5–0.6× on a power law): the flop rule stays.
    """
    short, long_ = min(shape), max(shape)
    if not compute_vectors and k > short / 8:
        return True
    krylov = sum(_krylov_step_flops(short, long_, b, j * b) for j in range(1, -(-k // b) + 3))
    return krylov > 0.5 * _full_flops(short, long_) * (3.5 if compute_vectors else 1.0)


def _full_flops(short: int, long_: int) -> float:
    """The flop model of a full spectrum: the (triangular) Gram product plus a symmetric eigen-solve (~9·short³)."""
    return short * short * long_ + 9.0 * short**3


def _krylov_step_flops(short: int, long_: int, b: int, d: int) -> float:
    """The flop model of one block-Krylov step of width b that brings the space to d columns: the two products with
    the matrix, and re-orthogonalisation against the d columns on both sides."""
    return 4.0 * short * long_ * b + 8.0 * (short + long_) * d * b


def _orth(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    Q, R = torch.linalg.qr(Y)  # (n, l) -> (n, l), (l, l)
    return Q, R


def _ritz_values(R: torch.Tensor) -> torch.Tensor:
    """Singular values of the triangular factor = those of the matrix it came from."""
    return torch.linalg.svdvals(R.double())  # (l, l) -> (l,)


class _Convergence:
    """Geometric extrapolation of the change of the top-k Ritz values between checks.

    Model: the error after t steps is e_t = E·ρᵗ. Two successive changes c₁ (over g₁
    steps) and c₂ (over g₂ steps) fix ρ through c₂/c₁ = (1 − ρ^g₂)/(ρ^−g₁ − 1), and the
    remaining error is c₂/(ρ^−g₂ − 1) (= c₂·ρ/(1 − ρ) for checks one step apart).

    The model holds only once convergence is asymptotic, and the first changes are not:
    the values of the first check are far off, so the first change is large and the
    first fitted ρ too small (on a planted low rank plus noise, k reaching into the
    noise bulk, ρ = 0.13 against 0.4–0.6 later, and the estimate 18× below the true
    error at tol = 1e-2). So the first fit keeps at least its last change as the
    estimate (ρ ≥ ½ per step); later fits are trusted as they are. Measured over
    planted, power-law, fast-decay and bf16-noise spectra (1024×1536 and 2048², k =
    12–256, tol = 1e-2 … 1e-4) the Krylov estimate was at least 0.55× the true error
    (before: 0.056×). Also taking the slower of the last two fitted rates raised that to
    0.78×, but Krylov convergence speeds up as it goes (the rates fall), so the slower
    rate was the stale one: one step more on the SVD bench's 4096² power law at k = 256
    (16× → 13.6× faster than a full SVD, for an error of 4e-5 where 1e-3 was asked).

    Subspace iterations (not monotone) keep at least the last change as the estimate at
    every fit, and a rate no faster than the range finder's (θ_l/θ_k)² per iteration
    (Halko, Martinsson & Tropp 2011, §9: the error falls like (σ_{l+1}/σ_k)^{2q}) — in a
    flat noise bulk the changes alone suggested 3–30× faster convergence than there was.

    The estimate never falls below `floor`, the working precision's relative resolution
    of σ_k; ``at_floor`` counts the consecutive updates whose extrapolation was already
    under it (more steps cannot show a smaller error there).
    """

    def __init__(self, k: int, monotone: bool = False, eps: float = 0.0):
        self.k = k
        self.monotone = monotone
        self.eps = eps
        self.prev: torch.Tensor | None = None
        self.prev_change: tuple[float, int] | None = None
        self.prev_rho = 0.0  # ρ of the last fit (0 before the first)
        self.estimate = float("nan")
        self.floor = 0.0  # the last update's floor
        self.at_floor = 0  # consecutive updates whose extrapolated error was at or below the floor
        self.errors: torch.Tensor | None = None  # per watched value, once a rate is fitted: its change scaled like the estimate

    def update(self, s: torch.Tensor, steps: int = 1) -> float:
        full, s = s, s[: self.k]
        if self.prev is not None:
            n = min(s.numel(), self.prev.numel())  # the watched set may have grown since
            changes = (s[:n] - self.prev[:n]).abs() / torch.clamp(s[:n], min=s[0] * 1e-12)
            change = float(changes.max())
            if self.prev_change is not None and self.prev_change[0] > 0:
                rho = _geometric_rate(change / self.prev_change[0], self.prev_change[1], steps)
                if not self.monotone and full.numel() > self.k:
                    rho = max(rho, min(0.99, float(full[-1] / torch.clamp(s[-1], min=s[0] * 1e-12)) ** 2))  # (σ_l/σ_k)²
                first = self.prev_rho == 0.0
                tail = 1.0 / (rho ** -steps - 1.0)
                self.prev_rho = rho
                self.estimate = change * (tail if self.monotone and not first else max(1.0, tail))
                fitted = True
            else:
                self.estimate, fitted = change, False
            floor = 8 * self.eps * float(s[0] / torch.clamp(s[-1], min=s[0] * 1e-12))
            self.at_floor = self.at_floor + 1 if self.estimate <= floor else 0
            # each value's change scaled as the largest was; none before a rate is fitted (a raw change
            # is no error estimate: on small planted matrices it had settled the energy rank one too high)
            scale = self.estimate / change if change > 0 else 0.0
            self.errors = torch.clamp(changes * scale, min=floor) if fitted else None
            self.floor, self.estimate = floor, max(self.estimate, floor)
            self.prev_change = (change, steps)
        self.prev = full
        return self.estimate


def _multiplicity_unresolved(S: torch.Tensor, b: int) -> bool:
    """Whether b or more Ritz values (those above 1e-6·θ₁) agree to 1e-8 relative.

    A block Krylov space of width b holds at most b copies of an exactly repeated σ (the
    start block's projection on its singular subspace has rank ≤ b); further copies come in
    only through rounding, soon in float32, many steps later in float64, and meanwhile the
    Ritz values look converged. b equal values cannot say how many more there are, so the
    callers decompose fully instead (a float64 diag(1 ×100, tail) gave 64 of the top 80 as 1,
    reported converged to 4e-14, and an energy rank of 55 for 33).
    """
    s = S.double()
    if s.numel() < b or not float(s[0]) > 0:
        return False
    s = s[s > 1e-6 * s[0]]
    if s.numel() < b:
        return False
    head, tail = s[: s.numel() - b + 1], s[b - 1:]
    return bool(((head - tail) <= 1e-8 * head).any())


def _geometric_rate(ratio: float, g1: int, g2: int) -> float:
    """ρ in (0, 0.99] with (1 − ρ^g2)/(ρ^−g1 − 1) = ratio (bisection; the left side grows with ρ)."""
    f = lambda rho: (1.0 - rho**g2) / (rho**-g1 - 1.0) - ratio  # noqa: E731
    if f(0.99) <= 0:
        return 0.99
    lo, hi = 1e-12, 0.99
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return hi


def _randomized_svd(A, k, l, n_iter, tol, gen, compute_vectors, sketch_dtype, energy) -> Spectrum:
    shape = (int(A.shape[0]), int(A.shape[1]))
    # Work on the wide orientation so the sketch lives on the short side.
    transposed = A.shape[0] > A.shape[1]
    if transposed:
        A = A.T  # (short, long)
    # A float16 copy is of A·c, c a power of two that brings it into float16's range (exact);
    # Q ignores the scale, the Ritz values of the iteration are divided by it.
    scale = half_range_scale(energy) if sketch_dtype == torch.float16 else 1.0
    S_ = A if sketch_dtype in (None, A.dtype) else (A if scale == 1.0 else A * scale).to(sketch_dtype)
    Omega = torch.randn(A.shape[1], l, generator=gen, device=A.device, dtype=A.dtype)  # (long, l)
    Q, _ = _orth((S_ @ Omega.to(S_.dtype)).to(A.dtype))  # (short, long) @ (long, l) -> (short, l)
    eps = torch.finfo(A.dtype).eps  # the estimate's floor: what working precision resolves of σ_k
    conv = _Convergence(k, eps=eps)
    # Low-precision GEMMs put first-order rounding noise (~ a few units of its roundoff)
    # into the Ritz values: iterate in that dtype only until changes reach that noise,
    # then refine in working precision until `tol` holds (the accuracy guard).
    noise = 0.0 if S_ is A else 8 * torch.finfo(S_.dtype).eps
    done = 0
    for _ in range(n_iter):
        W, R = _orth((S_.T @ Q.to(S_.dtype)).to(A.dtype))  # (long, short) @ (short, l) -> (long, l)
        Q, R = _orth((S_ @ W.to(S_.dtype)).to(A.dtype))  # (short, l)
        done += 1
        est = conv.update(_ritz_values(R) / (1.0 if S_ is A else scale))
        if S_ is not A and est == est and est <= max(noise, tol or 0.0):
            S_, conv = A, _Convergence(k, eps=eps)  # the rest (all n_iter without tol, else until tol) in working precision
            continue
        if tol is not None and est == est and est <= tol and done >= 2:
            break
    # Rayleigh–Ritz in working precision: Z = Aᵀ Q = (Qᵀ A)ᵀ.
    Z = A.T @ Q  # (long, short) @ (short, l) -> (long, l)
    W, R = _orth(Z)  # Z = W R, so Qᵀ A = Rᵀ Wᵀ
    P, S, Th = torch.linalg.svd(R.T)  # Rᵀ = P diag(S) Th, (l, l)
    # σ(Qᵀ A) ≥ σ(Qᵀ A W) = σ(R): the final values are at least as converged as the last iterate's,
    # whose estimate therefore stands. (Taking their change as one more step, half a step
    # really, made the estimate 2–7× optimistic on planted-plus-noise and bf16 spectra.)
    # Only a single iterate (nothing to extrapolate) takes the change to the final values.
    est = float("nan") if n_iter == 0 else conv.estimate if conv.estimate == conv.estimate else conv.update(S.double())
    S = S[:k]
    U = Vh = None
    if compute_vectors:
        U = Q @ P[:, :k]  # (short, l) @ (l, k) -> (short, k)
        Vh = (W @ Th[:k].T).T  # (long, l) @ (l, k) -> (k, long)
        if transposed:
            U, Vh = Vh.T, U.T
    complete = k == min(shape)
    return Spectrum(S, energy, shape, "randomized", U=U, Vh=Vh, tolerance=float(est), n_iter=done,
                    complete=complete)


def _check_gap(est: float, tol: float | None, rho: float, weight: float) -> int:
    """Block steps to the next convergence check of :func:`_block_krylov`.

    `weight` is a check's cost relative to a step's (:func:`_check_weight`). While checks
    are cheap, or before a rate ρ is fitted: every other step while the estimate is far
    (> 30·tol), then every step. Once a check costs a third of a step or more and the
    fitted rate ρ shows convergence (below the fit's cap, 0.99): half the steps ρ needs to
    bring `est` to `tol`, 1 to 4, so a check comes no later than the predicted stop and
    the overshoot is at most a few steps. Modelled on the bench's matrices (steps and
    checks counted, each costed at its measured rate): 8–19 % less time for the top 256
    of 4096² planted, bf16 and 1024² spectra, unchanged at k = 64.
    """
    if tol is None or math.isnan(est) or est <= tol:
        return 1
    if weight < 1 / 3 or not 0.0 < rho < 0.99:  # 0.99 is the fit's cap: no convergence seen, nothing to predict
        return 2 if est > 30 * tol else 1
    need = math.log(tol / est) / math.log(rho)
    return max(1, min(4, int(need // 2)))


def _check_weight(short: int, long_: int, b: int, d: int) -> float:
    """A convergence check's cost over a block step's, from their flops and measured rates.

    A check is a symmetric eigen-solve of a d×d matrix (~4/3·d³ flops, ~40 GFLOP/s on
    two cores); a step two products with A (4·short·long·b) and the re-orthogonalisation
    (~6·(short + long)·d·b), ~150 GFLOP/s. On 4096², b = 48: 0.03 at d = 300 and 1.4 at
    d = 1200 (measured 0.1 and 1.4: 57 ms against 40 ms).
    """
    check = 4 / 3 * d**3 / 40.0
    step = (4 * short * long_ * b + 6 * (short + long_) * d * b) / 150.0
    return check / step


def _block_krylov(A, k, b, max_steps, tol, gen, compute_vectors, energy) -> Spectrum:
    """Top-k by :class:`~spectra.linalg.krylov.BlockLanczos`, stopped when the Ritz values converge.

    A check (the eigenvalues of the projection's Gram matrix) costs up to about a step,
    so checks are spaced by :func:`_check_gap`; the convergence model accounts for the
    uneven spacing.
    """
    shape = (int(A.shape[0]), int(A.shape[1]))
    transposed = A.shape[0] > A.shape[1]
    if transposed:
        A = A.T  # (short, long)
    short = A.shape[0]
    # At least ⌈k/b⌉ blocks, whatever n_iter says (k + b ≤ short is guaranteed by the caller).
    lan = BlockLanczos(A, b, gen, max_dim=max((1 + max_steps) * b, -(-k // b) * b), scale=math.sqrt(energy))
    conv = _Convergence(k, monotone=True, eps=torch.finfo(A.dtype).eps)
    est, steps, last_check = float("nan"), 0, 0
    next_check = max(1, math.ceil(k / b))  # first check: enough columns for k values
    while True:
        lan.step()
        steps += 1
        if steps >= next_check or lan.full:
            S = lan.ritz_values()
            est = conv.update(S, steps=steps - last_check)
            last_check = steps
            if (tol is not None and not math.isnan(est) and est <= tol) or lan.full:
                break
            if tol is not None and conv.at_floor >= 2:
                break  # twice under the working precision's resolution of σ_k (> tol): more steps only repeat rounding
            next_check = steps + _check_gap(est, tol, conv.prev_rho, _check_weight(short, A.shape[1], b, lan.d))
    exhausted = lan.full and lan.cap == (short // b) * b  # the space cannot grow inside A
    if (tol is not None and not (est == est and est <= tol) and exhausted) or (
            not exhausted and _multiplicity_unresolved(S, b)):
        # The Krylov space filled the matrix before converging (e.g. σ_k at rounding level), or it
        # holds a value repeated as often as a block can carry: the full decomposition is the honest answer.
        return _full_top(A.T if transposed else A, k, compute_vectors=compute_vectors, energy=energy)
    U = Vh = None
    if compute_vectors:
        U, Vh = lan.vectors(k)  # at working precision; the values stay the float64 ones
        if transposed:
            U, Vh = Vh.T, U.T
    return Spectrum(S[:k].to(A.dtype), energy, shape, "krylov", U=U, Vh=Vh, tolerance=float(est), n_iter=steps,
                    complete=k == min(shape))


# ---------------------------------------------------------------------------- adaptive


def adaptive_svd(
    M: torch.Tensor,
    *,
    energy: float | None = 0.9,
    rtol: float | None = None,
    block_size: int = 32,
    max_rank: int | None = None,
    tol: float = CONVERGED_TOL,
    random_state: int | torch.Generator | None = None,
    compute_vectors: bool = False,
    whole_fallback: bool = False,
) -> Spectrum:
    """Smallest-rank SVD of `M` that captures a requested energy fraction.

    A block Krylov space (:class:`~spectra.linalg.krylov.BlockLanczos`) grows block by
    block; after every block the Ritz values of the space give the smallest k meeting
    the stopping rule, and the run ends once the top-k values have converged to `tol`
    with k inside the space (a margin of max(b/2, d/8) columns) — or, for the energy rule,
    as soon as the remaining error could no longer move k. Because ‖M‖_F² is known
    exactly, the captured fraction Σ_{i≤k} σᵢ² / ‖M‖_F² is exact up to the convergence
    of the σᵢ themselves. When the answer is out of reach — the space would pass
    `max_rank`, a flat tail at the current Ritz values already proves the rank exceeds
    it, or the flops spent reach 15 % of a full decomposition's — it falls back to
    :func:`full_svd`, so it is never much slower than that. A matrix so small that the
    budget does not cover three steps is decomposed fully at once.

    Parameters
    ----------
    M : torch.Tensor, shape (out, in)
    energy : float or None, default 0.9
        Stop at the smallest k with Σ_{i≤k} σᵢ² ≥ energy·‖M‖_F² (the energy rank).
    rtol : float or None
        Alternatively (or additionally; whichever is met first) stop at the smallest k
        with σ_{k+1} ≤ rtol·σ₁, i.e. a rank-k approximation of spectral error ≤ rtol·‖M‖₂.
    block_size : int, default 32
        Krylov block width b (columns added per step).
    max_rank : int, optional
        Largest rank searched before falling back to :func:`full_svd`. Default
        min(out, in) // 4: beyond it a full decomposition is no slower.
    tol : float, default 1e-4
        Relative convergence tolerance of the top-k Ritz values.
    random_state : int, torch.Generator or None
    compute_vectors : bool, default False
    whole_fallback : bool, default False
        After a fall-back without vectors, return every value of the full decomposition
        (``complete``) instead of the top k: they cost nothing more, and the noise-floor
        and Gavish–Donoho ranks, the entropy and the nuclear norm need them all
        (``spectra analyze --method adaptive`` asks for them). With ``compute_vectors``
        the values stay cut at k with their vectors.

    Returns
    -------
    Spectrum
        The top-k values (k = the rank that met the criterion), ``method="adaptive"``
        or ``"adaptive->full"`` after a fall-back, ``tolerance`` the achieved
        convergence estimate of the returned values. A zero matrix gives all its
        min(out, in) values, 0, ``complete`` (as :func:`full_svd` does), at no cost.

    References
    ----------
    .. [1] Halko, Martinsson & Tropp 2011, arXiv:0909.4061, §4.4 (adaptive range finder).
    .. [2] Musco & Musco 2015, arXiv:1504.05477 (randomized block Krylov).
    """
    total = _check_matrix(M)
    r = min(M.shape)
    if energy is None and rtol is None:
        raise ConfigError("adaptive_svd needs a stopping rule: set `energy` (e.g. 0.9) or `rtol`.")
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise ConfigError(f"`energy` must be in (0, 1], got {energy!r}.")
    if rtol is not None and not (0.0 < float(rtol) < 1.0):
        raise ConfigError(f"`rtol` must be in (0, 1), got {rtol!r}.")
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ConfigError(f"`block_size` must be a positive int, got {block_size!r}.")
    if max_rank is None:
        max_rank = max(1, r // 4)
    if not isinstance(max_rank, (int, np.integer)) or not 1 <= max_rank <= r:
        raise ConfigError(f"`max_rank` must be an int in [1, {r}], got {max_rank!r}.")
    if not (0.0 < float(tol) < 1.0):
        raise ConfigError(f"`tol` must be in (0, 1), got {tol!r}.")
    if _is_zero(M, total):  # every σ is 0, so every energy rank is: the whole spectrum is known
        return _zero_spectrum(M, r, method="adaptive", compute_vectors=compute_vectors, work=_work_dtype(M, None))
    gen = _generator(random_state, M.device)
    return _adaptive_svd(M.to(_work_dtype(M, None)), energy, rtol, int(block_size), int(max_rank),
                         float(tol), gen, compute_vectors, total, whole_fallback)


def _stop_rank(s: torch.Tensor, total: float, energy: float | None, rtol: float | None, usable: int) -> int | None:
    """Smallest k ≤ usable meeting a stopping rule on Ritz values `s`, else None."""
    found = []
    s2 = s.double() ** 2
    if energy is not None:
        cum = torch.cumsum(s2, 0)
        hit = torch.nonzero(cum >= energy * total * (1 - 1e-12))
        if hit.numel() and int(hit[0]) + 1 <= usable:
            found.append(int(hit[0]) + 1)
    if rtol is not None:
        hit = torch.nonzero(s[1:] <= rtol * s[0])
        if hit.numel() and int(hit[0]) + 1 <= usable:
            found.append(int(hit[0]) + 1)
    return min(found) if found else None


def _energy_rank_settled(s: torch.Tensor, total: float, energy: float | None, k: int, errors: torch.Tensor | None,
                         rtol: float | None) -> bool:
    """True when the energy rank is k whatever the remaining error of the Ritz values.

    Ritz values are lower bounds (θᵢ ≤ σᵢ), so Σ_{i≤k} θᵢ² ≥ energy·‖M‖_F² already proves
    rank ≤ k; with σᵢ ≤ θᵢ·(1 + 2eᵢ), eᵢ the extrapolated error of θᵢ
    (:attr:`_Convergence.errors`), Σ_{i<k} θᵢ²·(1 + 2eᵢ)² < energy·‖M‖_F² shows rank ≥ k.
    The factor 2 covers the extrapolation's measured shortfall (at least 0.55× the true
    error, :class:`_Convergence`). Each value has its own error: the top ones, which
    carry most of the energy, converge long before σ_k, so one error for all (the
    slowest's) overstated the energy's by 10–100× and held the answer back by two Krylov
    steps on slow power laws (1024², 768×2304: step 8 instead of 6).
    Only the energy rule is settled this way (`rtol` alone waits for `tol`).
    """
    if energy is None or rtol is not None or errors is None or errors.numel() < k - 1:
        return False
    e = errors[: k - 1].double()
    if not bool((e <= 0.025).all()):
        return False  # beyond a few per cent the extrapolation itself is not trusted
    below = float((s[: k - 1].double() ** 2 * (1.0 + 2.0 * e) ** 2).sum())
    return below < energy * total * (1 - 1e-12)


def _rank_lower_bound(s: torch.Tensor, total: float, energy: float, usable: int) -> int:
    """A rank the energy target cannot be met below: every σᵢ beyond ``usable`` is ≤ σ_usable.

    Σ_{i≤k} σᵢ² ≥ energy·total needs at least (energy·total − Σ_{i≤usable} σᵢ²) / σ_usable²
    more values past the first ``usable`` (each adds at most σ_usable²).
    """
    s2 = s[:usable].double() ** 2
    missing = energy * total - float(s2.sum())
    smallest = float(s2[-1]) if s2.numel() else 0.0
    if missing <= 0:
        return usable
    return usable + (int(math.ceil(missing / smallest)) if smallest > 0 else 10**12)


def _adaptive_svd(A, energy, rtol, block, max_rank, tol, gen, compute_vectors, total, whole_fallback) -> Spectrum:
    shape = (int(A.shape[0]), int(A.shape[1]))
    transposed = A.shape[0] > A.shape[1]
    if transposed:
        A = A.T  # (short, long)
    short, long_ = A.shape
    block = min(block, short)
    margin = lambda d: max(block // 2, d // 8)  # noqa: E731  columns kept beyond the answer
    # Flop model: a full spectrum costs the (triangular) Gram product plus a symmetric
    # eigen-solve. A Krylov flop costs ~1.5× a full-spectrum flop in time (smaller GEMMs,
    # the per-step Ritz values), so 15 % of the flops keeps a fall-back within ~1.2× of
    # going full at once (0.2 measured 1.22–1.25× on the bench's worst cases).
    budget = 0.15 * _full_flops(short, long_)
    step_flops = lambda d: _krylov_step_flops(short, long_, block, d)  # noqa: E731  at d columns
    rank_of = lambda v: _stop_rank(v, total, energy, rtol, usable=v.numel()) or v.numel()  # noqa: E731
    if step_flops(block) + step_flops(2 * block) + step_flops(3 * block) > budget:
        # The budget does not cover three steps (a run returns after two at the earliest, when the
        # first block already holds a converged answer): on a matrix this small the steps' fixed
        # costs would only add to the full decomposition that follows (measured 1.3–1.6× on 768×2304).
        return _full_top(A.T if transposed else A, None, compute_vectors=compute_vectors, energy=total,
                         method="adaptive->full", n_iter=0, rank_of=_cut(rank_of, compute_vectors, whole_fallback))
    lan = BlockLanczos(A, block, gen, max_dim=min(short, max_rank + margin(max_rank) + block), scale=math.sqrt(total))
    conv = _Convergence(1, monotone=True, eps=torch.finfo(A.dtype).eps)
    spent, steps, k = 0.0, 0, None
    while not lan.full and spent <= budget:
        lan.step()
        steps += 1
        spent += step_flops(lan.d)
        S = lan.ritz_values()
        usable = lan.d - margin(lan.d)
        k = _stop_rank(S, total, energy, rtol, usable)
        if k is None:
            if energy is not None and _rank_lower_bound(S, total, energy, usable) > max_rank:
                break  # even a flat tail at σ_usable needs more than the cap: go full now
            conv.k = usable
            conv.update(S)
            continue
        if k > max_rank:
            break
        conv.k = k
        est = conv.update(S)
        if est == est and (est <= tol or _energy_rank_settled(S, total, energy, k, conv.errors, rtol)):
            if _multiplicity_unresolved(S, lan.b):
                break  # copies of a repeated σ may be missing from the space: go full
            U = Vh = None
            if compute_vectors:
                U, Vh = lan.vectors(k)
                if transposed:
                    U, Vh = Vh.T, U.T
            return Spectrum(S[:k].to(A.dtype), total, shape, "adaptive", U=U, Vh=Vh, tolerance=float(est),
                            n_iter=steps, complete=k == min(shape))
    # Fall back: one full decomposition, truncated at the stopping rank (but with `whole_fallback`)
    return _full_top(A.T if transposed else A, None, compute_vectors=compute_vectors, energy=total,
                     method="adaptive->full", n_iter=steps, rank_of=_cut(rank_of, compute_vectors, whole_fallback))


def _cut(rank_of, compute_vectors: bool, whole: bool):
    """The fall-back's cut: at the stopping rank, but for `whole` values-only runs (every value kept)."""
    return None if whole and not compute_vectors else rank_of


# ---------------------------------------------------------------------------- auto


def spectrum(
    M: torch.Tensor,
    *,
    method: Literal["auto", "full", "randomized", "adaptive"] = "auto",
    n_components: int | None = None,
    energy: float | None = None,
    compute_vectors: bool = False,
    random_state: int | torch.Generator | None = 0,
    full_below: int = 1024,
) -> Spectrum:
    """Spectrum of `M` by the path that suits its shape and the request.

    ``method="auto"`` takes the full spectrum when min(out, in) ≤ `full_below` or when
    nothing narrower is asked for (no `n_components`, no `energy`), or when
    `n_components` > min(out, in) / 8 (randomized would not be faster); the adaptive
    path when only `energy` is given; otherwise the randomized block Krylov top-k, run
    until its values converge to 1e-4 (``method="randomized"`` takes that path too). The
    path taken is recorded in ``Spectrum.method`` (``"krylov"`` for the last).

    Parameters
    ----------
    M : torch.Tensor, shape (out, in)
    method : {"auto", "full", "randomized", "adaptive"}
    n_components : int, optional
        Top-k wanted (randomized).
    energy : float, optional
        Energy fraction wanted (adaptive).
    compute_vectors : bool, default False
    random_state : int, torch.Generator or None, default 0
    full_below : int, default 1024
        Short side at or below which a full decomposition is used by ``"auto"``: small
        matrices decompose in well under a second.

    Returns
    -------
    Spectrum
    """
    _check_shape(M)  # the path taken validates the values
    if method not in ("auto", "full", "randomized", "adaptive"):
        raise ConfigError(f"`method` must be one of auto, full, randomized, adaptive; got {method!r}.")
    r = min(M.shape)
    if method == "auto":
        if r <= full_below or (n_components is None and energy is None):
            method = "full"
        elif n_components is not None:
            method = "full" if n_components > r / 8 else "randomized"
        else:
            method = "adaptive"
    if method == "full":
        return full_svd(M, compute_vectors=compute_vectors)
    if method == "randomized":
        if n_components is None:
            raise ConfigError("method='randomized' needs `n_components`.")
        return randomized_svd(M, n_components, compute_vectors=compute_vectors, random_state=random_state,
                              tol=CONVERGED_TOL)  # block Krylov until the top-k values converge
    return adaptive_svd(M, energy=0.9 if energy is None else energy, compute_vectors=compute_vectors,
                        random_state=random_state)
