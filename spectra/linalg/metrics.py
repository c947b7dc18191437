"""Numbers from a spectrum: the ranks, thresholds and fits that decide a LoRA rank.

Every metric takes either a :class:`~spectra.linalg.svd.Spectrum` or a 1-D tensor of
singular values in descending order. With a bare tensor the values are taken to be the
whole spectrum unless ``total_energy`` (= ‖M‖_F²) says otherwise; a truncated
Spectrum carries its exact ‖M‖_F², so energy-based metrics stay exact on top-k values.
Metrics that need the whole spectrum (entropy rank, nuclear norm, the median for
Gavish–Donoho with unknown noise) say how they treat truncated input.

Scale: the ratios (energy ranks, effective, stable and nuclear/Frobenius ranks,
participation ratio) are computed from σᵢ/σ₁ and ‖M‖_F²/σ₁², so they are the same for a
spectrum at 1e-150 or 1e+150 (where σᵢ² or σᵢ⁴ would underflow or overflow float64).
The zero spectrum (σ₁ = 0) gives 0 for each of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

from spectra.errors import ConfigError
from spectra.linalg.svd import Spectrum

__all__ = [
    "energy_rank", "energy_ranks", "effective_rank", "stable_rank", "participation_ratio",
    "nuclear_frobenius_ratio", "GavishDonoho", "gd_known_threshold", "gd_lambda_star", "gd_omega", "gd_omega_approx",
    "marchenko_pastur_median", "marchenko_pastur_cdf", "gavish_donoho", "GD_MIN_SHORT_SIDE", "NoiseFloor", "rounding_noise_floor", "ulp", "BASE_ROUNDING",
    "residual_variance", "counts_base_rounding",
    "DecayFit", "decay_fit", "relative_update_size",
]

_SIGNIFICAND_BITS = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11, torch.float64: 53}
_MIN_NORMAL_EXP = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14, torch.float64: -1022}
# Whether the base's rounding is in ΔW: decided from ΔW's residual ("auto"), or said by the user.
BASE_ROUNDING = ("auto", "counted", "exact")


# ---------------------------------------------------------------------------- input


class _Values(NamedTuple):
    """A validated spectrum; `unit` and `energy` are scale-free (squares stay in float64's range)."""

    v: np.ndarray  # σ, float64, descending
    unit: np.ndarray  # σ / σ₁ (σ itself when σ₁ = 0)
    energy: float  # ‖M‖_F² / σ₁² (‖M‖_F² when σ₁ = 0)
    complete: bool  # the values are the whole spectrum


def _values(s, total_energy: float | None = None) -> _Values:
    """σ (float64 numpy, descending), σ/σ₁, ‖M‖_F²/σ₁² and completeness from a Spectrum or a tensor.

    Energies are taken relative to σ₁² from the start: σᵢ² of a spectrum at 1e+200, or
    σᵢ⁴ at 1e-100, are outside float64's range.
    """
    if isinstance(s, Spectrum):
        v = s.values.detach().double().cpu().numpy()
        return _normalised(v, float(s.total_energy if total_energy is None else total_energy), s.complete)
    if isinstance(s, torch.Tensor):
        v = s.detach().double().cpu().numpy()
    elif isinstance(s, np.ndarray):
        v = s.astype(np.float64)
    else:
        raise ConfigError(f"expected a Spectrum or a 1-D tensor of singular values, got {type(s).__name__}.")
    if v.ndim != 1 or v.size == 0:
        raise ConfigError(f"singular values must be a non-empty 1-D array, got shape {v.shape}.")
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ConfigError("singular values must be finite and non-negative.")
    if np.any(np.diff(v / v[0]) > 1e-12) if v[0] > 0 else np.any(v > 0):
        raise ConfigError("singular values must be sorted in descending order.")
    if total_energy is None:
        return _normalised(v, None, True)
    out = _normalised(v, float(total_energy), True)
    held = float(np.sum(out.unit * out.unit))
    if out.energy < held * (1 - 1e-6):
        raise ConfigError(f"`total_energy`={total_energy} is below Σσᵢ² of the values given "
                          f"({held:.9g}·σ₁², σ₁ = {v[0]:.6g}).")
    return out._replace(complete=out.energy <= held * (1 + _slack(s)))  # all of it, up to the values' rounding


def _normalised(v: np.ndarray, total_energy: float | None, complete: bool) -> _Values:
    """v with σ/σ₁ and ‖M‖_F²/σ₁² (Σ(σ/σ₁)² when `total_energy` is None), divided twice so σ₁² never forms."""
    top = float(v[0]) if v.size else 0.0
    unit = v / top if top > 0 else v
    if total_energy is None:
        energy = float(np.sum(unit * unit))
    else:
        energy = total_energy / top / top if top > 0 else float(total_energy)
    return _Values(v, unit, energy, complete)


def _check_tau(tau: float) -> float:
    if not (0.0 < float(tau) <= 1.0):
        raise ConfigError(f"`tau` must be in (0, 1], got {tau!r}.")
    return float(tau)


# ---------------------------------------------------------------------------- ranks


def energy_rank(s, tau: float = 0.9, *, total_energy: float | None = None) -> int | None:
    """Smallest k with Σ_{i≤k} σᵢ² ≥ τ·‖M‖_F².

    Parameters
    ----------
    s : Spectrum or torch.Tensor, shape (k,)
        Singular values, descending.
    tau : float in (0, 1], default 0.9
        At τ = 1, a tail of values whose energies sum to under a rounding share of the
        total is left out (rounding, not rank): 1e-12 for a complete spectrum, 4·eps(float32)
        for float32 values measured against a separate ‖M‖_F².
    total_energy : float, optional
        ‖M‖_F² when `s` is a truncated tensor (a Spectrum carries it).

    Returns
    -------
    int or None
        The energy rank (0 for the zero matrix); ``None`` when the values held capture
        less than τ of the total, i.e. the rank exceeds the k computed (use a larger k or
        :func:`~spectra.linalg.svd.adaptive_svd`).

    Notes
    -----
    The definition used throughout the low-rank literature; e.g. the "energy"
    criterion of truncated-SVD LoRA extraction. Exact for truncated values, because
    the denominator is the exact ‖M‖_F².
    """
    x = _values(s, total_energy)
    return _energy_rank(x.unit, x.energy, _check_tau(tau), _slack(s), x.complete)


def _energy_rank(v: np.ndarray, total: float, tau: float, slack: float = 1e-12, complete: bool = False) -> int | None:
    """On σ/σ₁ and ‖M‖_F²/σ₁² (any common scale): 0 for the zero matrix.

    A complete spectrum is measured against its own Σσᵢ², which differs from the exact
    ‖M‖_F² only by the values' rounding, less a 1e-12 share: so τ = 1 stops where the values
    left hold under 1e-12 of the energy (e^(−0.3i), i < 73, in float64: 47, not 73). A float32
    spectrum's rounding-level tail (σ ~ 1e-7·σ₁ of an exactly rank-5 product) holds a share
    that grows with the matrix: under the cut to about 1024² (τ = 1 gives 5), above it at LLM
    sizes (6e-12 at 2048×8192, where τ = 1 gives 12). τ = 1 is a rank of the values as held,
    not a numerical rank (:func:`~spectra.linalg.subspace.numerical_rank`). A partial one is
    measured against ‖M‖_F², less `slack`.
    """
    if total == 0.0:
        return 0
    cum = np.cumsum(v * v)
    if complete and cum[-1] > 0:
        total, slack = float(cum[-1]), 1e-12
    hit = np.nonzero(cum >= tau * total * (1 - slack))[0]
    if hit.size:
        return int(hit[0]) + 1
    return int(np.count_nonzero(v)) if complete else None  # every value held: τ near 1 is the last nonzero one


def _slack(s) -> float:
    """Relative shortfall of Σσᵢ² against ‖M‖_F² that the values' own rounding explains.

    ‖M‖_F² is exact (float64); the top values of a float32 spectrum square and sum to their
    share of it only within their rounding, 2⁻²⁴ relative per σᵢ², so 4·eps(float32) ≈ 5e-7
    (it was 1e-5, which put ~0.4 % of random float32 ranks at τ = 0.9–0.99 one too low).
    """
    values = s.values if isinstance(s, Spectrum) else s
    return 1e-12 if getattr(values, "dtype", None) in (torch.float64, np.float64) else _FLOAT32_SLACK


_FLOAT32_SLACK = 4 * float(np.finfo(np.float32).eps)


def energy_ranks(s, taus=(0.5, 0.9, 0.95, 0.99), *, total_energy: float | None = None) -> dict[float, int | None]:
    """:func:`energy_rank` at several τ, as ``{τ: rank}`` (``None`` where beyond the k held)."""
    x = _values(s, total_energy)
    slack = _slack(s)
    return {float(t): _energy_rank(x.unit, x.energy, _check_tau(t), slack, x.complete) for t in taus}


def effective_rank(s) -> float:
    """Entropy effective rank exp(−Σ pᵢ ln pᵢ), pᵢ = σᵢ / Σσⱼ.

    Parameters
    ----------
    s : Spectrum or torch.Tensor, shape (r,)
        The whole spectrum. On a truncated Spectrum the value is the effective rank of
        the top-k part alone (≤ k), which underestimates that of the whole matrix.

    Returns
    -------
    float
        1 ≤ erank ≤ number of nonzero σ (0.0 for the zero matrix).

    References
    ----------
    .. [1] O. Roy and M. Vetterli, "The effective rank: a measure of effective
       dimensionality", EUSIPCO 2007. (σ, not σ², is normalised.)
    """
    u = _values(s).unit
    total = u.sum()
    if total == 0.0:
        return 0.0
    p = u[u > 0] / total
    return float(math.exp(-np.sum(p * np.log(p))))


def stable_rank(s, *, total_energy: float | None = None) -> float:
    """Stable (numerical) rank ‖M‖_F² / ‖M‖₂² = Σσᵢ² / σ₁².

    Exact from the top value alone when ‖M‖_F² is known (a Spectrum carries it);
    0.0 for the zero matrix.

    References
    ----------
    .. [1] M. Rudelson and R. Vershynin, "Sampling from large matrices: an approach
       through geometric functional analysis", J. ACM 54(4), 2007.
    """
    x = _values(s, total_energy)
    return 0.0 if x.v[0] == 0 else float(x.energy)  # ‖M‖_F²/σ₁², formed without σ₁²


def participation_ratio(s, *, total_energy: float | None = None) -> float:
    """Participation ratio of the energies λᵢ = σᵢ²: (Σλᵢ)² / Σλᵢ².

    On truncated values Σλᵢ² misses the tail, so the result is an upper bound (tight
    when the tail is small, since the tail enters squared). 0.0 for the zero matrix.

    References
    ----------
    .. [1] P. Gao, E. Trautmann, B. Yu et al., "A theory of multineuronal dimensionality,
       dynamics and measurement", bioRxiv 214262, 2017 (participation ratio of a
       covariance spectrum).
    """
    x = _values(s, total_energy)
    sq = float(np.sum(x.unit**4))  # on σ/σ₁: σ⁴ underflows float64 at σ ~ 1e-80
    return 0.0 if sq == 0 else float(x.energy**2 / sq)


def nuclear_frobenius_ratio(s) -> float:
    """‖M‖_* / ‖M‖_F = Σσᵢ / √(Σσᵢ²), in [1, √rank].

    Needs the whole spectrum; on a truncated Spectrum it is that of the top-k part.
    0.0 for the zero matrix.

    References
    ----------
    .. [1] B. Recht, M. Fazel, P. Parrilo, "Guaranteed minimum-rank solutions of linear
       matrix equations via nuclear norm minimization", SIAM Review 52(3), 2010
       (the ratio squared lower-bounds the rank).
    """
    u = _values(s).unit
    fro = math.sqrt(float(np.sum(u * u)))
    return 0.0 if fro == 0 else float(u.sum() / fro)


# ---------------------------------------------------------------------------- Gavish–Donoho


def _check_beta(beta: float) -> float:
    if not (0.0 < float(beta) <= 1.0):
        raise ConfigError(f"aspect ratio `beta` must be in (0, 1] (short/long side), got {beta!r}.")
    return float(beta)


def gd_known_threshold(shape: tuple[int, int], sigma: float) -> float:
    """Gavish–Donoho's threshold for a known noise std σ on an (out, in) matrix: λ*(β)·√n·σ, n the long side,
    β = short/long (:func:`gavish_donoho`, which counts the values above it)."""
    m, n = sorted(int(x) for x in shape)
    return gd_lambda_star(m / n) * math.sqrt(n) * sigma


def gd_lambda_star(beta: float) -> float:
    """λ*(β) = √(2(β+1) + 8β / ((β+1) + √(β²+14β+1))); 4/√3 for β = 1.

    References
    ----------
    .. [1] M. Gavish and D. L. Donoho, "The optimal hard threshold for singular values
       is 4/√3", IEEE Trans. Inf. Theory 60(8), 2014. arXiv:1305.5870, eq. (11).
    """
    b = _check_beta(beta)
    return math.sqrt(2 * (b + 1) + 8 * b / ((b + 1) + math.sqrt(b * b + 14 * b + 1)))


@lru_cache(maxsize=256)
def marchenko_pastur_median(beta: float) -> float:
    """Median μ_β of the Marchenko–Pastur law of ratio β (unit noise variance).

    Density f(t) = √((β₊−t)(t−β₋)) / (2πβt) on [β₋, β₊], β± = (1 ± √β)²; the median
    solves F(μ) = 1/2 for the closed-form CDF (:func:`marchenko_pastur_cdf`), by
    bisection to the last bits of a float (μ₁ ≈ 0.6528). Microseconds, where the
    numerically integrated CDF took ~0.4 s a ratio (plus 0.6 s to import SciPy's
    integrator) in every process of a run.

    References
    ----------
    .. [1] Gavish & Donoho 2014, arXiv:1305.5870, §III.B (definition of μ_β).
    """
    b = _check_beta(beta)
    lo, hi = (1 - math.sqrt(b)) ** 2, (1 + math.sqrt(b)) ** 2
    while True:
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:  # adjacent floats: the median is resolved
            return mid
        if marchenko_pastur_cdf(mid, b) < 0.5:
            lo = mid
        else:
            hi = mid


def marchenko_pastur_cdf(x: float, beta: float) -> float:
    """P(t ≤ x) under the Marchenko–Pastur law of ratio β ∈ (0, 1] (unit noise variance).

    With a = β₋, b = β₊ and r(t) = √((b−t)(t−a)), an antiderivative of r(t)/t is

        G(t) = r(t) + (a+b)/2 · asin((2t−a−b)/(b−a)) − √(ab) · asin(((a+b)t − 2ab) / (t(b−a))),

    so F(x) = (G(x) − G(a)) / (2πβ). Each asin is taken as an atan2 of the factored
    sine and cosine (1 − s and 1 + s both carry a factor b − t or t − a), which keeps
    full accuracy at the edges where asin's slope is infinite (plain asin lost 1e-6 of
    the mass at β = 1e-3). Against 40-digit quadrature of the density: ≤ 6e-16 for
    β ≥ 0.125, 5e-14 at β = 1e-3, 3e-11 at 1e-6 (G(x) − G(a) cancels two O(1) terms to an
    O(β) result, so the error grows as eps/β; a matrix of short side m ≥ 10 has β ≥ 10/n).
    """
    b_ = _check_beta(beta)
    a, b = (1 - math.sqrt(b_)) ** 2, (1 + math.sqrt(b_)) ** 2
    x = float(x)
    if math.isnan(x):
        raise ConfigError("marchenko_pastur_cdf: x is NaN.")
    if x <= a or x >= b:  # outside the support: exactly 0 or 1
        return 0.0 if x <= a else 1.0
    return min(1.0, max(0.0, (_mp_antiderivative(x, a, b) - _mp_antiderivative(a, a, b)) / (2 * math.pi * b_)))


def _mp_antiderivative(t: float, a: float, b: float) -> float:
    """G(t) of :func:`marchenko_pastur_cdf`, for a ≤ t ≤ b."""
    upper, lower = b - t, t - a  # both ≥ 0
    r = math.sqrt(upper * lower)
    g = r + 0.5 * (a + b) * math.atan2(lower - upper, 2 * r)  # asin((2t−a−b)/(b−a))
    if a > 0:  # β < 1; at β = 1 the last term's weight √(ab) is 0
        root = math.sqrt(a * b)
        g -= root * math.atan2(b * lower - a * upper, 2 * root * r)  # asin(((a+b)t − 2ab) / (t(b−a)))
    return g


def gd_omega(beta: float) -> float:
    """Exact ω(β) = λ*(β) / √μ_β (≈ 2.858 for square matrices).

    References
    ----------
    .. [1] Gavish & Donoho 2014, arXiv:1305.5870, eq. (17).
    """
    return gd_lambda_star(beta) / math.sqrt(marchenko_pastur_median(beta))


def gd_omega_approx(beta: float) -> float:
    """Cubic approximation ω(β) ≈ 0.56β³ − 0.95β² + 1.82β + 1.43 (Gavish & Donoho 2014, eq. (5))."""
    b = _check_beta(beta)
    return 0.56 * b**3 - 0.95 * b**2 + 1.82 * b + 1.43


# Fewest singular values (short side) from whose median the unknown-noise threshold reads the noise level.
# On 1×n the median is σ₁ itself and ω(β) > 1, so nothing is ever counted; on 2×n (square or 4:1) a rank-1
# signal at twice the known-noise threshold is missed ~100% of the time. Measured on pure Gaussian noise,
# square matrices (the worst aspect; wide ones do better), 4,000 draws each: the estimate σ̂ = median/√(n·μ_β)
# has a relative sd of 0.35/0.23/0.17/0.13/0.11/0.08 at short sides 3/4/6/8/10/16, and the threshold keeps a
# noise value (a false rank ≥ 1) 16%/10%/9%/6.5%/4.5%/2% of the time. From 10 on that rate is under 5%.
GD_MIN_SHORT_SIDE = 10


@dataclass(frozen=True)
class GavishDonoho:
    """Result of the Gavish–Donoho optimal hard threshold.

    Attributes
    ----------
    threshold : float
        σ cut-off τ; singular values strictly above it are kept.
    rank : int
        Number of σᵢ > threshold.
    beta : float
        Aspect ratio short/long side.
    noise_sigma : float
        Per-element noise std: the given one, or the estimate median(σ)/√(n·μ_β).
    known_noise : bool
    omega : float
        ω(β) (unknown noise) or λ*(β) (known noise) used.
    """

    threshold: float
    rank: int
    beta: float
    noise_sigma: float
    known_noise: bool
    omega: float


def gavish_donoho(s, shape: tuple[int, int], *, sigma: float | None = None) -> GavishDonoho:
    """Optimal hard threshold for singular values of a low-rank matrix in white noise.

    Known noise level σ: τ = λ*(β)·√n·σ. Unknown: τ = ω(β)·median(σᵢ) with the exact
    ω(β) (:func:`gd_omega`, from the Marchenko–Pastur median). n is the long side,
    β = short/long. The unknown-noise form reads the noise from the median, so it needs
    the median to lie in the noise bulk (a rank below about half the short side) and a
    short side of at least :data:`GD_MIN_SHORT_SIDE` (10): on a 1×n matrix the median is
    σ₁ itself and the rank would be 0 whatever the signal.

    Parameters
    ----------
    s : Spectrum or torch.Tensor, shape (r,)
        Singular values. With `sigma` given, top-k values suffice (the rank is exact if
        σ_k is below the threshold). Without `sigma` the median needs the whole
        spectrum: a truncated Spectrum, or a short side below ``GD_MIN_SHORT_SIDE``,
        raises ConfigError.
    shape : (int, int)
        (out, in) of the matrix.
    sigma : float, optional
        Known per-element noise standard deviation.

    Returns
    -------
    GavishDonoho

    References
    ----------
    .. [1] M. Gavish and D. L. Donoho, "The optimal hard threshold for singular values
       is 4/√3", IEEE Trans. Inf. Theory 60(8), 2014. arXiv:1305.5870.
    """
    v, _, _, complete = _values(s)
    if len(shape) != 2 or min(shape) < 1:
        raise ConfigError(f"`shape` must be (out, in) with positive sides, got {shape!r}.")
    m, n = sorted(int(x) for x in shape)
    beta = m / n
    if v.size > m:  # a spectrum of another matrix: the count of values above the threshold would pass the rank
        raise ConfigError(f"{v.size} singular values for a {shape[0]}×{shape[1]} matrix, which has {m}: "
                          "`shape` is not that of the matrix they came from.")
    if sigma is not None:
        if not (0.0 <= float(sigma) < math.inf):
            raise ConfigError(f"`sigma` must be a finite, non-negative noise std, got {sigma!r}.")
        tau = gd_known_threshold((m, n), float(sigma))
        return GavishDonoho(tau, int(np.sum(v > tau)), beta, float(sigma), True, gd_lambda_star(beta))
    if m < GD_MIN_SHORT_SIDE:
        raise ConfigError(
            f"gavish_donoho without `sigma` needs a short side of at least {GD_MIN_SHORT_SIDE} to read the noise "
            f"from the median singular value; a {shape[0]}×{shape[1]} matrix has {m} value(s), whose median is "
            "mostly the signal's own (on 1×n it is σ₁, so the rank would be 0 whatever the signal). Pass `sigma`.")
    if not complete or v.size != m:
        raise ConfigError(
            "gavish_donoho without `sigma` needs the whole spectrum (the median of all "
            f"{m} singular values); got {v.size}. Pass `sigma` or use full_svd.")
    h = v.size // 2  # v is sorted (descending): its middle; np.median's first call imports 0.3 s of numpy
    med = float(v[h]) if v.size % 2 else 0.5 * float(v[h - 1] + v[h])
    omega = gd_omega(beta)
    tau = omega * med
    noise = med / math.sqrt(n * marchenko_pastur_median(beta))
    return GavishDonoho(tau, int(np.sum(v > tau)), beta, noise, False, omega)


# ---------------------------------------------------------------------------- noise floor


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit in the last place of each element of `x` in storage dtype `dtype`.

    ulp(x) = 2^(⌊log₂|x|⌋ − (p − 1)) with p significand bits (bf16 8, fp16 11, fp32 24),
    clamped at the subnormal spacing; 0 where x = 0 (zero is exact). Returns float64.
    """
    if dtype not in _SIGNIFICAND_BITS:
        raise ConfigError(f"storage dtype must be one of {sorted(map(str, _SIGNIFICAND_BITS))}, got {dtype}.")
    p, emin = _SIGNIFICAND_BITS[dtype], _MIN_NORMAL_EXP[dtype]
    a = x.detach().double().abs()
    _, e = torch.frexp(a)  # a = mant·2^e, mant in [0.5, 1) -> ⌊log₂a⌋ = e − 1
    exp = torch.clamp(e.double() - 1, min=emin)
    out = torch.exp2(exp - (p - 1))
    return torch.where(a > 0, out, torch.zeros_like(out))


@dataclass(frozen=True)
class NoiseFloor:
    """Rounding-noise floor under ΔW from the storage dtypes of both checkpoints.

    Attributes
    ----------
    variance : float
        Mean per-element variance of the rounding noise in ΔW (sum of both sides).
    sigma : float
        √variance, the per-element noise std.
    noise_fro : float
        Expected ‖noise‖_F = √(m·n·variance).
    mp_edge : float
        Marchenko–Pastur bulk edge σ(√m + √n): where pure noise's largest singular value
        sits, up to its Tracy–Widom fluctuation (:func:`spectra.linalg.noise.tracy_widom_edge`).
    rank : int or None
        Number of singular values above the floor (when a spectrum was given): above
        `mp_edge` raised by the Tracy–Widom margin of pure noise's largest value
        (:func:`spectra.linalg.noise.rank_above`, its default quantile), the count analyze
        writes as ``noise.rank_above``. At the bare edge pure noise's top value counts in
        17–44 % of matrices.
    base_dtype, tuned_dtype : str
    base_rounding : str
        "counted" (the base's rounding is in `variance`) or "exact" (only the fine-tune's: it
        started from the base's stored values).
    tuned_variance : float or None
        The fine-tune's share of `variance` (None where not split).
    sigma_residual : float or None
        √ of :func:`residual_variance` of ΔW when "auto" decided `base_rounding`, else None.
    """

    variance: float
    sigma: float
    noise_fro: float
    mp_edge: float
    rank: int | None
    base_dtype: str
    tuned_dtype: str
    base_rounding: str = "counted"
    tuned_variance: float | None = None
    sigma_residual: float | None = None


def rounding_noise_floor(
    base: torch.Tensor,
    tuned: torch.Tensor,
    *,
    base_dtype: torch.dtype | None = None,
    tuned_dtype: torch.dtype | None = None,
    s=None,
    base_rounding: str = "counted",
) -> NoiseFloor:
    """Expected rounding noise in ΔW = tuned − base and the singular values above it.

    Rounding to nearest leaves an error uniform in ±ulp/2, variance ulp²/12, per
    element and per checkpoint. When both checkpoints were rounded from finer weights
    (two bf16 releases trained in fp32) the two errors are independent, so the variance
    in ΔW is ulp_base²/12 + ulp_tuned²/12, averaged over elements ("counted"). When the
    fine-tune started from the base's stored values (a bf16 release fine-tuned and saved
    in bf16), ΔW = round(W_base + δ) − W_base holds the fine-tune's rounding alone,
    ulp_tuned²/12 ("exact"). Treated as white noise of that variance, its singular
    values fill a Marchenko–Pastur bulk whose edge is σ(√m + √n); singular values of
    ΔW above that edge raised by the Tracy–Widom fluctuation of pure noise's largest
    value (:func:`spectra.linalg.noise.tracy_widom_edge`) are signal.

    Parameters
    ----------
    base, tuned : torch.Tensor, shape (out, in)
        The two weights, as stored or up-cast.
    base_dtype, tuned_dtype : torch.dtype, optional
        Storage dtypes (float32, bfloat16, float16). Default: each tensor's own dtype.
        Pass them when the tensors were up-cast after loading.
    s : Spectrum or torch.Tensor, optional
        Singular values of ΔW; if given, ``rank`` counts those above the floor
        (:func:`spectra.linalg.noise.rank_above` of the floor's edge). No value is set
        aside as the decomposition's own round-off, which analyze also does
        (σ₁·max(m, n)·eps of float32).
    base_rounding : {"counted", "exact", "auto"}, default "counted"
        Whether the base's rounding is in ΔW; "auto" decides it from ΔW's residual
        (:func:`counts_base_rounding`) and needs `s`, the whole spectrum or its top.

    Returns
    -------
    NoiseFloor

    Notes
    -----
    The noise is not exactly white: its variance follows each element's magnitude,
    and where an update is far below one ulp both sides round alike (ΔW is then an
    exact 0, often half the elements of a bf16 pair). The MP edge of the mean variance
    is the usual approximation for such mildly heteroscedastic noise.

    References
    ----------
    .. [1] N. J. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
       SIAM 2002, §2.1 (rounding to nearest, unit roundoff).
    .. [2] V. A. Marchenko and L. A. Pastur, "Distribution of eigenvalues for some sets
       of random matrices", Mat. Sb. 1967 (bulk edge (√m + √n)σ).
    """
    for name, t in (("base", base), ("tuned", tuned)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise ConfigError(f"`{name}` must be a 2-D tensor (out, in).")
    if base.shape != tuned.shape:
        raise ConfigError(f"`base` {tuple(base.shape)} and `tuned` {tuple(tuned.shape)} differ in shape.")
    if base.numel() == 0:
        raise ConfigError(f"`base` and `tuned` are empty (shape {tuple(base.shape)}): no rounding noise to measure.")
    for name, t in (("base", base), ("tuned", tuned)):
        if not bool(torch.isfinite(t).all()):
            raise ConfigError(f"`{name}` holds NaN or Inf values: its rounding noise is undefined.")
    if base_rounding not in BASE_ROUNDING:
        raise ConfigError(f"`base_rounding` must be one of {', '.join(BASE_ROUNDING)}, got {base_rounding!r}.")
    if base_rounding == "auto" and s is None:
        raise ConfigError("`base_rounding='auto'` decides from ΔW's singular values: pass `s`.")
    bd = base.dtype if base_dtype is None else base_dtype
    td = tuned.dtype if tuned_dtype is None else tuned_dtype
    m, n = base.shape
    var_b = var_t = fro2 = base2 = 0.0
    # Chunk rows: ulp() and the float64 difference make float64 copies.
    rows = max(1, (4 << 20) // max(1, n))
    for start in range(0, m, rows):
        b, t = base[start:start + rows], tuned[start:start + rows]
        var_b += float((ulp(b, bd) ** 2).sum())
        var_t += float((ulp(t, td) ** 2).sum())
        fro2 += float(((t.double() - b.double()) ** 2).sum())
        base2 += float((b.double() ** 2).sum())
    var_b, var_t = var_b / 12.0 / (m * n), var_t / 12.0 / (m * n)
    names = str(bd).replace("torch.", ""), str(td).replace("torch.", "")
    both = _white_floor(var_b + var_t, (m, n), s, names)
    if base_rounding == "counted":
        return replace(both, tuned_variance=var_t)
    exact = replace(_white_floor(var_t, (m, n), s, names), base_rounding="exact", tuned_variance=var_t)
    if base_rounding == "exact":
        return exact
    from spectra.linalg.noise import large_update_profile, settle_floor  # noise builds on this module; one decision

    # ΔW in float32, as the analysis holds it: settle_floor resolves the residual from it in float64 where the
    # float32 values cannot (a large update on a bf16 base); each side's variance by row and column weighs what
    # each hypothesis leaves outside ΔW's top directions
    return settle_floor("auto", replace(both, tuned_variance=var_t), exact, s, (m, n), total_energy=fro2,
                        delta=tuned.float() - base.float(),
                        profile=large_update_profile(base, tuned, base_dtype=bd, tuned_dtype=td,
                                                     relative=math.sqrt(fro2 / base2) if base2 else math.inf))


def _white_floor(var: float, shape: tuple[int, int], s, names: tuple[str, str]) -> NoiseFloor:
    """The floor of white noise of per-element variance `var` on an (m, n) matrix, with the count of `s` above it."""
    from spectra.linalg.noise import rank_above  # noise builds on this module: imported here, not at the top

    m, n = shape
    sigma = math.sqrt(var)
    edge = sigma * (math.sqrt(m) + math.sqrt(n))
    rank = None if s is None else rank_above(_values(s).v, edge, (m, n))  # the edge's Tracy–Widom margin, as analyze
    return NoiseFloor(var, sigma, math.sqrt(m * n * var), edge, rank, *names)


def residual_variance(s, shape: tuple[int, int], *, edge: float, total_energy: float | None = None) -> float | None:
    """Per-element variance of ΔW outside its singular values above `edge`.

    σ̂² = (‖ΔW‖_F² − Σ_{i≤k} σᵢ²) / ((m − k)(n − k)), k = #σᵢ > edge: the energy left after
    the k directions above the edge, over the dimensions white noise keeps outside them
    (a rank-k fit removes k(m + n) − k² of its mn dimensions). Exact on top values when
    ‖ΔW‖_F² is known (a Spectrum carries it), since only the k values above the edge enter.
    The edge here is the bare one on purpose, not :func:`spectra.linalg.noise.rank_above`'s
    margin: σ̂² estimates the noise's level, and a value between the edge and the margin
    (signal or noise's own top value) is kept out of it. Were it noise, taking it out
    (energy ≈ σ²(√m + √n)², m + n − 1 dimensions) lowers σ̂² by about 2/√(mn) relative,
    small beside the √2 between either hypothesis and :func:`counts_base_rounding`'s threshold.

    Parameters
    ----------
    s : Spectrum or torch.Tensor, shape (r,)
        Singular values of ΔW, descending (all, or the top ones with `total_energy`).
    shape : (int, int)
        (out, in) of ΔW.
    edge : float
        The noise's bulk edge: values above it are taken as signal.
    total_energy : float, optional
        ‖ΔW‖_F² (default: the Spectrum's, or Σσᵢ² of the values given).

    Returns
    -------
    float or None
        σ̂² (≥ 0); None when every direction is above the edge (k = min(m, n)): nothing left to measure.

    Notes
    -----
    Signal below the edge stays in the residual and raises σ̂², so it errs towards more
    noise, never less. Where every value held is above the edge but the spectrum is
    truncated, the signal beyond the values held raises it the same way.
    """
    x = _values(s, total_energy)
    m, n = (int(d) for d in shape)
    k = int(np.sum(x.v > edge))
    if k >= min(m, n):
        return None
    top = float(x.v[0])
    left = max(x.energy - float(np.sum(x.unit[:k] ** 2)), 0.0)  # in units of σ₁²: squares stay in range
    return left * top * top / ((m - k) * (n - k)) if top > 0 else 0.0


def counts_base_rounding(residual: float | None, *, tuned_variance: float, base_variance: float) -> bool:
    """Whether ΔW's residual variance says the base's rounding is in it.

    The two hypotheses put σ_t² (the fine-tune started from the base's stored values) or
    σ_t² + σ_b² (both rounded from finer weights) of white noise under ΔW. The base's
    rounding counts when σ̂² ≥ √(σ_t²·(σ_t² + σ_b²)), the geometric mean of the two (the
    middle of the two on a log scale, where a variance estimate's error is symmetric); an
    unknown residual (None: every direction above the edge) counts it.

    Parameters
    ----------
    residual : float or None
        σ̂², from :func:`residual_variance`.
    tuned_variance, base_variance : float
        σ_t², σ_b²: each side's mean rounding variance (ulp²/12 per element).
    """
    if residual is None:
        return True
    return residual >= math.sqrt(tuned_variance * (tuned_variance + base_variance))


# ---------------------------------------------------------------------------- decay, size


@dataclass(frozen=True)
class DecayFit:
    """Power law σᵢ ≈ C·i^(−alpha) fitted over i = 1..n_points.

    Attributes
    ----------
    alpha : float
        Decay exponent (larger = faster decay = lower rank).
    log_c : float
        Intercept ln C.
    r2 : float
        Coefficient of determination of the fit in log–log space.
    n_points : int
    """

    alpha: float
    log_c: float
    r2: float
    n_points: int


def decay_fit(s, *, stop: int | None = None, start: int = 1) -> DecayFit:
    """Least-squares fit of ln σᵢ = ln C − α ln i over the signal part i = start..stop.

    Parameters
    ----------
    s : Spectrum or torch.Tensor, shape (k,)
    stop : int, optional
        Last index (1-based) of the signal part, e.g. the noise-floor or Gavish–Donoho
        rank. Default: every positive value held.
    start : int, default 1

    Returns
    -------
    DecayFit

    References
    ----------
    .. [1] C. H. Martin and M. W. Mahoney, "Implicit self-regularization in deep neural
       networks", JMLR 22, 2021. arXiv:1810.01075 (power-law spectra of weights).
    """
    v = _values(s).v
    stop = int(np.sum(v > 0)) if stop is None else int(stop)
    if not (1 <= start and stop <= v.size and stop - start + 1 >= 3):
        raise ConfigError(f"decay_fit needs ≥ 3 points within the {v.size} values: got start={start}, stop={stop}.")
    y = v[start - 1:stop]
    if np.any(y <= 0):
        raise ConfigError("decay_fit range holds zero singular values; lower `stop`.")
    x = np.log(np.arange(start, stop + 1, dtype=np.float64))
    ly = np.log(y)
    slope, intercept = np.polyfit(x, ly, 1)
    resid = ly - (slope * x + intercept)
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
    return DecayFit(float(-slope), float(intercept), r2, int(y.size))


def relative_update_size(delta: torch.Tensor, base: torch.Tensor) -> float:
    """‖ΔW‖_F / ‖W_base‖_F, accumulated in float64 (inf when the base is zero)."""
    for name, t in (("delta", delta), ("base", base)):
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"`{name}` must be a torch.Tensor.")
    if delta.shape != base.shape:
        raise ConfigError(f"`delta` {tuple(delta.shape)} and `base` {tuple(base.shape)} differ in shape.")
    d = math.sqrt(float((delta.double() ** 2).sum()))
    b = math.sqrt(float((base.double() ** 2).sum()))
    for name, norm in (("delta", d), ("base", b)):
        if not math.isfinite(norm):  # a NaN entry, an Inf, or squares past float64
            raise ConfigError(f"`{name}` holds NaN or Inf values, or is too large for its norm in float64.")
    return math.inf if b == 0 else d / b
