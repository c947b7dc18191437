"""Block Golub–Kahan–Lanczos bidiagonalisation: the engine of spectra's Krylov SVD paths.

:class:`BlockLanczos` grows orthonormal bases U (short side) and V (long side) of a
block Krylov space of a wide matrix A, one block of b columns per :meth:`~BlockLanczos.step`,
with full re-orthogonalisation (classical Gram–Schmidt: see :func:`reorthogonalize`). With

    A Vⱼ = Σ_{i<j} Uᵢ Cᵢⱼ + Uⱼ Lⱼ,        Aᵀ Uⱼ = Σ_{i≤j} Vᵢ (…) + Vⱼ₊₁ Rⱼ,

the projection Uᵀ A [V, Vⱼ₊₁] is held exactly as the coefficients themselves (block
upper-bidiagonal), so the Ritz values σ(Uᵀ A) of the space built so far cost one small
SVD after any step — no extra product with A. The convergence policy (when to stop,
which values matter) belongs to the callers in :mod:`spectra.linalg.svd`.

References
----------
.. [1] G. H. Golub, F. T. Luk, M. L. Overton, "A block Lanczos method for computing the
   singular values and corresponding singular vectors of a matrix", ACM TOMS 7(2), 1981.
.. [2] C. Musco, C. Musco, "Randomized block Krylov methods for stronger and faster
   approximate singular value decomposition", NeurIPS 2015, arXiv:1504.05477.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from spectra.linalg.lapack import gram_singular_values

__all__ = ["BlockLanczos", "krylov_block", "reorthogonalize"]


def reorthogonalize(Y: torch.Tensor, basis: torch.Tensor, last: int) -> torch.Tensor:
    """Make Y (n, b) ⊥ the orthonormal `basis` (n, d) in place; return the coefficients (d, b).

    In exact arithmetic a new Krylov block has components along the newest `last` basis
    columns only; they are large and removed first by a local pass (n·last·b work). One
    full classical Gram–Schmidt pass over the whole basis then removes what rounding
    left along every column, and is repeated while it still cancels (a column shrinks
    below 1/√2 of its norm: Kahan–Parlett's "twice is enough" test), which restores
    orthogonality to working precision. Against two full passes every step, this halves
    the re-orthogonalisation work, the dominant overhead of a wide Krylov space.
    """
    coef = basis.new_zeros(basis.shape[1], Y.shape[1])  # (d, b)
    if last:
        newest = basis[:, -last:]
        local = newest.T @ Y
        Y.addmm_(newest, local, alpha=-1)  # in place in Y's layout (no temporary, no transposing subtraction)
        coef[-last:] += local
    for _ in range(3):
        before = torch.linalg.vector_norm(Y, dim=0)
        c = basis.T @ Y
        Y.addmm_(basis, c, alpha=-1)
        coef += c
        if bool((torch.linalg.vector_norm(Y, dim=0) >= before / math.sqrt(2)).all()):
            break
    return coef


def krylov_block(k: int, r: int) -> int:
    """Default block width for the top-k of a matrix with short side r: clip(max(3k/16, min(k/4, 48)), 32, 128).

    A narrower block builds a higher-degree Krylov space for the same accuracy (624 instead
    of 704 columns for the top 256 of a slow power law on 4096²) but runs slower GEMMs:
    measured on 4096² and 4096×11008 at k = 256, width 48 took 0.87–0.92× the time of 64
    on the power law and met 1e-3 on planted, power-law and bf16 spectra, while width 32
    let the convergence estimate stop at 3–8× the requested error on the planted and bf16
    ones. At k = 512 on 4096², 96 against 128 (two alternating runs): 0.89–0.93× the time on
    the bf16 and planted spectra, 0.70× and 1.24× on the power law, within 1e-3 on all. So
    the width is 3k/16 but never below min(k/4, 48) (below k = 192 that is the k/4 rule it
    replaced), and always within [32, 128].
    """
    return max(1, min(r, max(32, min(128, max(3 * k // 16, min(k // 4, 48))))))


class BlockLanczos:
    """Block Krylov bases of a wide matrix A (short, long), grown one block at a time.

    Parameters
    ----------
    A : torch.Tensor, shape (short, long)
        Float32 or float64, short ≤ long.
    b : int
        Block width.
    gen : torch.Generator
        Draws the Gaussian start block (long, b).
    max_dim : int
        Most columns of U (≤ short).
    scale : float, optional
        ‖A‖_F when known (else computed): sets the size below which a new direction counts
        as rounding (8·eps·‖A‖_F·√long) and is replaced by a random one.
    times : callable, optional
        ``times(X, transpose)`` → A X, or Aᵀ X, in the dtype of X: the bases then take
        `dtype`. For an A stored below the working precision (a float32 A under float64
        bases, multiplied by row blocks up-cast: no float64 copy of A).
    dtype : torch.dtype, optional
        Of the bases, the products and the Ritz vectors (with `times`; default A's).

    Notes
    -----
    The bases are stored transposed, one row per basis vector (:attr:`U` and :attr:`V` are
    column-major views of them), so a block is a contiguous run of rows. Storage is sized
    for `max_dim` columns but a run touches only the pages of the blocks it builds: with
    column blocks of a row-major (short, cap) buffer every block write had touched nearly
    every page of it (18.4k minor page faults a run on the 4096² power law at k = 256, in a
    fresh process; ~2 µs each on the project's machine). QR's column-major Q is copied into
    a block without transposing, and Aᵀ Uⱼ needs no row-major copy of Uⱼ. With the Ritz
    vectors from the Gram matrix (:meth:`vectors`), that run took 0.973× the time of the
    row-major layout and the float32 SVD of P (two threads, nine interleaved runs each, no
    page faults in either: 440 against 453 ms).
    """

    def __init__(self, A: torch.Tensor, b: int, gen: torch.Generator, max_dim: int, scale: float | None = None,
                 times: Callable[[torch.Tensor, bool], torch.Tensor] | None = None, dtype: torch.dtype | None = None):
        short, long_ = A.shape
        self.A, self.b, self.gen = A, b, gen
        self.times = times
        self.dtype = A.dtype if dtype is None else dtype
        # Below this a new direction is rounding of A's action, not part of it (‖A‖_F·eps·√long).
        scale = float(torch.linalg.vector_norm(A)) if scale is None else scale
        self.tiny = 8 * torch.finfo(self.dtype).eps * scale * max(1.0, long_ ** 0.5)
        self.cap = max(b, (min(max_dim, short) // b) * b)
        self.d = 0  # columns of U so far
        # Uᵀ and Vᵀ, filled block by block (rows; no re-concatenation)
        self._Ut = torch.empty(self.cap, short, dtype=self.dtype, device=A.device)
        self._Vt = torch.empty(min(long_, self.cap + b), long_, dtype=self.dtype, device=A.device)
        start = torch.randn(long_, b, generator=gen, device=A.device, dtype=self.dtype)
        self._Vt[:b] = torch.linalg.qr(start)[0].T
        # Uᵀ A [V, V_next]; left uninitialised (pages are touched only as blocks arrive), every
        # entry that projection() reads is written by step(), zeros included.
        self.B = torch.empty(self.cap, self.cap + b, dtype=torch.float64, device=A.device)
        self._explicit: torch.Tensor | None = None
        # P Pᵀ of the final column blocks of B (float32 bases): see ritz_values
        self._gram: torch.Tensor | None = None
        self._gram_done = 0  # columns of B summed into _gram

    @property
    def U(self) -> torch.Tensor:
        """The short-side basis storage, (short, cap), a column-major view: its first :attr:`d` columns are built."""
        return self._Ut.T

    @property
    def V(self) -> torch.Tensor:
        """The long-side basis storage, (long, ≤ cap + b), a column-major view: its first d + b columns are built."""
        return self._Vt.T

    @property
    def full(self) -> bool:
        """No room for another block."""
        return self.d + self.b > self.cap

    def step(self) -> None:
        """Add one block to U (and the next one to V)."""
        A, b, d, times = self.A, self.b, self.d, self.times
        Y = self._times(self._Vt[d:d + b], False)  # (short, long) @ (long, b) -> (short, b)
        if d:
            self.B[:d, d:d + b] = reorthogonalize(Y, self.U[:, :d], b).double()  # A Vⱼ = Σ Uᵢ Cᵢⱼ + …
        U, L = self._orthonormal(Y, self.U[:, :d])  # (short, b), (b, b)
        self._Ut[d:d + b] = U.T
        self.B[d:d + b, :d] = 0.0  # A Vᵢ ⊥ Uⱼ for i < j: below the block diagonal
        self.B[d:d + b, d:d + b] = L.double()
        self.d = d = d + b
        if d + b <= self._Vt.shape[0]:
            Z = self._times(self._Ut[d - b:d], True)  # (long, short) @ (short, b) -> (long, b)
            Vc = self.V[:, :d]
            reorthogonalize(Z, Vc, b)  # Aᵀ Uⱼ lies along Vⱼ (the newest block) and Vⱼ₊₁
            Q, R = self._orthonormal(Z, Vc)  # Aᵀ Uⱼ = … + Vⱼ₊₁ Rⱼ, so Uⱼᵀ A Vⱼ₊₁ = Rⱼᵀ
            self._Vt[d:d + b] = Q.T
            self.B[:d - b, d:d + b] = 0.0  # only the newest U block sees Vⱼ₊₁ (until the next step's C)
            self.B[d - b:d, d:d + b] = R.T.double()
            self._explicit = None
        else:
            # The space has (nearly) filled the long side: project explicitly, exactly.
            UtA = self._Ut[:d] @ A if times is None else times(self.U[:, :d], True).T
            self._explicit = UtA.double()  # (d, long)

    def _times(self, Xt: torch.Tensor, transpose: bool) -> torch.Tensor:
        """A X, or Aᵀ X, for X = Xtᵀ given by its rows Xt (c, n), as (n', c).

        The operand order is MKL's fastest, measured on two threads: float32 A X with X a
        column-major view (as A Xtᵀ), 27 ms where (Xt Aᵀ)ᵀ took 32 (4096×11008, b = 48; equal
        to a row-major X); float64 (Xt Aᵀ)ᵀ and (Xt A)ᵀ, both operands row-major, 9 and 10 ms
        where A X and Aᵀ X took 15 and 26 with a row-major X, and Aᵀ X 105 with a column-major
        one (2048×5632, b = 32).
        """
        if self.times is not None:
            return self.times(Xt.T, transpose)
        A = self.A
        if A.dtype == torch.float64:
            return (Xt @ A).T if transpose else (Xt @ A.T).T  # column-major (n', c)
        return A.T @ Xt.T if transpose else A @ Xt.T  # row-major (n', c)

    def _orthonormal(self, Y: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Q (n, b) orthonormal and ⊥ `basis`, and C (b, b) with Y = Q C, for Y already ⊥ `basis`.

        QR, unless Y is rank-deficient (exactly zero rows or columns of A, or a space larger
        than A's rank): then QR would pad Q with unit vectors that are not ⊥ `basis`, and the
        bases would stop being orthonormal. Instead Q takes an orthonormal basis of Y's range
        (SVD) and fresh random directions ⊥ everything for the rest, with zero coefficients.
        """
        Q, C = torch.linalg.qr(Y)
        if bool((C.diagonal().abs() > self.tiny).all()):
            return Q, C
        P, S, Wh = torch.linalg.svd(Y, full_matrices=False)  # (n, b), (b,), (b, b)
        r = int((S > self.tiny).sum())
        kept = torch.cat([basis, P[:, :r]], 1)
        X = torch.randn(Y.shape[0], Y.shape[1] - r, generator=self.gen, device=Y.device, dtype=Y.dtype)
        for _ in range(2):
            X -= kept @ (kept.T @ X)
        Q = torch.cat([P[:, :r], torch.linalg.qr(X)[0]], 1)
        C = torch.cat([S[:r, None] * Wh[:r], Y.new_zeros(Y.shape[1] - r, Y.shape[1])], 0)
        return Q, C

    def projection(self) -> torch.Tensor:
        """Uᵀ A restricted to the V basis: float64 (d, d + b), or (d, long) when explicit."""
        if self._explicit is not None:
            return self._explicit
        return self.B[:self.d, :self.d + self.b]

    def ritz_values(self) -> torch.Tensor:
        """σ(Uᵀ A), float64, descending: lower bounds of the top-d singular values of A.

        For float32 bases, as square roots of the eigenvalues of the float64 Gram P Pᵀ of the
        small projection P (in-place MKL ``syevd``, 1.4× faster than its SVD at d = 700,
        the dominant overhead of wide spaces): relative error ≲ 1e-8·(σ₁/σᵢ)², below A's
        own float32 resolution for every σᵢ ≥ 1e-4·σ₁. For float64 bases, the SVD of P.
        """
        P = self.projection()
        if self.dtype != torch.float32:
            return torch.linalg.svdvals(P)
        if self._explicit is not None:
            return gram_singular_values(P @ P.T)
        return gram_singular_values(self._projection_gram())

    def _projection_gram(self) -> torch.Tensor:
        """P Pᵀ (d, d) of the block projection P, summed over column blocks as they become final.

        A column block of B is final once the step that adds its U block has written it
        (rows below are zero by construction); only the newest one (Rⱼᵀ, rows d − b … d) is
        rewritten by the next step. So each column block is added once, as a rank-b update
        of the Gram matrix kept between checks (2·d²·b flops), instead of the whole product
        (2·d²·(d + b)) at every check: 31 → ~3 ms at d = 1200, b = 48, a third of a check.
        The price is memory: the (cap, cap) float64 matrix is held for the run, and each check
        copies its d×d corner (15 MiB at d = 1400; 128 MiB for a 4096-column space).
        """
        d, b = self.d, self.b
        if self._gram is None:
            # float64 (cap, cap), left uninitialised: each stripe is zeroed as its block arrives
            self._gram = torch.empty(self.cap, self.cap, dtype=torch.float64, device=self.B.device)
        G = self._gram
        for c in range(self._gram_done, d, b):
            e = c + b
            G[c:e, :e] = 0.0  # earlier column blocks have no rows here
            G[:c, c:e] = 0.0
            col = self.B[:e, c:e]
            G[:e, :e].addmm_(col, col.T)
        self._gram_done = d
        out = G[:d, :d].clone()
        tail = self.B[d - b:d, d:d + b]  # Uⱼᵀ A Vⱼ₊₁ = Rⱼᵀ: the only non-zero rows of the newest column block
        out[d - b:, d - b:].addmm_(tail, tail.T)
        return out

    def vectors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k Ritz vectors at the bases' precision: U (short, k), Vh (k, long).

        For float32 bases, from the float64 Gram matrix P Pᵀ that the checks keep (see
        :meth:`_projection_gram`): its top-k eigenvectors W are the left singular vectors of
        P, and Wᵀ P / θ the right ones. Eigenvectors of P Pᵀ err by ~eps64·(θ₁/θᵢ)²/gap, below
        float32's eps·(θ₁/θᵢ)/gap for every θᵢ ≥ 1e-4·θ₁ (on the 4096² power law at k = 256:
        2e-8 from P's float64 SVD, against 7e-7 for the float32 SVD of P it replaces, in 0.8×
        its time: 43 against 53 ms on one thread). Where θₖ < 1e-4·θ₁, and for float64 bases
        or an explicit projection, the SVD of P at the bases' precision.
        """
        if self.dtype == torch.float32 and self._explicit is None:
            lam, W = torch.linalg.eigh(self._projection_gram())  # ascending
            theta = lam[-k:].flip(0).clamp(min=0.0).sqrt()  # (k,)
            if float(theta[-1]) >= 1e-4 * float(theta[0]) > 0.0:
                W = W[:, -k:].flip(1)  # (d, k)
                Th = (W.T @ self.projection()) / theta[:, None]  # (k, d) @ (d, d + b) -> (k, d + b)
                U = self.U[:, :self.d] @ W.to(self.dtype)  # (short, k)
                return U, Th.to(self.dtype) @ self._Vt[:self.d + self.b]  # (k, long)
        P, _, Th = torch.linalg.svd(self.projection().to(self.dtype), full_matrices=False)
        U = self.U[:, :self.d] @ P[:, :k]  # (short, k)
        if self._explicit is not None:
            return U, Th[:k]
        return U, Th[:k] @ self._Vt[:self.d + self.b]  # (k, long)
