"""``spectra bench verify``: one module's verify measures, full SVDs against certified partial ones.

For each shape, a synthetic module: a float32 W_base (a Marchenko–Pastur bulk, edge ≈ 1.6,
and four strong directions, σ = 6 … 3), a float32 ΔW_full and a rank-8 LoRA adapter along
ΔW_full's top directions at σ ≈ 4, above the bulk (so its tuned weight has intruders). The
top-10 of W_base reach into its bulk edge, whose gaps of ~0.1 % make the intruder checks
as hard as they get. :func:`~spectra.lora.verify_measures.module_measures`
runs twice on it, side by side: with ``exact_below`` above the short side — the five full
float64 SVDs with vectors verify took on every module before (W_base, W_base + ΔW_adapter,
W_base + ΔW_full, ΔW_full, ΔW_adapter) — and with the default, as ``spectra verify`` runs
now (certified partial decompositions, the adapter's SVD from its factors). The report
gives both times and the largest difference of every measure between the two runs.

ΔW_full spectra: ``decay`` σᵢ ∝ i^−0.8 (a fine-tune's update: gaps of ~1 % at j = 64, where
φ stops); ``bulk`` a planted rank 8 on a Marchenko–Pastur noise bulk, where φ(i, j) for j
past 8 reads subspaces inside the bulk that no partial decomposition can certify, so ΔW_full
falls back to its full SVD (the worst case of the fast path).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from spectra.files import write_text_atomic
from spectra.report.render import markdown_table

DEFAULT_SHAPES = ((2048, 2048), (2048, 5632))
QUICK_SHAPES = ((640, 960),)
KINDS = ("decay", "bulk")


def synthetic_module(m: int, n: int, kind: str, *, rank: int = 8, seed: int = 0):
    """(W_base, ΔW_full, B, A) in float32: a module of shape (m, n) for the benchmark (see the module doc)."""
    g = torch.Generator().manual_seed(seed)

    def orth(a: int, b: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(a, b, generator=g, dtype=torch.float64))[0]

    short = min(m, n)
    bulk = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(max(m, n))  # edge ≈ 1 + √(m/n)
    W = bulk + (orth(m, 4) * torch.tensor([6.0, 5.0, 4.0, 3.0], dtype=torch.float64)) @ orth(n, 4).T
    if kind == "decay":
        Uf, Vf = orth(m, short), orth(n, short)
        delta = (Uf * 0.5 * torch.arange(1, short + 1, dtype=torch.float64) ** -0.8) @ Vf.T
    elif kind == "bulk":
        Uf, Vf = orth(m, rank), orth(n, rank)
        noise = 0.01 / math.sqrt(max(m, n))
        delta = (Uf * torch.linspace(0.5, 0.2, rank, dtype=torch.float64)) @ Vf.T
        delta += noise * torch.randn(m, n, generator=g, dtype=torch.float64)
    else:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    # The adapter: ΔW_full's top-r directions, tilted, at σ ≈ 4 (among W_base's strong ones, above its bulk).
    B = 2.0 * Uf[:, :rank] + 0.3 * torch.randn(m, rank, generator=g, dtype=torch.float64) / math.sqrt(m)
    A = (2.0 * Vf[:, :rank] + 0.3 * torch.randn(n, rank, generator=g, dtype=torch.float64) / math.sqrt(n)).T
    return W.float(), delta.float(), B.float(), A.float()


def _measures(W, delta, B, A, *, exact_below: int, factors: bool, phi_max: int) -> tuple[dict, list, float]:
    """module_measures as verify_adapter calls it, timed (``factors``: ΔW_adapter's SVD from B and A)."""
    from spectra.linalg.partial import lowrank_svd
    from spectra.lora.verify_measures import delta_decomposition, module_measures

    rank = B.shape[1]
    start = time.perf_counter()
    delta_ad = B.double() @ A.double()  # (out, in) float64, as verify_adapter forms it (scaling 1)
    Fa = lowrank_svd(B, A.T) if factors else None
    Ff = delta_decomposition(delta, rank, phi_max=phi_max, exact_below=exact_below)
    row, phi, _ = module_measures(delta, delta_ad, W, col_basis=B.double(), row_basis=A.T.double(), rank=rank,
                                  phi_max=phi_max, delta_svd=Ff, adapter_svd=Fa, exact_below=exact_below)
    return row | {"delta_path": Ff.method}, phi, time.perf_counter() - start


def run_verify_bench(out_dir, *, shapes=DEFAULT_SHAPES, kinds=KINDS, rank: int = 8, repeats: int = 2,
                     quick: bool = False) -> Path:
    """Time module_measures with full and with certified partial decompositions; write ``verify.{md,json}``.

    Parameters
    ----------
    out_dir : str or path
    shapes : sequence of (out, in)
    kinds : sequence of {"decay", "bulk"}
        ΔW_full spectra (see the module doc).
    rank : int
        The adapter's rank.
    repeats : int
        Runs of each path, alternating; the fastest of each is kept (other load on a
        shared machine only ever adds time).
    quick : bool
        One 640×960 module, φ up to j = 32, the certified path forced (``exact_below=0``)
        and one run each: seconds, for smoke tests.

    Returns
    -------
    Path
        The Markdown file.
    """
    from spectra.linalg.partial import EXACT_BELOW

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    phi_max, fast_cut = (32, 0) if quick else (64, EXACT_BELOW)
    repeats = 1 if quick else max(1, repeats)
    load = os.getloadavg()[0]
    rows = []
    for m, n in QUICK_SHAPES if quick else shapes:
        for kind in kinds:
            W, delta, B, A = synthetic_module(m, n, kind, rank=rank)
            t_full = t_fast = math.inf
            for _ in range(repeats):
                full, full_phi, t = _measures(W, delta, B, A, exact_below=min(m, n), factors=False, phi_max=phi_max)
                t_full = min(t_full, t)
                fast, fast_phi, t = _measures(W, delta, B, A, exact_below=fast_cut, factors=True, phi_max=phi_max)
                t_fast = min(t_fast, t)
            rows.append({
                "shape": [m, n], "kind": kind, "rank": rank, "phi_max": phi_max, "full_s": t_full,
                "certified_s": t_fast, "speedup": t_full / t_fast, "delta_path": fast["delta_path"],
                "max_phi_diff": max(abs(a - b) for ra, rb in zip(full_phi, fast_phi) for a, b in zip(ra, rb)),
                "max_angle_diff_deg": max(abs(a - b) for a, b in zip(full["principal_angles_deg"],
                                                                   fast["principal_angles_deg"])),
                "amplification_rel_diff": max(abs(fast[k] / full[k] - 1)
                                              for k in ("amplification_adapter", "amplification_full")),
                "optimal_energy_rel_diff": abs(fast["optimal_energy"] / full["optimal_energy"] - 1),
                "intruders": [full["intruders_adapter"], full["intruders_full"]],
                "intruders_equal": all(fast[k] == full[k] for k in ("intruders_adapter", "intruders_full")),
            })
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "quick": quick, "repeats": repeats,
            "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}
    write_text_atomic(out / "verify.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    table = [[f"{r['shape'][0]}×{r['shape'][1]}", r["kind"], f"{r['full_s']:.2f}", f"{r['certified_s']:.2f}",
              f"{r['speedup']:.1f}×", r["delta_path"], f"{r['max_phi_diff']:.1e}", f"{r['max_angle_diff_deg']:.1e}",
              f"{r['amplification_rel_diff']:.1e}", f"{r['optimal_energy_rel_diff']:.1e}",
              f"{r['intruders'][0]}, {r['intruders'][1]} {'✓' if r['intruders_equal'] else '✗'}"] for r in rows]
    text = ("# verify: one module's measures, full SVDs vs certified partial decompositions\n\n"
            f"`module_measures` on synthetic float32 modules, rank-{rank} LoRA adapter, {meta['threads']} threads, "
            f"torch {meta['torch']}: the five full float64 SVDs with vectors (`exact_below` above the short side) "
            f"against the default path, side by side in one run (fastest of {repeats} alternating runs each; "
            f"1-minute load {meta['load_1min'][0]} before, {meta['load_1min'][1]} after, on 2 cores). "
            "Differences are between the two runs' reported "
            f"numbers (φ over the whole r × {phi_max} matrix); intruder counts (adapter, full fine-tune) must be "
            "equal.\n\n"
            + markdown_table(["shape", "ΔW_full", "full SVDs (s)", "certified (s)", "speedup", "ΔW_full path",
                              "max |Δφ|", "max |Δangle| (°)", "amplification rel.", "optimal energy rel.",
                              "intruders"], table)
            + "\n\nOn a shared machine read the ratios, not the absolute times.\n")
    return write_text_atomic(out / "verify.md", text)
