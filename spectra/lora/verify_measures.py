"""One adapted module's measures against the full fine-tune's update: tensors in, numbers out.

Decides what `spectra verify` reports per module, and how each number is taken. For a module
with ``ΔW_full = W_tuned − W_base`` and the adapter's own update ``ΔW_ad = merged − W₀`` (W₀
the weight the adapter was trained on: the base, or for QLoRA/QDoRA its NF4 round trip where
the 4-bit load stores the module in NF4, :func:`~spectra.lora.qlora_base.bnb_4bit_modules`;
an embedding table keeps the base):

- ``effective_adapter_rank``: k, the numerical rank of the low-rank update s·B A
  (:func:`~spectra.linalg.subspace.factor_svd`); below r when factors are rank-deficient
  (zero-initialised B columns that never trained, dependent columns or rows), and then
  listed in a note: "rank 8 adapter, 5 directions used";
- ``captured_energy``: share of ‖ΔW_full‖_F² in the adapter's column space, that of
  s·B A (``_row``: in its row space; ``_both``: in both). With full-rank factors these
  are span(B) and span(Aᵀ); otherwise the update's own k-dimensional spaces, which a
  factor's span can overstate;
- ``optimal_energy``: the Eckart–Young optimum Σ_{i≤r} σᵢ²/Σσᵢ² at the adapter's rank —
  no rank-r subspace holds more, so ``captured_energy ≤ optimal_energy`` always;
- ``phi``: LoRA §7 subspace similarity φ(ΔW_ad, ΔW_full, k', r) of the learned updates'
  left singular vectors (``phi_row``: right), k' = min(r, the numerical rank of ΔW_ad):
  k for LoRA, r for DoRA (its magnitude part fills the rest). ΔW_ad has no singular
  vectors past its rank (any completion would do), so φ reads the k' it has, normalised
  by min(k', r) as the definition says; principal angles between the update's column
  space and the top-r of ΔW_full, min(k, r) of them (Hu et al. 2021, arXiv:2106.09685);
- amplification factors ‖ΔW‖_F/‖UᵀW₀V‖_F of both updates (LoRA §7.3), the adapter's
  over its top k';
- intruder dimensions of W₀ + ΔW_ad vs W₀, and of W_tuned vs W_base (Shuttleworth et
  al. 2024, arXiv:2410.21228);
- for QLoRA: the quantisation error ‖dequant(W₀⁴ᵇⁱᵗ) − W₀‖_F, which the adapter sees.

:func:`module_measures` takes them from tensors (no file, no model), reading only the few
singular triplets each needs; :func:`measure_module` feeds it one module of an adapter as
:func:`~spectra.lora.verify.verify_adapter` reads it. :func:`delta_decomposition` is the one
decomposition of ΔW_full they and the truncated-SVD adapter share.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from spectra.errors import ConfigError
from spectra.linalg.partial import EXACT_BELOW, top_svd
from spectra.linalg.subspace import (
    amplification_factor,
    captured_energies,
    captured_energy,
    intruder_dimensions,
    intruder_reference,
    numerical_rank,
    principal_angles,
    similarity_matrix,
)
from spectra.linalg.svd import Spectrum, frobenius_energy

if TYPE_CHECKING:
    from spectra.lora.verify import VerifyConfig


def module_measures(delta_full: torch.Tensor, delta_adapter: torch.Tensor | Spectrum, W0: torch.Tensor, *,
                    col_basis: torch.Tensor, row_basis: torch.Tensor, rank: int, W_base: torch.Tensor | None = None,
                    intruder_k: int = 10, intruder_epsilon: float = 0.5, phi_max: int = 64,
                    delta_svd: Spectrum | None = None, adapter_svd: Spectrum | None = None,
                    exact_below: int = EXACT_BELOW, rounded_energy: float | None = None, storage_rank=None
                    ) -> tuple[dict, list[list[float]] | None, torch.Tensor | None]:
    """Measures of one adapted module; see the module docstring.

    Every measure reads only a few singular triplets: the top J = max(r, min(phi_max, short))
    of ΔW_full, the top k' ≤ r of ΔW_adapter (as many as `adapter_svd` holds, at most r) and
    the top k of each tuned weight against W_base's.
    Modules with a short side ≤ `exact_below` take full float64 decompositions; larger ones
    take certified partial ones (:func:`~spectra.linalg.partial.top_svd`,
    :func:`~spectra.linalg.subspace.intruder_dimensions`), which fall back to the full
    decomposition wherever they cannot prove their accuracy. Against the full float64
    decompositions, then:

    - every top-j subspace of ΔW_full (j ≤ J) and of ΔW_adapter (j ≤ r; exact from
      `adapter_svd` when that is the factors' SVD) lies within sin θ ≤ ``ANGLE_TOL`` = 1e-6,
      so each φ(i, j) is within 2e-6 (4e-6 without `adapter_svd`), each principal angle
      within 1e-6 rad, and each amplification factor within a relative
      2·‖W‖₂·1e-6/‖UᵀWV‖_F (first order);
    - the σᵢ behind ``optimal_energy`` are within their residuals (Spectrum.tolerance, in
      practice ρ²/gap: ~1e-13 relative);
    - intruder counts are equal: each decision is proved, or taken from full decompositions.

    No (out, in) matrix is copied whole to float64: ΔW_full, W0 and W_base are multiplied
    by row blocks up-cast (but for the QR a tall W0 takes where an intruder decision needs
    it, and the full decompositions), and a factored ΔW_adapter is formed only as the
    float32 W0 + ΔW_adapter its intruders are decided on (from float64 rows, rounded once).
    That weight and the Krylov bases of its intruder check set the peak: 1.6–2.4× the
    float32 ΔW on top of the inputs, with :func:`delta_decomposition` (see the README).

    Parameters
    ----------
    delta_full : torch.Tensor, shape (out, in)
        ``W_tuned − W_base``.
    delta_adapter : torch.Tensor, shape (out, in), or Spectrum
        ``merged − W0``, best in float64 (a float32 ``merged − W0`` carries the rounding
        of W0 + ΔW, ~1e-7·|W0| per entry); or, for a plain LoRA, every nonzero triplet of
        it (:func:`~spectra.linalg.subspace.factor_svd` of its factors: exact, triplets of
        rounding-level σ dropped), which is then never formed. A factored update needs `adapter_svd`.
    W0 : torch.Tensor, shape (out, in)
        The weight the adapter was applied to (base, or its NF4 round trip).
    col_basis, row_basis : torch.Tensor, shapes (out, k) and (in, k)
        The column and row spaces of the adapter's low-rank update s·B A:
        ``factor_svd(B, A.T).U`` and ``.Vh.T``. B and Aᵀ span them when both have full
        rank r; where B A has lower rank than B or A (a zero column of B leaves its row of
        A unused) only ``factor_svd``'s do.
    rank : int
        The adapter's rank r (the Eckart–Young optimum and φ's j are taken at it).
    W_base : torch.Tensor, shape (out, in), optional
        The unquantised base when it differs from ``W0`` (QLoRA).
    delta_svd : Spectrum, optional
        :func:`delta_decomposition` of `delta_full`, when the caller has it already.
    adapter_svd : Spectrum, optional
        The top triplets of `delta_adapter` in float64 when the caller has them, r or all
        it has when its rank is lower (for LoRA exactly,
        :func:`~spectra.linalg.subspace.factor_svd` of its factors, cut at its numerical
        rank: vectors of zero singular values are arbitrary, and φ would read them).
    exact_below : int, default EXACT_BELOW
        Short side at or below which full decompositions are taken.
    rounded_energy : float, optional
        ‖W‖_F² of the weights whose difference `delta_full` is (a TUNED checkpoint): their
        rounding sets its numerical rank (:func:`~spectra.linalg.subspace.numerical_rank`).
        None: `delta_full` is exact (a LoRA adapter as TUNED).
    storage_rank : callable, optional
        ΔW_full's decomposition → how many of its values stand above the rounding-noise floor of the
        checkpoints' storage dtypes (:func:`storage_noise_rank`). For a bf16/fp16 pair that floor is far above
        float32's, which `rounded_energy` judges by: the directions of the checkpoints' rounding (~1e-3·σ₁ on
        a merged bf16 LoRA) had counted as ΔW_full's, and φ read their arbitrary vectors (0.67 for 1.0).

    Returns
    -------
    row : dict
    phi : nested list (k', J) or None
        φ(ΔW_ad, ΔW_full, i, j), None when either update is zero.
    right_vectors : torch.Tensor (k', in) or None
        Top-k' right singular vectors of ΔW_ad (for φ between adapters, LoRA Fig. 3).
    """
    W_base = W0 if W_base is None else W_base
    short = min(delta_full.shape)
    factored = isinstance(delta_adapter, Spectrum)
    if factored and (delta_adapter.U is None or tuple(delta_adapter.shape) != tuple(delta_full.shape)
                     or adapter_svd is None):
        raise ConfigError("a factored `delta_adapter` must be the triplets (with vectors) of an update of ΔW_full's "
                          "shape, and needs `adapter_svd`.")
    full_energy = frobenius_energy(delta_full)
    ad_energy, error_energy, none_energy, inner, W_adapted = _adapter_pass(delta_adapter, delta_full, W0, W_base)
    row = {"rank": rank, "fro_norm_full": math.sqrt(full_energy), "fro_norm_adapter": math.sqrt(ad_energy)}
    row["relative_error"] = math.sqrt(error_energy / full_energy) if full_energy else None
    if W0 is not W_base and full_energy:  # QLoRA: no update leaves W0, not W_base (for LoRA this is 1)
        row["relative_error_none"] = math.sqrt(none_energy / full_energy)
    if ad_energy and full_energy:
        row["cosine"] = inner / math.sqrt(ad_energy * full_energy)
    k = min(intruder_k, short)
    Fb = intruder_reference(W_base, k=k, exact_below=exact_below)  # shared by both intruder counts
    F0 = Fb if W0 is W_base else intruder_reference(W0, k=k, exact_below=exact_below)
    row["intruders_adapter"] = intruder_dimensions(W0, W_adapted, k=k, epsilon=intruder_epsilon, base_svd=F0).count
    del W_adapted  # before the full fine-tune's tuned weight: one (out, in) float32 at a time
    row["intruders_full"] = intruder_dimensions(W_base, W_base + delta_full, k=k, epsilon=intruder_epsilon,
                                                base_svd=Fb).count
    if W0 is not W_base:
        q = math.sqrt(frobenius_energy(W0 - W_base))
        row["quant_error"] = q / math.sqrt(frobenius_energy(W_base))
        row["quant_error_vs_update"] = q / row["fro_norm_full"] if full_energy else None
    if not full_energy:  # nothing to capture: no share, no optimum
        return row | {"captured_energy": None, "optimal_energy": None, "phi": None}, None, None
    Fa = adapter_svd if adapter_svd is not None else (
        top_svd(delta_adapter, rank, exact_below=exact_below) if ad_energy else None)
    j_max = _phi_width(rank, phi_max, short)
    Ff = delta_svd if delta_svd is not None else delta_decomposition(delta_full, rank, phi_max=phi_max,
                                                                      exact_below=exact_below)
    if Ff.U is None or Ff.U.shape[1] < j_max:
        raise ConfigError(f"`delta_svd` must hold the top {j_max} singular vectors of ΔW_full (delta_decomposition).")
    # Eckart–Young optimum Σ_{i≤r} σᵢ² / ‖ΔW_full‖² from the decomposition already at hand: ΔW_full's alone
    row["optimal_energy"] = float((Ff.values[:rank].double() ** 2).sum()) / Ff.total_energy
    if not ad_energy or Fa is None or not Fa.values.numel():
        # no update (a B never trained), or one its factors' precision cannot tell from zero: its column and row
        # spaces are {0}, which hold none of ΔW_full. These had been None and dropped out of the totals, whose
        # denominator then lost the module's energy too (10.5 % captured over 7 modules, 6.6 % with them)
        return row | {"captured_energy": 0.0, "captured_energy_row": 0.0, "captured_energy_both": 0.0,
                      "energy_gap": row["optimal_energy"], "phi": None}, None, None
    row["captured_energy"], row["captured_energy_row"], row["captured_energy_both"] = captured_energies(
        delta_full, col_basis, row_basis)  # one pass over ΔW_full
    used = min(rank, Fa.U.shape[1])  # k': ΔW_ad's singular vectors past its rank would be arbitrary
    # likewise ΔW_full's past its numerical rank at its own precision (another adapter of lower rank as TUNED): φ,
    # the angles and the amplification read its top min(r, that rank)
    full_rank = numerical_rank(Ff, delta_full.shape, dtype=torch.promote_types(delta_full.dtype, torch.float32),
                               rounded_energy=rounded_energy)
    if storage_rank is not None:  # and above the checkpoints' own rounding, where they were stored coarser
        full_rank = min(full_rank, max(1, storage_rank(Ff)))
    r_full, j_max = min(rank, full_rank), min(j_max, full_rank)
    row["energy_gap"] = row["optimal_energy"] - row["captured_energy"]
    # DoRA's magnitude part. A factored ΔW_ad = U Σ Vh (orthonormal rows Vh) has the column-space energies of U Σ
    ad_columns = delta_adapter.U * delta_adapter.values if factored else delta_adapter  # (out, k) or (out, in)
    row["outside_lowrank"] = 1.0 - captured_energy(ad_columns, U=col_basis)
    phi = similarity_matrix(Fa.U[:, :used], Ff.U[:, :j_max])  # (k', J)
    row["phi"] = float(phi[used - 1, r_full - 1])  # φ(k', r)
    row["phi_row"] = float(similarity_matrix(Fa.Vh[:used].T, Ff.Vh[:r_full].T)[used - 1, r_full - 1])
    angles = principal_angles(col_basis, Ff.U[:, :r_full])  # (min(k, r),) radians, ascending
    row["principal_angles_deg"] = [round(math.degrees(a), 4) for a in angles.tolist()]
    row["amplification_adapter"] = amplification_factor(None if factored else delta_adapter, W0, used, svd=Fa)
    row["amplification_full"] = amplification_factor(delta_full, W_base, r_full, svd=Ff, rounded_energy=rounded_energy)
    return row, phi.tolist(), Fa.Vh[:used]


def storage_noise_rank(base: torch.Tensor, tuned: torch.Tensor, base_dtype: torch.dtype, tuned_dtype: torch.dtype):
    """For a TUNED checkpoint stored coarser than float32 (bf16, fp16 on either side): a function from ΔW_full's
    decomposition to the count of its values above the storage dtypes' rounding-noise floor, the floor analyze
    reports (:func:`~spectra.linalg.metrics.rounding_noise_floor`, ``base_rounding="auto"``: whether the base's
    rounding is in ΔW decided from ΔW itself; the Tracy–Widom margin of pure noise's top value); None for a
    float32/float64 pair, whose rounding `numerical_rank` judges. `base`, `tuned`: the two weights (out, in)."""
    coarse, known = (torch.bfloat16, torch.float16), (torch.bfloat16, torch.float16, torch.float32, torch.float64)
    if not ({base_dtype, tuned_dtype} & set(coarse)) or not {base_dtype, tuned_dtype} <= set(known):
        return None  # a float32/float64 pair; a quantised or float8 side is the analysis's business, not read here
    from spectra.linalg.metrics import rounding_noise_floor

    def rank(F: Spectrum) -> int:
        return rounding_noise_floor(base, tuned, base_dtype=base_dtype, tuned_dtype=tuned_dtype, s=F,
                                    base_rounding="auto").rank

    return rank


def _adapter_pass(delta_adapter: torch.Tensor | Spectrum, delta_full: torch.Tensor, W0: torch.Tensor,
                  W_base: torch.Tensor) -> tuple[float, float, float, float, torch.Tensor]:
    """(‖ΔW_ad‖_F², ‖(W0 + ΔW_ad) − W_tuned‖_F², ‖W0 − W_tuned‖_F², ⟨ΔW_ad, ΔW_full⟩, W0 + ΔW_ad) from one pass
    over the rows.

    Sums in float64, a block of ≤ 4 MB rows at a time; W_tuned = W_base + ΔW_full, so the
    error is ΔW_ad + (W0 − W_base) − ΔW_full, and no update's (W0 alone) (W0 − W_base) −
    ΔW_full: ‖ΔW_full‖_F² when W0 is W_base. The adapter's tuned weight (out, in) is
    summed in float64 and stored at W0's precision (float32 or better): its intruders are
    decided on it, as a merged checkpoint would store it. A factored ΔW_ad = U Σ Vh is
    formed block by block. ΔW_ad and W0 + ΔW_ad formed whole in float64 held 4× the float32
    ΔW (7× with the NaN checks' masks: 1.25 GB on a 4096×11008 module).
    """
    W_adapted = torch.empty(W0.shape, dtype=torch.promote_types(W0.dtype, torch.float32), device=W0.device)
    rows = max(1, (4 << 20) // (8 * delta_full.shape[1]))
    energy = error = none = inner = 0.0
    for i in range(0, delta_full.shape[0], rows):
        # copies (copy=True): .double() of a float64 input is the input itself, which the in-place steps would change
        ad = _rows64(delta_adapter, i, i + rows).ravel()
        full = delta_full[i:i + rows].to(torch.float64, copy=True).ravel()
        energy += float(torch.dot(ad, ad))
        inner += float(torch.dot(ad, full))
        w0 = W0[i:i + rows].to(torch.float64, copy=True)  # (rows, in)
        if W0 is not W_base:
            full += W_base[i:i + rows].to(torch.float64, copy=True).sub_(w0).ravel()  # + W_base − W0
        none += float(torch.dot(full, full))
        full.sub_(ad)  # W_tuned − W0 − ΔW_ad, in place: the error up to its sign
        error += float(torch.dot(full, full))
        W_adapted[i:i + rows] = w0.add_(ad.view_as(w0))  # summed in float64, rounded once
        del ad, full, w0  # before the next block's are made: one block of each at a time
    return energy, error, none, inner, W_adapted


def _rows64(delta: torch.Tensor | Spectrum, i: int, j: int) -> torch.Tensor:
    """Rows i:j of an update in float64: a slice up-cast, or (U Σ)[i:j] Vh from its triplets."""
    if isinstance(delta, Spectrum):  # (rows, k) @ (k, in) -> (rows, in), in float64 whatever the triplets' dtype
        return (delta.U[i:j].double() * delta.values.double()) @ delta.Vh.double()
    return delta[i:j].to(torch.float64, copy=True)  # a copy: the caller's float64 ΔW_ad must not change


def delta_decomposition(delta_full: torch.Tensor, rank: int, *, phi_max: int = 64,
                        exact_below: int = EXACT_BELOW) -> Spectrum:
    """The triplets of ΔW_full that :func:`module_measures` and the truncated-SVD adapter read.

    The top J = max(rank, min(phi_max, short)) in float64 (φ(i, j) for j ≤ J; the top
    ``rank`` for the Eckart–Young optimum, angles, amplification and the truncation), by
    :func:`~spectra.linalg.partial.top_svd`: full below `exact_below`, certified block
    Krylov above it.
    """
    return top_svd(delta_full, _phi_width(rank, phi_max, min(delta_full.shape)), exact_below=exact_below)


def _phi_width(rank: int, phi_max: int, short: int) -> int:
    """J = max(r, min(phi_max, short)): the top triplets of ΔW_full that φ(i, j ≤ J) and the rank-r measures read."""
    return max(rank, min(phi_max, short))


def measure_module(delta_full: torch.Tensor, W0: torch.Tensor, p, weights, low: Spectrum, rank: int,
                   config: VerifyConfig, *, W_base: torch.Tensor | None = None, rounded_energy: float | None = None,
                   storage_rank=None) -> tuple[dict, list[list[float]] | None, torch.Tensor | None, Spectrum]:
    """:func:`module_measures` of the adapter module `p` (an :class:`~spectra.checkpoints.adapter.AdapterDelta`
    read from `weights`), and ΔW_full's :func:`delta_decomposition`, which it returns too.

    `low` is ``factor_svd`` of p's factors (its update's own spaces). The adapter's update
    is taken exactly, with no float32 rounding of W0 + ΔW in it: a plain LoRA's as `low`
    (never formed), DoRA's formed in float64 (W0 is exact in float64: subtracted as
    stored), merged onto the float32 W0 in its one float64 allocation (a float64 copy of
    W0 first had cost a passing 2× more). A DoRA module's peak is 4.4× the float32 ΔW
    (1024×3072, measured with torch's profiler): its dense float64 update (2×), the float32
    W0 + ΔW_adapter its intruders are decided on (1×) and their Krylov bases; a plain
    LoRA's stays under 3× (its update is never formed).
    """
    Ff = delta_decomposition(delta_full, rank, phi_max=config.phi_max, exact_below=config.exact_below)
    plain = not {"magnitude", "base_layer"} & set(p.keys)
    delta_ad = low if plain else p.merged(W0, weights, torch.float64).sub_(W0)
    measures, phi, vectors = module_measures(delta_full, delta_ad, W0, col_basis=low.U, row_basis=low.Vh.T,
                                             rank=rank, W_base=W_base, intruder_k=config.intruder_k,
                                             intruder_epsilon=config.intruder_epsilon, phi_max=config.phi_max,
                                             delta_svd=Ff, adapter_svd=low if plain else None,
                                             exact_below=config.exact_below, rounded_energy=rounded_energy,
                                             storage_rank=storage_rank)
    return measures, phi, vectors, Ff
