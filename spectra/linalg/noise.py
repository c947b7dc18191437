"""Which roundings are under ΔW: the floor of the fine-tune's side alone, and the choice between the two.

A base stored in bf16 and fine-tuned from those stored values puts no rounding of its own
into ΔW = round(W_base + δ) − W_base: only the fine-tune's is there, and the floor of both
sides (:func:`~spectra.linalg.sketch.sampled_noise_floor`) sits √2 too high. Two releases
rounded from finer masters (an fp32-trained base and its instruct model) carry both. The
spectrum tells them apart: :func:`settle_floor` compares ΔW's residual variance, outside
its directions above the two-sided edge, with the two hypotheses
(:func:`~spectra.linalg.metrics.counts_base_rounding`), each weighed by what its per-element
variance leaves outside those directions (:func:`expected_residual`), or takes the user's word.

The count of directions above the floor (:func:`rank_above`) compares ΔW's singular values with the bulk
edge raised by the Tracy–Widom fluctuation of pure noise's largest one (:func:`tracy_widom_edge`): at the
Marchenko–Pastur edge itself, pure noise's top value lies above it in about 17 % of matrices of any size
(1 − F₁(0) = 0.168), and bf16 rounding noise, a heavier-tailed mixture of uniform errors, in up to 44 % of
small ones. ``NoiseFloor.rank`` (:func:`~spectra.linalg.metrics.rounding_noise_floor`,
:func:`~spectra.linalg.sketch.sampled_noise_floor`) is the same count. Only the residual that
decides the floor takes the bare edge (:func:`~spectra.linalg.metrics.residual_variance` says why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from spectra.errors import ConfigError
from spectra.linalg import metrics
from spectra.linalg.sketch import (_MIN_NORMAL_EXP, _SIGNIFICAND_BITS, _gram64, heteroscedastic_edge,
                                   mean_ulp_squared, thin_product)
from spectra.linalg.svd import Spectrum, frobenius_energy, full_svd

__all__ = ["LARGE_UPDATE", "tuned_side_floor", "settle_floor", "RoundingProfile", "large_update_profile",
           "rounding_profile", "expected_residual", "top_leverages", "residual_energy", "tracy_widom_edge",
           "rank_above", "residual_error", "highest_threshold", "TOTAL_ENERGY_ERROR", "TW1_QUANTILES",
           "EDGE_QUANTILE"]

# Quantiles s_q of the real (β = 1) Tracy–Widom law, F₁(s_q) = q, from the Fredholm determinant
# F₁(s) = det(I − K₁) on L²(s, ∞), K₁(x, y) = ½·Ai((x + y)/2) (Ferrari and Spohn 2005), by
# Bornemann's Gauss–Legendre quadrature (Math. Comp. 79, 2010); tests/linalg/test_noise_edge.py
# recomputes them. Johnstone (2001, Table 1) lists 0.98 and 2.02 for 0.95 and 0.99.
TW1_QUANTILES = {0.9: 0.4501, 0.95: 0.9793, 0.99: 2.0234, 0.995: 2.4223, 0.999: 3.2722}
EDGE_QUANTILE = 0.999  # a pure bf16-noise matrix of short side ≥ 64 goes above it in ≤ 5 % of seeds (0.99: ≤ 11 %)
# settle_floor weighs the hypotheses by the profile only where σ̂² lies within these factors of the plain threshold:
# the weighting moved the threshold by 0.71–1.03× over planted pairs 16² to 256², ‖δ‖ up to 4‖W‖, rank up to 8 (the
# lowest at rank 8 of 16); elsewhere the top directions' cost (k + 8 power-step columns over ΔW) would buy nothing
NEAR = (0.5, 1.25)
# ‖ΔW‖/‖W_base‖ from which analyze weighs auto's choice by the rounding profile: at ‖δ‖ ≤ 0.1‖W‖ the weighting
# changed no rate (master-rounded pairs read "exact" in ≤ 1.1 % of 16²–512² with and without it), while the profile
# reads every element of both sides and a fine-tune of the stored base sits inside NEAR (σ̂² ≈ 0.71× the threshold)
LARGE_UPDATE = 0.25
# Relative error allowed for ‖ΔW‖_F² where residual_error weighs it: analyze's fp32 block sums (sketch.squared_norm) are
# within ~1e-6 of the float64 sum (7e-7 measured on bf16-valued data, where the block sums round with a slight bias)
TOTAL_ENERGY_ERROR = 2e-6


def tuned_side_floor(both: metrics.NoiseFloor, tuned: torch.Tensor, *, tuned_dtype: torch.dtype,
                     tuned_spacing: torch.Tensor | None = None, max_elements: int = 1 << 20) -> metrics.NoiseFloor:
    """The floor of the fine-tune's rounding alone, beside `both` (the two sides' floor of the same pair).

    Parameters
    ----------
    both : NoiseFloor
        :func:`~spectra.linalg.sketch.sampled_noise_floor` of the pair, with the same `max_elements`;
        its ``tuned_variance``, where set, is taken as the fine-tune's variance instead of sampling
        `tuned` again (`both`'s sample then decides, whatever `max_elements` says here).
    tuned : torch.Tensor, shape (out, in)
        The fine-tune's weight, as stored or up-cast.
    tuned_dtype : torch.dtype
        Its storage dtype.
    tuned_spacing : torch.Tensor, optional
        A quantised fine-tune's grid spacing per element, as `both` took it: the edge is then
        :func:`~spectra.linalg.sketch.heteroscedastic_edge` of its variances alone.
    max_elements : int, default 2²⁰
        Elements sampled, as `both` sampled them (every ⌈m·n / max_elements⌉-th row).

    Returns
    -------
    NoiseFloor
        ``base_rounding="exact"``; ``tuned_variance`` = ``variance``.
    """
    m, n = tuned.shape
    if tuned_spacing is not None:
        none = torch.zeros((), dtype=torch.float64).expand(m, n)  # the base puts no variance in
        var, edge = heteroscedastic_edge(tuned, tuned, tuned_dtype, tuned_dtype, none, tuned_spacing)
    else:
        var = both.tuned_variance  # sampled_noise_floor kept the fine-tune's share, from the same sample
        if var is None:
            stride = max(1, math.ceil(m * n / max_elements))  # the rows sampled_noise_floor read
            var = mean_ulp_squared(tuned[::stride], tuned_dtype) / 12.0
        edge = math.sqrt(var) * (math.sqrt(m) + math.sqrt(n))  # Marchenko–Pastur bulk edge
    return replace(both, variance=var, sigma=math.sqrt(var), noise_fro=math.sqrt(m * n * var), mp_edge=edge,
                   rank=None, base_rounding="exact", tuned_variance=var)


def settle_floor(choice: str, both: metrics.NoiseFloor, tuned_only: metrics.NoiseFloor | None, s, shape, *,
                 total_energy: float, numerical: float = 0.0, quantised: bool = False,
                 delta: torch.Tensor | None = None, seed: int = 0,
                 profile: RoundingProfile | None = None) -> metrics.NoiseFloor:
    """The floor under ΔW: both sides' rounding ("counted") or the fine-tune's alone ("exact").

    Parameters
    ----------
    choice : {"auto", "counted", "exact"}
        "auto" decides from the spectrum: the base's rounding counts when ΔW's residual
        variance σ̂² (:func:`~spectra.linalg.metrics.residual_variance`, outside the values
        above the two-sided edge, and `numerical`) reaches √(σ_t²·(σ_t² + σ_b²)).
    both, tuned_only : NoiseFloor
        The two sides' floor and the fine-tune's (:func:`tuned_side_floor`); `tuned_only` may
        be None with choice "counted" or with `quantised`.
    s : Spectrum or torch.Tensor
        Singular values of ΔW (the whole spectrum or its top); a Spectrum's ``basis``, where
        the energy sketch left one, starts :func:`residual_energy`. It must be a Spectrum of
        ΔW as `delta` holds it: a square ΔWᵀ's basis lies on the other side, which nothing
        here can tell (the residual then errs high, by 2e-3–6e-3 relative in a review's test).
    shape : (int, int)
        (out, in).
    total_energy : float
        ‖ΔW‖_F², to :data:`TOTAL_ENERGY_ERROR` of itself or better.
    numerical : float, default 0.0
        The decomposition's own round-off level: no value below it counts as signal. Where even
        the two-sided floor's highest threshold (:func:`highest_threshold`) lies below it, "auto"
        returns `both` ("counted", no σ̂) at once: no count could differ between the hypotheses.
    quantised : bool, default False
        A side rounds on a quantised grid: "auto" keeps the pairing's rule (the base's grid
        counts only where the fine-tune is quantised too) and counts what it gave.
    delta : torch.Tensor, shape (out, in), optional
        ΔW itself. Where ‖ΔW‖_F² − Σ_{i≤k} σᵢ² cannot resolve the threshold (its estimated
        error, :func:`residual_error` — the total's, the values' round-off and an iterative
        method's convergence — reaches a tenth of the threshold's energy: a fine-tune stored in
        fp32 from a bf16 base, with a large update), "auto" takes the residual from the matrix
        in float64 instead (:func:`residual_energy`).
    seed : int, default 0
        Start of that residual's subspace iteration (and of the top directions' for `profile`).
    profile : RoundingProfile, optional
        Each side's rounding variance summed by row and by column (:func:`rounding_profile`);
        analyze passes one only under a large update (‖ΔW‖/‖W‖ ≥ :data:`LARGE_UPDATE`).
        With `delta`, "auto" compares σ̂² with what each hypothesis leaves outside ΔW's top k
        directions (:func:`expected_residual`) instead of with its mean variance: under a
        large update (‖ΔW‖ ≈ ‖W‖) the fine-tune's ulps are largest on the rows and columns
        the update moved most, which are the ones its top directions take out, and the mean
        overstates what is left (weighed only where σ̂² is within `NEAR` of the plain threshold,
        the most the weighting moved it). Pairs rounded from fp32 masters (W ~ N(0, 0.02²), rank 1–3
        update, ‖δ‖ = ‖W‖, 10 seeds each) read as "exact" without it in 27, 23, 7, 7, 3 % of
        16², 16×32, 32², 32×64, 64² matrices, with it in 13, 10, 0, 0, 0 %; at ‖δ‖ = 2‖W‖
        (hypotheses 1.2× apart) in 80–100 % at every size to 512², with it 27–50 %. Its cost:
        fine-tunes of the stored base at ‖δ‖ = 2‖W‖ read "counted" in 13 % of 16-wide ones
        (0 % before; none at 32 and wider, none at smaller updates).

    Returns
    -------
    NoiseFloor
        With ``base_rounding`` and, under "auto", ``sigma_residual``: None where every
        direction is above the edge, or where the values could not resolve the residual and
        no `delta` was given (the base's rounding is then counted, the larger floor).
    """
    if choice not in metrics.BASE_ROUNDING:
        raise ConfigError(f"base_rounding: {choice!r} is not one of {', '.join(metrics.BASE_ROUNDING)}.")
    if choice == "counted" or (choice == "auto" and quantised):
        return replace(both, base_rounding="counted")
    if tuned_only is None:
        raise ConfigError(f"base_rounding {choice!r} needs the fine-tune's own floor (tuned_side_floor).")
    if choice == "exact":
        return tuned_only
    if numerical and highest_threshold(both, shape) < numerical:
        # every count either floor sets is cut at the values' round-off instead (an fp32 pair: floors ~1e-9 against
        # ~1e-5): nothing the choice moves is worth a float64 pass over ΔW; the larger floor, as where it is unmeasured
        return replace(both, base_rounding="counted")
    # the bare edge, not rank_above's margin: the residual is the noise's level, with every value above the edge
    # (signal, or noise's own top one) kept out of it (metrics.residual_variance says what that costs)
    edge = max(both.mp_edge, numerical)
    residual = metrics.residual_variance(s, shape, edge=edge, total_energy=total_energy)
    base_variance = max(both.variance - tuned_only.variance, 0.0)
    threshold = math.sqrt(tuned_only.variance * (tuned_only.variance + base_variance))
    values = metrics._values(s, total_energy).v
    top = values[values > edge]
    k, (m, n) = top.size, (int(d) for d in shape)
    if residual is not None and k:
        spec = s if isinstance(s, Spectrum) else None  # a bare tensor: values as from a full decomposition
        error = residual_error(top, float(values[0]), (m, n), total_energy=total_energy,
                               tolerance=spec.tolerance if spec else 0.0, energy_error=spec.energy_error if spec else None)
        if error > 0.1 * threshold * (m - k) * (n - k):  # the values' errors, not noise
            basis = spec.basis if spec else None  # the sketch's: the residual starts from it
            residual = (None if delta is None
                        else residual_energy(delta, k, seed=seed, basis=basis) / ((m - k) * (n - k)))
    sigma_residual = None if residual is None else math.sqrt(residual)
    tuned_variance = tuned_only.variance
    near = residual is not None and threshold * NEAR[0] <= residual < threshold * NEAR[1]
    if near and profile is not None and delta is not None and k:
        # each hypothesis' mean variance over the (m − k)(n − k) dimensions its noise keeps outside the top k
        u, v = top_leverages(delta, k, seed=seed)
        kept = (m - k) * (n - k)
        tuned_variance = expected_residual(profile.tuned_rows, profile.tuned_cols, u, v) / kept
        both_variance = expected_residual(profile.tuned_rows + profile.base_rows,
                                          profile.tuned_cols + profile.base_cols, u, v) / kept
        base_variance = max(both_variance - tuned_variance, 0.0)
    counted = metrics.counts_base_rounding(residual, tuned_variance=tuned_variance, base_variance=base_variance)
    return replace(both if counted else tuned_only, base_rounding="counted" if counted else "exact",
                   sigma_residual=sigma_residual)


@dataclass(frozen=True)
class RoundingProfile:
    """Each side's per-element rounding variance (ulp²/12) summed over each row, shape (out,), and each column,
    shape (in,), float64: what :func:`expected_residual` needs of a variance that follows the weights."""

    base_rows: torch.Tensor
    base_cols: torch.Tensor
    tuned_rows: torch.Tensor
    tuned_cols: torch.Tensor


def large_update_profile(base: torch.Tensor, tuned: torch.Tensor, *, base_dtype: torch.dtype,
                         tuned_dtype: torch.dtype, relative: float) -> RoundingProfile | None:
    """:func:`rounding_profile` where the update is large enough for :func:`settle_floor` to weigh by it
    (‖ΔW‖/‖W_base‖ = `relative` ≥ :data:`LARGE_UPDATE`), else None: the one rule analyze and
    :func:`~spectra.linalg.metrics.rounding_noise_floor` share, so both decide alike."""
    if relative < LARGE_UPDATE:
        return None
    return rounding_profile(base, tuned, base_dtype=base_dtype, tuned_dtype=tuned_dtype)


def rounding_profile(base: torch.Tensor, tuned: torch.Tensor, *, base_dtype: torch.dtype,
                     tuned_dtype: torch.dtype) -> RoundingProfile:
    """Row and column sums of ulp²/12 of each side in its storage dtype, over every element, in row chunks.

    ulp(x)² = 2^(2⌊log₂|x|⌋)·2^(2(1 − p)): the power of two is read off the exponent bits, as
    :func:`~spectra.linalg.sketch.mean_ulp_squared` reads it (float32 and bfloat16 tensors; others
    through :func:`~spectra.linalg.metrics.ulp`). A 4096² bf16 pair: 0.3 s at one thread (1.9 s by
    ``metrics.ulp``'s float64 frexp).
    """
    m, n = base.shape
    rows = max(1, (1 << 20) // max(1, n))
    out = {side: (torch.zeros(m, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))
           for side in ("base", "tuned")}
    for start in range(0, m, rows):
        for side, weight, dtype in (("base", base, base_dtype), ("tuned", tuned, tuned_dtype)):
            v = _ulp_squared(weight[start:start + rows], dtype).cpu() / 12.0
            out[side][0][start:start + v.shape[0]] = v.sum(1)
            out[side][1].add_(v.sum(0))
    return RoundingProfile(out["base"][0], out["base"][1], out["tuned"][0], out["tuned"][1])


def _ulp_squared(x: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """ulp(x)² in `storage`, float64, elementwise (0 at 0)."""
    if x.dtype not in (torch.float32, torch.bfloat16) or storage not in _SIGNIFICAND_BITS:
        return metrics.ulp(x, storage) ** 2
    if x.dtype == torch.bfloat16:
        power = torch.bitwise_and(x.contiguous().view(torch.int16), 0x7F80).view(torch.bfloat16).float()
    else:
        power = torch.bitwise_and(x.contiguous().view(torch.int32), 0x7F800000).view(torch.float32)
    p, emin = _SIGNIFICAND_BITS[storage], _MIN_NORMAL_EXP[storage]
    if emin > -126:  # float16 storage: entries below its normal range have its subnormal spacing
        power = torch.where(power > 0, power.clamp(min=2.0 ** emin), power)
    power = power.double()
    return power * power * 2.0 ** (2 * (1 - p))


def expected_residual(rows: torch.Tensor, cols: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    """E‖(I − P_U) N (I − P_V)‖_F² for independent zero-mean noise N of per-element variance V.

    That is Σᵢⱼ Vᵢⱼ(1 − uᵢ)(1 − vⱼ), uᵢ = ‖U_k[i]‖² and vⱼ = ‖V_k[j]‖² the leverages of the k
    directions taken out. From V's row sums r and column sums c, with V's part along u and v
    taken as the rank-one rᵢcⱼ/T (T = Σr; exact for a constant V and in the two linear terms):
    T − uᵀr − cᵀv + (uᵀr)(cᵀv)/T. A constant variance σ² gives σ²(m − k)(n − k), the
    dimensions :func:`~spectra.linalg.metrics.residual_variance` divides by.
    """
    total = float(rows.sum())
    if total <= 0:
        return 0.0
    ur, cv = float(u.double().cpu() @ rows), float(cols @ v.double().cpu())
    return total - ur - cv + ur * cv / total


def top_leverages(delta: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 4,
                  full_up_to: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Leverages (‖U_k[i]‖², ‖V_k[j]‖²) of ΔW's top `k` singular directions: a full SVD up to `full_up_to` elements,
    else subspace iteration (Halko et al. 2011, Algorithm 4.4) in float32, which places the top directions of a ΔW
    whose top values stand clear of the rest to far better than these weights need."""
    m, n = delta.shape
    work = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
    if m * n <= full_up_to:
        u, _, vh = torch.linalg.svd(work, full_matrices=False)
        return (u[:, :k] ** 2).sum(1), (vh[:k] ** 2).sum(0)
    q = _power_basis(work, min(k + 8, m, n), iterations, seed)
    small, _, vh = torch.linalg.svd(q.T @ work, full_matrices=False)  # Rayleigh–Ritz in span(Q)
    u = q @ small[:, :k]
    return (u ** 2).sum(1), (vh[:k] ** 2).sum(0)


def _power_basis(work: torch.Tensor, width: int, iterations: int, seed: int) -> torch.Tensor:
    """An orthonormal basis (m, width) of ``work``'s top range: a seeded Gaussian start, then ``iterations`` − 1
    power steps (none for `iterations` ≤ 1), re-orthonormalised at each half step (Halko et al. 2011, Algorithm 4.4), in
    ``work``'s dtype. :func:`top_leverages` takes it as it is; :func:`residual_energy` adds its last step in
    float64."""
    start = torch.randn(work.shape[1], width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q = torch.linalg.qr(thin_product(work, start.to(device=work.device, dtype=work.dtype))).Q
    for _ in range(max(iterations - 1, 0)):
        q = torch.linalg.qr(thin_product(work, torch.linalg.qr(thin_product(work.T, q)).Q)).Q
    return q


def _ritz_rows(work: torch.Tensor, basis: torch.Tensor, width: int, *, rows: bool) -> torch.Tensor:
    """The top `width` Ritz directions of ``work`` on span(`basis`), on its rows' side: (m, width), orthonormal.

    `basis` (·, l) lies on ``work``'s rows' side (`rows`) or its columns'. Rows' side: the top
    eigenvectors W of the Gram of Wᵀ B give B W. Columns' side: those of the Gram of Y = W B give
    Y W / ‖Y W‖, the left singular vectors of W restricted to span(B) (a half power step). One
    float32 pass over ``work`` either way; the Gram and its eigenvectors in float64.
    """
    m, n = work.shape
    side = m if rows else n
    if basis.shape[0] != side:
        raise ValueError(f"residual_energy: basis has {basis.shape[0]} rows; a basis lies on ΔW's shorter side, "
                         f"{side} long here. Pass the basis of a Spectrum of this ΔW as given (not of ΔWᵀ or "
                         f"another matrix), or basis=None to start from a random one.")
    b = basis.to(device=work.device, dtype=work.dtype)
    y = thin_product(work.T if rows else work, b)  # Wᵀ B (n, l), or W B (m, l)
    _, vectors = torch.linalg.eigh(_gram64(y))  # ascending
    top = vectors[:, -width:].flip(1).to(work.dtype)  # (l, width)
    return torch.linalg.qr(b @ top if rows else y @ top).Q


def residual_energy(delta: torch.Tensor, k: int, *, oversample: int = 8, iterations: int = 4, seed: int = 0,
                    basis: torch.Tensor | None = None) -> float:
    """‖ΔW − Q_k Q_kᵀ ΔW‖_F², in float64: the energy outside ΔW's top `k` left singular directions.

    Summed from the residual matrix itself, so it holds no cancellation: ‖ΔW‖_F² − Σ_{i≤k} σᵢ²
    from float32 values loses everything below ~eps32·‖ΔW‖_F², which a large update's
    rounding residual is. Q_k is found by subspace iteration (`k` + `oversample` vectors,
    `iterations` power steps, at least one, then Rayleigh–Ritz): every step but the last in ΔW's own dtype,
    the last, the Rayleigh–Ritz projection and the residual in float64. The float64 step
    shrinks the float32 iterate's round-off outside the top directions by the ratio of the
    tail's values to the top's, as any power step shrinks what lies there; an inexact Q_k
    only leaves more energy out, so the result errs towards more noise. Rows are read in
    chunks of ≤ 2²⁰ elements through one reused float64 buffer: no float64 copy of ΔW is
    made, and a float64 pass costs one up-cast of each chunk (4 passes in all, against 12
    when every step ran in float64: a 32000×2048 embedding's residual took 5.8 s at one thread,
    ~1.5 s then).

    Where k + `oversample` passes half the short side, the residual is instead the tail
    Σ_{i>k} σᵢ² of ΔW's float64 singular values (LAPACK, on a float64 copy): exact, and
    faster than a subspace iteration that wide.

    With `basis` — an orthonormal basis of ΔW's top range on its shorter side (its rows' side
    when out ≤ in), e.g. :attr:`~spectra.linalg.svd.Spectrum.basis` of the energy sketch the
    values came from — the float32 iteration is replaced by one float32 pass: the top
    `k` + `oversample` Ritz directions of span(basis), moved to the rows' side where it lies
    on the columns' (:func:`_ritz_rows`): one float32 pass in place of four, with the float64
    step after it all the same; the residual agrees with numpy's float64 tail about as well as
    from the iteration (1e-8 to 6e-7 relative on planted ranks 40–100 of 1100×2600, against
    4e-9 to 5e-5), and the 32000×2048 embedding's at k = 29 took 0.62 s instead of 1.12 (one thread).

    References
    ----------
    .. [1] N. Halko, P. G. Martinsson and J. A. Tropp, "Finding structure with randomness",
       SIAM Review 53(2), 2011, Algorithms 4.4 (subspace iteration) and 5.1.
    """
    m, n = delta.shape
    basis_rows = m <= n  # a basis lies on ΔW's shorter side: its rows' when out ≤ in (as energy_sketch builds it)
    if not delta.is_contiguous() and delta.T.is_contiguous():
        # a transposed view (Conv1D's stored (in, out)): ΔWᵀ has the same energy outside its top k directions, and
        # its rows are read in place instead of strided (0.18 → 0.045 s on a 5120×1280 view at k = 16)
        delta, basis_rows, (m, n) = delta.T, not basis_rows, (n, m)
    rows = max(1, (1 << 20) // max(1, n))
    chunks = [slice(i, min(i + rows, m)) for i in range(0, m, rows)]
    buffer = torch.empty(min(rows, m), n, dtype=torch.float64, device=delta.device)

    def wide(c: slice) -> torch.Tensor:  # ΔW[c] in float64, in the reused buffer
        out = buffer[:c.stop - c.start]
        return out.copy_(delta[c])

    if k <= 0:
        return math.fsum(frobenius_energy(wide(c)) for c in chunks)
    if k + oversample > min(m, n) // 2:
        # Most of the space is "top" (a float32 pair: every value above the numerical tolerance): a subspace
        # iteration that wide costs more than LAPACK's float64 values, and inside a noise bulk its 4 steps do not
        # converge — on 768×3072 at k = 728 it left 6 % of the residual too much (1.8 s; these values: 0.5 s)
        values = full_svd(delta.to(torch.float64)).values  # float64 data: LAPACK gesdd, on the tall orientation
        return float((values[k:] ** 2).sum())

    # both products as (l, ·) row blocks, xᵀ ΔW[c]ᵀ and y[c]ᵀ ΔW[c]: MKL's float64 GEMM ran ΔW[c]ᵀ y[c] with a
    # column-major y (as QR returns it) at ~1 GFLOP/s for l = 22 (2.2 s a call on a 32000×2048 ΔW), these at 17–40
    def times(x: torch.Tensor) -> torch.Tensor:  # ΔW x, (m, l)
        return torch.cat([x.T @ wide(c).T for c in chunks], 1).T

    def transposed(y: torch.Tensor) -> torch.Tensor:  # ΔWᵀ y, (n, l)
        out = torch.zeros(y.shape[1], n, dtype=torch.float64, device=delta.device)
        for c in chunks:
            out.addmm_(y[c].T, wide(c))
        return out.T

    work = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
    width = min(k + oversample, m, n)
    if basis is not None and basis.shape[1] >= width:
        q = _ritz_rows(work, basis, width, rows=basis_rows)
    else:
        q = _power_basis(work, width, iterations, seed)
    q = torch.linalg.qr(times(torch.linalg.qr(transposed(q.double())).Q)).Q  # the last step in float64
    z = transposed(q)  # ΔWᵀ Q, (n, l)
    u = torch.linalg.svd(z.T, full_matrices=False).U[:, :k]  # Rayleigh–Ritz in span(Q)
    qk, coefficients = q @ u, (z @ u).T  # Q_k and Q_kᵀ ΔW, (k, n)
    # ΔW[c] − Q_k[c] Q_kᵀ ΔW formed in the buffer itself: a fresh (rows, n) float64 result per chunk for the product,
    # the difference and its square cost ~18 ms each in page faults (a 32000×2048 ΔW at k = 29: 1.2 s → 0.6 s)
    return math.fsum(frobenius_energy(wide(c).addmm_(qk[c], coefficients, alpha=-1)) for c in chunks)


def highest_threshold(floor: metrics.NoiseFloor, shape: tuple[int, int]) -> float:
    """The largest singular-value threshold `floor` sets on an (out, in) ΔW: :func:`rank_above`'s (the bulk edge
    past its Tracy–Widom margin) or Gavish–Donoho's known-noise λ*(β)·√n·σ (analyze's ``gd_rank`` on a partial
    spectrum), whichever is higher (GD's is 1.15–1.41× the bare edge, by the aspect ratio)."""
    return max(tracy_widom_edge(floor.mp_edge, tuple(shape)), metrics.gd_known_threshold(shape, floor.sigma))


def residual_error(top, sigma_1: float, shape: tuple[int, int], *, total_energy: float,
                   tolerance: float = 0.0, energy_error: float | None = None) -> float:
    """Estimated error of ‖ΔW‖_F² − Σ_{i≤k} σ̂ᵢ², the residual taken from the values `top` (the k above the edge).

    The sum of three parts, each an estimate with a margin rather than a proof:

    - ‖ΔW‖_F² itself, to :data:`TOTAL_ENERGY_ERROR` of itself (analyze sums it from float32
      block norms, :func:`~spectra.linalg.sketch.squared_norm`: ~1e-6, 7e-7 measured);
    - the values' round-off, σ₁·√max(m, n)·eps32 each, so 2·that·Σ σ̂ᵢ on the sum of squares:
      the probabilistic bound of a float32 inner product of that length (λ√n·u, Higham &
      Mary, SIAM J. Sci. Comput. 41(5), 2019), where numpy's ``matrix_rank`` tolerance
      σ₁·max(m, n)·eps is the worst case, which no product of a real ΔW comes near: on the
      TinyLlama-shaped pair's 32000×2048 embeddings (residual 6–9 % of ‖ΔW‖_F²) the residual
      from the sketch's values agreed with :func:`residual_energy`'s float64 one to 2e-5–4e-5
      of itself, 1e-5 absolute, against this term's 2e-4 and the worst case's 3e-2;
    - an iterative method's convergence: its Ritz values are lower bounds, short in their
      energy by twice `energy_error` where the method estimated it (the energy sketch's
      :attr:`~spectra.linalg.svd.Spectrum.energy_error`, each value's error weighed by its
      energy: 1.0–18× the float64 SVD's shortfall over 21 sketches of 7 spectrum kinds, so
      twice it, as the sketch's stop test takes its extrapolation), else by at most
      (2·tol + tol²)·Σ σ̂ᵢ², each value short by at most `tolerance` of itself (a Spectrum's
      estimated largest relative error; 0 for a complete decomposition).

    A fine-tune saved in float32 from a bf16 base with an update of 10 % of ‖W‖ has a residual
    of ~1e-7·‖ΔW‖_F², twenty times below the first part alone: its residual comes from the matrix.
    """
    top = np.asarray(top, dtype=np.float64)
    m, n = shape
    round_off = sigma_1 * math.sqrt(max(m, n)) * float(torch.finfo(torch.float32).eps)
    convergence = ((2.0 * tolerance + tolerance ** 2) * float(np.sum(top ** 2)) if energy_error is None
                   else 2.0 * energy_error)  # twice it: the margin the sketch's stop test gives its extrapolation
    return TOTAL_ENERGY_ERROR * total_energy + 2.0 * round_off * float(top.sum()) + convergence


def tracy_widom_edge(edge: float, shape: tuple[int, int], *, quantile: float | None = EDGE_QUANTILE) -> float:
    """The bulk edge raised by the Tracy–Widom fluctuation of pure noise's largest singular value.

    For an m×n matrix of i.i.d. noise of std σ, the largest eigenvalue of its Gram matrix is
    ≈ μ + s·τ with μ = σ²(√m + √n)² (the squared Marchenko–Pastur edge), τ = σ²(√m + √n)·
    (1/√m + 1/√n)^{1/3} and s distributed as TW₁ (Johnstone 2001, Theorem 1.1, with n − 1
    there taken as n). The threshold on a singular value is √(μ + s_q·τ), i.e.
    ``edge``·√(1 + s_q·(1/√m + 1/√n)^{1/3} / (√m + √n)): 1.151× the edge at 16×16 (q = 0.999),
    1.025× at 256×256, 1.006× at 1024×4096. A heteroscedastic edge
    (:func:`~spectra.linalg.sketch.heteroscedastic_edge`) is raised by the same factor, an
    approximation: its noise is not i.i.d.

    Parameters
    ----------
    edge : float
        The bulk edge, σ(√m + √n) (``NoiseFloor.mp_edge``).
    shape : (int, int)
        (out, in) of ΔW.
    quantile : float or None, default :data:`EDGE_QUANTILE`
        q, one of :data:`TW1_QUANTILES`' keys: pure noise's top value passes the threshold with
        probability ≈ 1 − q (Gaussian noise; bf16 rounding noise more often on small matrices).
        None: no margin (the edge itself).

    References
    ----------
    .. [1] I. M. Johnstone, "On the distribution of the largest eigenvalue in principal components
       analysis", Ann. Statist. 29(2), 2001, 295–327.
    .. [2] C. A. Tracy and H. Widom, "On orthogonal and symplectic matrix ensembles",
       Comm. Math. Phys. 177, 1996, 727–754.
    """
    if quantile is None:
        return float(edge)
    if quantile not in TW1_QUANTILES:
        raise ConfigError(f"quantile {quantile!r}: the Tracy–Widom margin takes one of "
                          f"{', '.join(map(str, TW1_QUANTILES))}, or None for the bare edge.")
    m, n = (int(d) for d in shape)
    if m < 1 or n < 1:
        raise ConfigError(f"shape {tuple(shape)}: both sides must be at least 1.")
    root_m, root_n = math.sqrt(m), math.sqrt(n)
    relative = (1 / root_m + 1 / root_n) ** (1 / 3) / (root_m + root_n)  # τ / μ
    return float(edge) * math.sqrt(1.0 + TW1_QUANTILES[quantile] * relative)


def rank_above(s, edge: float, shape: tuple[int, int], *, numerical: float = 0.0,
               quantile: float | None = EDGE_QUANTILE) -> int:
    """How many singular values of ΔW stand above its noise floor: above :func:`tracy_widom_edge` and `numerical`.

    Parameters
    ----------
    s : Spectrum or torch.Tensor or numpy.ndarray, shape (k,)
        Singular values of ΔW, descending (the whole spectrum or its top).
    edge : float
        The floor's bulk edge (``NoiseFloor.mp_edge``).
    shape : (int, int)
        (out, in).
    numerical : float, default 0.0
        The decomposition's own round-off level: no value below it counts.
    quantile : float or None, default :data:`EDGE_QUANTILE`
        The Tracy–Widom quantile of the margin; None counts above the bare edge (the count
        before the margin, which pure noise passes in 17–44 % of matrices).

    Returns
    -------
    int
        The count among the values given: where every one of a truncated spectrum's values is
        above, the true count may be larger.
    """
    threshold = max(tracy_widom_edge(edge, shape, quantile=quantile), float(numerical))
    values = s.values if isinstance(s, Spectrum) else s
    values = values.detach().double().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    return int(np.sum(values > threshold))
