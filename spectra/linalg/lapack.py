"""Symmetric eigenvalues in place, through the LAPACK that torch itself links.

``torch.linalg.eigvalsh`` copies its input before LAPACK overwrites it. For the
full-spectrum Gram route that copy is the largest allocation of all: the float64 Gram
matrix of a square float32 ΔW is already twice the size of ΔW, so the copy takes the
peak from 2× to 4× the input. Calling the same routine torch would call (``dsyevd``,
MKL's on x86 builds) on the Gram matrix's own buffer keeps the peak at the Gram matrix.

Where torch's library does not export LAPACK symbols, or is not the MKL build (Linux
x86-64), :func:`eigvalsh_` returns None and the caller takes ``torch.linalg.eigvalsh``.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys
from pathlib import Path

import torch

__all__ = ["eigvalsh_", "gram_singular_values"]

_INT = ctypes.c_int  # LP64 interface (dsyevd_); the ILP64 one is dsyevd_64_


@functools.lru_cache(maxsize=1)
def _dsyevd():
    """torch's own ``dsyevd_`` as a ctypes function, or None where it is not exported.

    Only on Linux x86-64, where torch links MKL (whose Fortran interface takes no hidden
    string-length arguments); elsewhere the copying ``torch.linalg.eigvalsh`` is used.
    """
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        lib.mkl_get_max_threads  # MKL's own symbol: this LAPACK is MKL's
        fn = lib.dsyevd_
    except (OSError, AttributeError):
        return None
    ptr = ctypes.c_void_p
    fn.restype = None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_INT), ptr, ctypes.POINTER(_INT), ptr, ptr,
                   ctypes.POINTER(_INT), ptr, ctypes.POINTER(_INT), ctypes.POINTER(_INT)]
    return fn


def eigvalsh_(G: torch.Tensor, *, lower: bool = True) -> torch.Tensor | None:
    """Eigenvalues (ascending, float64) of the symmetric matrix held in one triangle of `G`, computed in place.

    `G` is overwritten (its contents are undefined afterwards). Only its `lower`
    (row-major) triangle is read, like ``torch.linalg.eigvalsh(G, UPLO="L")``.

    Parameters
    ----------
    G : torch.Tensor, shape (n, n), float64, contiguous, on the CPU
    lower : bool, default True
        Which triangle of the row-major `G` holds the matrix.

    Returns
    -------
    torch.Tensor, shape (n,), or None
        None when the in-place route is unavailable here (no exported LAPACK, another
        dtype/device/layout); `G` is then untouched.

    Raises
    ------
    torch.linalg.LinAlgError
        LAPACK did not converge (as ``torch.linalg.eigvalsh`` would raise).
    """
    fn = _dsyevd()
    if (fn is None or G.dtype != torch.float64 or G.device.type != "cpu" or G.dim() != 2
            or G.shape[0] != G.shape[1] or not G.is_contiguous() or G.shape[0] == 0):
        return None
    n = int(G.shape[0])
    # LAPACK is column-major: the row-major lower triangle is its upper triangle.
    uplo = b"U" if lower else b"L"
    w = torch.empty(n, dtype=torch.float64)
    size, info = _INT(n), _INT(0)
    query, iquery = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.int32)
    lwork, liwork = _INT(-1), _INT(-1)
    fn(b"N", uplo, ctypes.byref(size), G.data_ptr(), ctypes.byref(size), w.data_ptr(), query.data_ptr(),
       ctypes.byref(lwork), iquery.data_ptr(), ctypes.byref(liwork), ctypes.byref(info))
    if info.value != 0:
        return None
    work = torch.empty(max(2 * n + 1, int(query[0])), dtype=torch.float64)
    iwork = torch.empty(max(1, int(iquery[0])), dtype=torch.int32)
    lwork, liwork = _INT(work.numel()), _INT(iwork.numel())
    fn(b"N", uplo, ctypes.byref(size), G.data_ptr(), ctypes.byref(size), w.data_ptr(), work.data_ptr(),
       ctypes.byref(lwork), iwork.data_ptr(), ctypes.byref(liwork), ctypes.byref(info))
    if info.value != 0:
        raise torch.linalg.LinAlgError(
            f"dsyevd did not converge on a {n}×{n} symmetric matrix (info={info.value}). Its entries are finite "
            "(checked before), so they are likely badly scaled: rescale the matrix, or take its singular values "
            "with full_svd(M, compute_vectors=True) (LAPACK gesdd).")
    return w


def gram_singular_values(G: torch.Tensor, *, lower: bool = True) -> torch.Tensor:
    """σ of a matrix from its float64 Gram matrix G (= M Mᵀ), descending: √ of G's eigenvalues.

    In place on G where :func:`eigvalsh_` can (G is then overwritten), else through
    ``torch.linalg.eigvalsh`` reading the same triangle. Rounding-level negative
    eigenvalues are clipped to 0. Squaring the condition number costs σᵢ a relative
    error ~eps·(σ₁/σᵢ)²: ≲ 1e-8 in float64 for every σᵢ ≥ 1e-4·σ₁.
    """
    lam = eigvalsh_(G, lower=lower)
    if lam is None:
        lam = torch.linalg.eigvalsh(G, UPLO="L" if lower else "U")
    return lam.flip(0).clamp_(min=0.0).sqrt_()
